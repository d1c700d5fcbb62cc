"""Qwen-Image diffusers <-> Flax weight conversion: the key map against diffusers' state dict, bit-exact round
trips (the CLI included), named errors, and ``load_transformer`` recognising the family from config.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from flax import nnx

from awm_jax.convert import ConversionError, get_converter, qwenimage, read_flax_params, to_flax
from awm_jax.convert.io import SafetensorsReader, write_sharded
from awm_jax.convert.keymap import LINEAR_T
from awm_jax.models.qwenimage import QwenImageConfig
from awm_jax.models.qwenimage import QwenImageTransformer2DModel as FlaxQwen
from tests.flux_oracle import oracle
from tests.test_qwenimage_model import _fwd, _rel

TINY = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=(4, 6, 6),
)


def _tiny(dtype=torch.float32, seed=0) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    m = QwenImageTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.to(dtype)


def _tensors(path):
    with SafetensorsReader(path) as r:
        return {k: (str(r.dtype(k)), r.get(k).tobytes()) for k in r.keys()}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen") / "transformer"
    _tiny().save_pretrained(d)
    return d


@pytest.mark.parametrize(
    "config", [TINY, dict(TINY, num_layers=0, out_channels=None), {}], ids=["tiny", "no_layers", "defaults"]
)
def test_key_map_matches_diffusers_and_flax_model(config):
    with torch.device("meta"):
        sd = QwenImageTransformer2DModel(**config).state_dict()
    km = qwenimage.key_map(config)
    assert sorted(km.diffusers_keys()) == sorted(sd)
    for r in km.rules:
        assert r.diffusers_shape == tuple(sd[r.diffusers_key].shape), r.diffusers_key
    if config:
        cfg = QwenImageConfig.from_dict(config)
        m = nnx.eval_shape(lambda: FlaxQwen(cfg, rngs=nnx.Rngs(0)))
        got = {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
        assert got == {r.flax_key: r.flax_shape for r in km.rules}
    else:  # full-size Qwen-Image (20 B parameters), shapes only
        assert sum(int(np.prod(r.diffusers_shape)) for r in km.rules) == sum(v.numel() for v in sd.values())
    r = qwenimage.key_map(TINY).by_diffusers["transformer_blocks.1.img_mod.1.weight"]
    assert (r.flax_key, r.transform, r.flax_shape) == (
        "transformer_blocks.1.img_mod.1.kernel",
        LINEAR_T,
        (32, 192),
    )
    assert get_converter("qwenimage") is qwenimage
    with pytest.raises(ConversionError, match="num_layers=-1"):
        qwenimage.key_map(dict(TINY, num_layers=-1))


@pytest.mark.parametrize("dtype,shard", [(torch.bfloat16, "20KB"), (torch.float32, None)])
def test_round_trip_bit_exact_cli(tmp_path, dtype, shard):
    src = tmp_path / "diffusers"
    _tiny(dtype).save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    from tools.convert_weights import main

    for cmd, a, b in (
        ("to-flax", src, tmp_path / "flax"),
        ("to-diffusers", tmp_path / "flax", tmp_path / "back"),
    ):
        assert main([cmd, "--model", "qwenimage", "--src", str(a), "--dst", str(b)]) == 0
    assert _tensors(src) == _tensors(tmp_path / "back")
    assert json.loads((tmp_path / "flax/config.json").read_text())["awm_jax"]["model"] == "qwenimage"
    assert json.loads((tmp_path / "back/config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )


def _rewrite(src, dst, edit):
    with SafetensorsReader(src) as r:
        t = {k: r.get(k) for k in r.keys()}
    edit(t)
    write_sharded(
        dst, "diffusion_pytorch_model", [(k, v.dtype, v.shape) for k, v in t.items()], t.__getitem__
    )
    (dst / "config.json").write_text((src / "config.json").read_text())


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (
            lambda t: t.pop("transformer_blocks.1.attn.norm_added_k.weight"),
            r"missing .*'transformer_blocks\.1\.attn\.norm_added_k\.weight' \(expected shape \(16,\)\)",
        ),
        (
            lambda t: t.__setitem__(
                "time_text_embed.addition_t_embedding.weight", np.zeros((2, 32), np.float32)
            ),
            r"unexpected diffusers tensor.*'time_text_embed\.addition_t_embedding\.weight'",
        ),
        (
            lambda t: t.__setitem__("txt_norm.weight", np.zeros((12,), np.float32)),
            r"'txt_norm\.weight' in .*diffusion_pytorch_model\.safetensors has shape \(12,\), "
            r"expected \(24,\)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_bad_checkpoint_errors(tmp_path, tiny_dir, edit, pattern):
    _rewrite(tiny_dir, tmp_path / "bad", edit)
    with pytest.raises(ConversionError, match=pattern):
        to_flax(tmp_path / "bad", tmp_path / "flax", "qwenimage")
    assert not (tmp_path / "flax").exists()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    (tmp_path / "bad/config.json").write_text(json.dumps(dict(cfg, _class_name="FluxTransformer2DModel")))
    with pytest.raises(ConversionError, match="is not a qwenimage model"):
        read_flax_params(tmp_path / "bad", "qwenimage")


def test_load_transformer_recognises_qwenimage(tmp_path, tiny_dir):
    from awm_jax.models.loading import detect_family, load_transformer

    to_flax(tiny_dir, tmp_path / "flax", "qwenimage", max_shard_bytes=50_000)
    rs = np.random.RandomState(2)
    x = dict(
        hidden_states=rs.randn(2, 6, 16).astype(np.float32),
        encoder_hidden_states=rs.randn(2, 5, 24).astype(np.float32),
        encoder_hidden_states_mask=np.array([[1, 1, 1, 0, 0], [1] * 5]),
        timestep=np.array([0.3, 0.95], np.float32),
        img_shapes=[[(1, 2, 3)]] * 2,
    )
    with oracle():
        kw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in x.items()}
        ref = QwenImageTransformer2DModel.from_pretrained(tiny_dir).eval()(**kw).sample.numpy()
    for path, kw in ((tiny_dir, {}), (tmp_path / "flax", {"scan_layers": True})):
        assert detect_family(path).name == "qwenimage"
        model = load_transformer(path, **kw)
        assert isinstance(model, FlaxQwen)
        assert _rel(_fwd(model, x), ref) <= 1e-5
