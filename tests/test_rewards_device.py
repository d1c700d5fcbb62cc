"""On-accelerator CLIP rewards (rewards/device_clip.py) against the host scorers, and the JAX preprocessing
against the PIL CLIPImageProcessor (tiny random models, offline)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from awm_jax import rewards
from awm_jax.rewards.clip_preprocess import PreprocessSpec, clip_preprocess, resize_shortest
from awm_jax.rewards.tiny import save_tiny_aesthetic, save_tiny_clip
from tests.open_clip_import import import_open_clip

TOL = 1e-5
PROMPTS = ["a red cube", "two dogs on a beach at sunset", "", "a very long prompt " * 12]


def _images(n=4, h=64, w=64, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[1] = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
    return img


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("device_rewards")
    clip = save_tiny_clip(str(d / "clip"), image_size=32, patch=8)
    head = save_tiny_aesthetic(str(d / "head.safetensors"), dim=16)
    import_open_clip()
    from open_clip.model import CLIP

    oc_cfg = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 514, "width": 32, "heads": 2, "layers": 2}}
    torch.manual_seed(1)
    model = CLIP(**oc_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"state_dict": model.state_dict()}, d / "hps.pt")
    return {"clip": clip, "head": head, "hps": str(d / "hps.pt"), "arch": oc_cfg}


def _kwargs(name, a):
    return {"pickscore": dict(model_path=a["clip"]),
            "clipscore": dict(model_path=a["clip"]),
            "aesthetic": dict(clip_path=a["clip"], head_path=a["head"]),
            "hps": dict(checkpoint_path=a["hps"], processor_path=a["clip"], arch=a["arch"])}[name]


def test_preprocess_matches_pil_processor():
    from transformers import CLIPImageProcessor

    spec = PreprocessSpec(size=32, crop=(32, 32))
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pre = jax.jit(lambda x: clip_preprocess(x, spec))
    for h, w in ((64, 64), (20, 20)):  # square, down and up: bit-exact uint8
        img = _images(2, h, w)
        ours = np.asarray(jax.jit(lambda x: resize_shortest(x, 32))(img))
        pil = np.stack([np.asarray(Image.fromarray(i).resize((32, 32), Image.BICUBIC)) for i in img])
        assert np.array_equal(ours, pil), (h, w)
        err = np.abs(np.asarray(pre(img)) - proc(images=list(img), return_tensors="np")["pixel_values"]).max()
        print(f"pixel_values {h}x{w}: max |diff| {err:.2e}")
        assert err < 1e-6
    # non-square: Pillow's pass order is not reproduced; smooth image within one 8-bit level (measured)
    img = _images(2, 48, 80)[1:]
    err = np.abs(np.asarray(pre(img)) - proc(images=list(img), return_tensors="np")["pixel_values"]).max()
    print(f"pixel_values 48x80 smooth: max |diff| {err:.3e} ({err * 0.2613 * 255:.2f} levels)")
    assert err <= 1.01 / 255 / min(spec.std)


@pytest.mark.parametrize("name", ["pickscore", "aesthetic", "clipscore", "hps"])
def test_device_scorer_equals_host(assets, name):
    host = rewards.get(name, **_kwargs(name, assets))
    dev = rewards.get(name, **_kwargs(name, assets), device="accelerator")
    assert getattr(dev, "on_device", False) and not getattr(host, "on_device", False)
    img = _images()
    want = host(img, PROMPTS)
    got = dev(img, PROMPTS)
    print(f"{name}: host {np.round(want, 4)} device {np.round(got, 4)} max |diff| "
          f"{np.abs(got - want).max():.2e}")
    assert got.shape == (4,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    if name in ("pickscore", "hps"):  # the rewards depend on the prompt
        assert not np.allclose(dev(img, PROMPTS[::-1]), got)
    if name == "clipscore":  # 2.5 * max(cos, 0), cos from the same model (the tiny model's are mostly < 0)
        from awm_jax.rewards.device_clip import DeviceCLIPScorer

        model = nnx.merge(dev.graphdef, dev.state)
        cos = DeviceCLIPScorer(model, dev.spec, dev.tokenizer, "hps")(img, PROMPTS)
        np.testing.assert_allclose(got, 2.5 * np.maximum(cos, 0), atol=1e-6, rtol=0)
        assert not np.allclose(cos, cos[0])
    if name != "pickscore":
        return
    bf16 = rewards.get(name, **_kwargs(name, assets), device="accelerator", dtype="bfloat16")(img, PROMPTS)
    print(f"pickscore bfloat16 vs float32: max |diff| {np.abs(bf16 - got).max():.2e}")
    np.testing.assert_allclose(bf16, got, atol=0.05 * np.abs(got).max(), rtol=0)
    # sharded over the batch on a 4-device mesh: the same rewards, returned sharded like the images
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    sharded = jax.device_put(img, NamedSharding(mesh, PartitionSpec("data")))
    out = dev.score_device(sharded, PROMPTS)
    assert isinstance(out, jax.Array) and len(out.sharding.device_set) == 4
    np.testing.assert_allclose(np.asarray(out), got, atol=1e-6, rtol=0)


def test_config_sections_and_errors(assets, tmp_path):
    from configs.awm_base import base_config

    c = base_config()
    c.reward.name = "clipscore"
    c.reward.clipscore.model_path = assets["clip"]
    c.reward.clipscore.device = "accelerator"
    scorer = rewards.from_config(c)
    assert scorer.on_device and scorer.kind == "clipscore" and scorer.weight == 2.5
    c.reward.name = "hps"
    c.reward.hps.checkpoint_path = str(tmp_path / "nope.pt")
    assert any("reward.hps.checkpoint_path" in p for p in rewards.config_problems(c))
    with pytest.raises(rewards.RewardConfigError, match="vision_cfg.patch_size|shape"):
        bad = {**assets["arch"], "vision_cfg": {**assets["arch"]["vision_cfg"], "patch_size": 16}}
        rewards.get("hps", checkpoint_path=assets["hps"], processor_path=assets["clip"], arch=bad,
                    device="accelerator")


class _DeviceImages:
    """Stands for decoded device images: converting it to a host array fails the test."""

    def __init__(self, rows):
        self.rows = rows

    def __array__(self, *a, **k):
        raise AssertionError("an on-device scorer's images were copied to the host")


def test_collect_hook_scores_on_device_without_a_host_copy():
    import types

    import jax.numpy as jnp
    import ml_collections

    from awm_jax.rl.collect import prepare, rollout_epoch
    from awm_jax.timeline import Timeline

    block = jax.device_count()
    n = 2 * block
    seen = []

    class Scorer:
        on_device = True

        def score_device(self, images, prompts, metadata=None):
            seen.append(list(prompts))
            return jnp.asarray(images.rows, jnp.float32) * 10

    def submit(*a, **k):
        raise AssertionError("the host bridge was used for an on-device scorer")

    comp = types.SimpleNamespace(
        rollout=lambda params, base, emb, pooled, key: {"x0": jnp.asarray(emb)[:, :1, :1]}, base_state=None,
        pipeline=types.SimpleNamespace(decode=lambda x0: _DeviceImages(np.asarray(x0)[:, 0, 0])))
    sampler = types.SimpleNamespace(global_indices=lambda step: (np.arange(n), np.arange(n) // 2))
    dataset = types.SimpleNamespace(take=lambda idx: ([f"p{i}" for i in idx], [{} for _ in idx]))
    embed = types.SimpleNamespace(encode=lambda prompts: (
        np.array([[[float(p[1:])]] for p in prompts], np.float32), np.zeros((len(prompts), 2), np.float32)))
    config = ml_collections.ConfigDict({"sample": {"batch_size": 1}})
    tl = Timeline()
    prepared = prepare(config, sampler, dataset, embed, 1)
    from awm_jax.rewards.bridge import RewardBridge

    bridge = types.SimpleNamespace(scorer=Scorer(), submit=submit,
                                   submit_device=lambda r, p: RewardBridge.submit_device(None, r, p))
    _, rewards, _ = rollout_epoch(comp, config, None, None, embed, sampler, dataset, bridge, 1,
                                  jax.random.key(0), tl, prepared)
    np.testing.assert_array_equal(rewards, 10 * np.arange(n))
    assert seen == [[f"p{i}" for i in range(block)], [f"p{i}" for i in range(block, n)]]
    lap = tl.lap()
    assert lap["time/decode"] == 0 and lap["time/score"] >= 0
