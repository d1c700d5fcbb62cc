"""PickScore, aesthetic and GenEval plumbing on tiny random models saved offline to tmp folders."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from awm_jax.rewards import geneval_rules as R
from awm_jax.rewards import get
from awm_jax.rewards.base import RewardConfigError
from awm_jax.rewards.tiny import (
    COCO_LIKE,
    save_tiny_aesthetic,
    save_tiny_clip,
    save_tiny_detr,
    save_tiny_mask2former,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_models")
    return {
        "clip": save_tiny_clip(str(root / "clip")),
        "head": save_tiny_aesthetic(str(root / "head.safetensors"), dim=16),
        "detr": save_tiny_detr(str(root / "detr")),
        "m2f": save_tiny_mask2former(str(root / "m2f")),
        "root": root,
    }


def _images(b=3, seed=0, h=48, w=64):
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def _clip_oracle(path, images, prompts):
    from transformers import AutoProcessor, CLIPModel

    model, proc = CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    inp = proc(text=prompts, images=list(images), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inp)
    return model, out


def test_pickscore_matches_clip_logits(models):
    imgs, prompts = _images(3), ["a red dog", "two cats on a sofa", "the word hello"]
    r = get("pickscore", model_path=models["clip"])(imgs, prompts)
    _, out = _clip_oracle(models["clip"], imgs, prompts)
    want = torch.diagonal(out.logits_per_image).numpy() / 26.0
    assert r.shape == (3,) and r.dtype == np.float32
    np.testing.assert_allclose(r, want, rtol=1e-4, atol=1e-5)
    r2 = get("pickscore", model_path=models["clip"], batch_size=2, scale=13.0)(imgs, prompts)
    np.testing.assert_allclose(r2, 2 * want, rtol=1e-4, atol=1e-5)


def test_aesthetic_matches_manual_head(models):
    imgs = _images(3, seed=1)
    r = get("aesthetic", clip_path=models["clip"], head_path=models["head"])(imgs, [""] * 3)
    _, out = _clip_oracle(models["clip"], imgs, [""] * 3)
    x = out.image_embeds.numpy().astype(np.float64)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    w = {k: v.numpy().astype(np.float64) for k, v in load_file(models["head"]).items()}
    for i in (0, 2, 4, 6, 7):
        x = x @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"]
    np.testing.assert_allclose(r, x[:, 0], rtol=1e-4, atol=1e-6)
    # the same head as a torch .pth (the public checkpoint's format) gives the same scores
    pth = models["root"] / "head.pth"
    torch.save(load_file(models["head"]), pth)
    r_pth = get("aesthetic", clip_path=models["clip"], head_path=str(pth))(imgs, [""] * 3)
    np.testing.assert_allclose(r_pth, r, rtol=1e-6)


def test_aesthetic_head_errors_name_file_and_key(models):
    bad = models["root"] / "head_bad.pth"
    state = load_file(models["head"])
    state["layers.0.weight"] = torch.zeros(1024, 768)
    torch.save(state, bad)
    with pytest.raises(RewardConfigError, match=r"head_bad.pth.*layers.0.weight"):
        get("aesthetic", clip_path=models["clip"], head_path=str(bad))
    del state["layers.7.bias"]
    torch.save(state, bad)
    with pytest.raises(RewardConfigError, match=r"missing keys \['layers.7.bias'\]"):
        get("aesthetic", clip_path=models["clip"], head_path=str(bad))
    with pytest.raises(RewardConfigError, match="no_head.pth"):
        get("aesthetic", clip_path=models["clip"], head_path=str(models["root"] / "no_head.pth"))


def test_bad_paths_fail_at_construction(models, tmp_path):
    missing = str(tmp_path / "no_such_clip")
    with pytest.raises(RewardConfigError, match="no_such_clip"):
        get("pickscore", model_path=missing)
    with pytest.raises(RewardConfigError, match="no_such_clip"):
        get("aesthetic", clip_path=missing, head_path=models["head"])
    with pytest.raises(RewardConfigError, match="no_such_clip"):
        get("geneval", detector_path=models["detr"], clip_path=missing)
    with pytest.raises(RewardConfigError, match="no_such_det"):
        get("geneval", detector_path=str(tmp_path / "no_such_det"), clip_path=models["clip"])
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(RewardConfigError, match="empty_model"):
        get("pickscore", model_path=str(empty))


META = [
    {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"},
                                      {"class": "cat", "count": 1, "color": "blue"}]},
    {"tag": "position", "include": [{"class": "car", "count": 1},
                                    {"class": "cup", "count": 1, "position": ["left of", 0]}]},
    {"tag": "counting", "include": [{"class": "bowl", "count": 2}],
     "exclude": [{"class": "bowl", "count": 3}]},
]


@pytest.mark.parametrize("det", ["detr", "m2f"])
def test_geneval_plumbing(models, det):
    g = get("geneval", detector_path=models[det], clip_path=models["clip"], threshold=0.0,
            counting_threshold=0.0, batch_size=2)
    imgs, prompts = _images(3, seed=2), ["p0", "p1", "p2"]
    r = g(imgs, prompts, META)
    dets = g.detections(imgs, META)
    assert r.shape == (3,) and r.dtype == np.float32
    want = [R.reward_score(d, m)[1] for d, m in zip(dets, META)]
    np.testing.assert_allclose(r, want, rtol=1e-6)
    assert any(dets[i] for i in range(3)), "threshold 0 must keep detections"
    for d, m in zip(dets, META):
        coloured = {q["class"] for q in m["include"] if "color" in q}
        for cls, objs in d.items():
            assert all(o["score"] > 0 for o in objs)
            assert all(("color" in o) == (cls in coloured) for o in objs)
            assert all(o["color"] in ("red", "orange", "yellow", "green", "blue", "purple", "pink",
                                      "brown", "black", "white") for o in objs if "color" in o)
    ev = g.evaluate(imgs, prompts, META)
    assert ev["tag"] == ["color_attr", "position", "counting"]
    np.testing.assert_allclose(ev["score"], r)
    assert ev["accuracy"].shape == ev["strict_accuracy"].shape == (3,)
    want_exact = [float(R.reward_score(d, m)[0]) for d, m in zip(dets, META)]
    np.testing.assert_array_equal(ev["strict_accuracy"], want_exact)
    want_acc = [float(R.geneval_correct(d, m)[0]) for d, m in zip(dets, META)]
    np.testing.assert_array_equal(ev["accuracy"], want_acc)
    assert ev["reason"] == [R.geneval_correct(d, m)[1] for d, m in zip(dets, META)]
    # nothing survives an impossible threshold: every include clause fails
    g.threshold = g.counting_threshold = 1.0
    np.testing.assert_array_equal(g(imgs, prompts, META), [0.0, 0.0, 0.0])


def test_geneval_masks_and_class_names(models):
    g = get("geneval", detector_path=models["m2f"], clip_path=models["clip"], threshold=0.0)
    raw = g.detector.detect(_images(1, seed=3))[0]
    objs = [o for v in raw.values() for o in v]
    assert objs and all(o["mask"] is not None and o["mask"].shape == (48, 64) for o in objs)
    for o in objs:  # the box is the mask's bounding box
        ys, xs = np.nonzero(o["mask"])
        assert o["box"] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert "stop sign" in g.detector.class_names
    from awm_jax.rewards.geneval import _load_class_names

    coco = {0: "mouse", 1: "dog", 2: "remote"}
    assert _load_class_names(None, coco) == ["computer mouse", "dog", "tv remote"]
    renamed = [f"thing{i}" for i in range(len(COCO_LIKE))]
    g2 = get("geneval", detector_path=models["detr"], clip_path=models["clip"], class_names=renamed)
    assert g2.detector.class_names == renamed
    with pytest.raises(ValueError, match="'dog' of #0"):
        g2(_images(1), ["a dog"], [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]}])
    with pytest.raises(RewardConfigError, match="3 class names given but the detector has 8"):
        get("geneval", detector_path=models["detr"], clip_path=models["clip"], class_names=["a", "b", "c"])
