"""Flax CLIP (awm_jax.models.clip) against transformers CLIPModel and open_clip CLIP (tiny random)."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from awm_jax.convert import ConversionError, to_flax
from awm_jax.models import clip as fclip
from awm_jax.rewards.tiny import save_tiny_clip
from tests.open_clip_import import import_open_clip

TOL = 1e-5
OC_CFG = {"embed_dim": 16,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
          "text_cfg": {"context_length": 20, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2}}


def _ids(rng, b, n, vocab, eos, pad):
    ids = rng.integers(1, vocab - 3, size=(b, n))
    for i, end in enumerate(rng.integers(2, n - 1, size=b)):
        ids[i, end] = eos
        ids[i, end + 1:] = pad
    return ids


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clip") / "tiny")
    save_tiny_clip(path, image_size=32, patch=8)
    from transformers import CLIPModel

    return path, CLIPModel.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def oc(tmp_path_factory):
    import torch

    import_open_clip()
    from open_clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(**OC_CFG).eval()
    with torch.no_grad():  # open_clip zero-inits some tensors: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp("open_clip")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd}, d / "model.pt")
    from safetensors.torch import save_file

    save_file(sd, str(d / "open_clip_model.safetensors"))
    return d, model, sd


@nnx.jit
def _feats_jit(model, pix, ids):
    return model.image_features(pix), model.text_features(ids)


def _feats(model, pix, ids):
    return tuple(np.asarray(x) for x in _feats_jit(model, pix, ids))


def _hf_feats(model, pix, ids):
    import torch

    def pooled(x):
        return x if hasattr(x, "norm") else x.pooler_output

    with torch.no_grad():
        img = pooled(model.get_image_features(pixel_values=torch.tensor(pix))).numpy()
        txt = pooled(model.get_text_features(input_ids=torch.tensor(ids),
                                             attention_mask=torch.tensor(ids != ids.max() + 1))).numpy()
    return img, txt


def test_transformers_parity(hf):
    path, ref = hf
    model = fclip.load(path)
    cfg = ref.config.text_config
    rng = np.random.default_rng(0)
    pix = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
    ids = _ids(rng, 3, 12, cfg.vocab_size, cfg.eos_token_id, cfg.pad_token_id)
    img_ref, txt_ref = _hf_feats(ref, pix, ids)
    img, txt = _feats(model, pix, ids)
    err_i, err_t = np.abs(img - img_ref).max(), np.abs(txt - txt_ref).max()
    print(f"transformers parity: image {err_i:.2e} text {err_t:.2e}")
    assert err_i <= TOL and err_t <= TOL
    # padding to the full context does not change the text features (the mask is causal)
    full = np.full((3, 77), cfg.pad_token_id)
    full[:, :12] = ids
    assert np.abs(_feats(model, pix, full)[1] - txt_ref).max() <= TOL
    assert float(model.logit_scale[...]) == pytest.approx(float(ref.logit_scale.detach()), abs=0)


def test_flax_folder_round_trip(hf, tmp_path):
    path, _ = hf
    to_flax(path, tmp_path / "flax", "clip")
    a, b = fclip.load(path), fclip.load(tmp_path / "flax")
    pa, pb = fclip.model_params(a), fclip.model_params(b)
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)


def test_open_clip_parity(oc):
    import torch

    d, ref, _ = oc
    rng = np.random.default_rng(1)
    pix = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    ids = _ids(rng, 2, 20, 100, 99, 0)  # open_clip pools at argmax: the end-of-text id is the largest
    with torch.no_grad():
        img_ref = ref.encode_image(torch.tensor(pix)).numpy()
        txt_ref = ref.encode_text(torch.tensor(ids)).numpy()
    for f in ("model.pt", "open_clip_model.safetensors"):
        model = fclip.load(d / f, open_clip_arch=OC_CFG)
        img, txt = _feats(model, pix, ids)
        err_i, err_t = np.abs(img - img_ref).max(), np.abs(txt - txt_ref).max()
        print(f"open_clip parity ({f}): image {err_i:.2e} text {err_t:.2e}")
        assert err_i <= TOL and err_t <= TOL
        assert float(model.logit_scale[...]) == float(ref.logit_scale.detach())


def test_open_clip_named_errors(oc, tmp_path):
    from safetensors.numpy import save_file

    _, _, sd = oc
    base = {k: v.numpy() for k, v in sd.items()}
    cases = {
        "missing": ({k: v for k, v in base.items() if k != "visual.ln_post.bias"}, "visual.ln_post.bias"),
        "unexpected": ({**base, "visual.extra": np.zeros(3, np.float32)}, "visual.extra"),
        "shape": ({**base, "visual.proj": np.zeros((32, 8), np.float32)}, "visual.proj"),
    }
    for name, (tensors, key) in cases.items():
        f = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(f))
        with pytest.raises(ConversionError, match=key.replace(".", r"\.")) as e:
            fclip.load(f, open_clip_arch=OC_CFG)
        assert str(f) in str(e.value)
    with pytest.raises(ConversionError, match="ls_init_value"):
        fclip.load(tmp_path / "missing.safetensors",
                   open_clip_arch={**OC_CFG, "vision_cfg": {**OC_CFG["vision_cfg"], "ls_init_value": 1e-5}})
    with pytest.raises(ConversionError, match="expected one of"):
        fclip.load(tmp_path / "missing.safetensors", open_clip_arch="ViT-nope")


def test_transformers_missing_tensor_named(hf, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    path, _ = hf
    dst = tmp_path / "broken"
    shutil.copytree(path, dst)
    t = load_file(str(dst / "model.safetensors"))
    del t["text_projection.weight"]
    save_file(t, str(dst / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"text_projection\.weight"):
        fclip.load(dst)


def test_every_parameter_has_logical_axis_names():
    from awm_jax.parallel import LOGICAL_AXIS_RULES

    known = {n for n, _ in LOGICAL_AXIS_RULES} | {None}
    cfg = fclip.CLIPConfig(vision_hidden=32, vision_intermediate=64, vision_layers=1, vision_heads=2,
                           image_size=32, patch_size=8, text_hidden=32, text_intermediate=64, text_layers=1,
                           text_heads=2, vocab_size=100, max_positions=16, projection_dim=16, fused_qkv=True)
    for path, var in nnx.to_flat_state(nnx.state(fclip.abstract_clip(cfg), nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.get_value().shape), path
        assert set(names) <= known, (path, names)


def test_transformers_parity_gelu_legacy_eos(tmp_path):
    """CLIP-H-style transformers configs (PickScore_v1): exact GELU, and the legacy ``eos_token_id == 2`` rule
    of transformers (pool at the highest token id)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, hidden_act="gelu", eos_token_id=2,
                bos_token_id=0, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=8, hidden_act="gelu")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path)
    ref = CLIPModel.from_pretrained(tmp_path).eval()
    model = fclip.load(tmp_path)
    assert model.config.text_pool == "argmax" and model.config.vision_act == "gelu"
    rng = np.random.default_rng(2)
    pix = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    ids = _ids(rng, 2, 10, 100, 99, 1)  # the highest id ends the text
    img_ref, txt_ref = _hf_feats(ref, pix, ids)
    img, txt = _feats(model, pix, ids)
    assert np.abs(img - img_ref).max() <= TOL and np.abs(txt - txt_ref).max() <= TOL
