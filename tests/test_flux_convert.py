"""FLUX.1 diffusers <-> Flax weight conversion: the key map, bit-exact round trips, errors, loading into the
Flax model with diffusers' forward."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from flax import nnx

from awm_jax.convert import ConversionError, flux, get_converter, read_flax_params, to_diffusers, to_flax
from awm_jax.convert.io import SafetensorsReader, write_sharded
from awm_jax.convert.keymap import LINEAR_T, Identity
from awm_jax.models.flux import FluxConfig, stacks
from awm_jax.models.flux import FluxTransformer2DModel as FlaxFlux
from awm_jax.models.lora import LoRAParam
from awm_jax.models.stacking import stack_state
from tests.flux_oracle import oracle
from tests.test_flux_model import _rel

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
DEV = dict(TINY, guidance_embeds=True)
VARIANTS = {
    "dev": DEV,
    "schnell": dict(TINY, guidance_embeds=False),
    "patch2_out6": dict(TINY, patch_size=2, out_channels=6),
    "no_single": dict(TINY, num_single_layers=0),
    "no_double": dict(DEV, num_layers=0),
    "defaults": {},  # full-size FLUX.1-schnell from diffusers' defaults (meta device: shapes only)
}


def _tiny(config: dict, dtype=torch.float32, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    m = FluxTransformer2DModel(**config).eval()
    with torch.no_grad():  # non-trivial values everywhere (unit norm scales would hide a swapped mapping)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.to(dtype)


def _tensors(path) -> dict[str, tuple[str, bytes]]:
    with SafetensorsReader(path) as r:
        return {k: (str(r.dtype(k)), r.get(k).tobytes()) for k in r.keys()}


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny FLUX.1-dev-like diffusers folder (fp32, single file)."""
    d = tmp_path_factory.mktemp("flux_dev") / "transformer"
    _tiny(DEV).save_pretrained(d)
    return d


# ------------------------------------------------------------------------------------------ key map


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_key_map_matches_diffusers_state_dict(name):
    config = VARIANTS[name]
    with torch.device("meta"):
        sd = FluxTransformer2DModel(**config).state_dict()
    km = flux.key_map(config)
    assert sorted(km.diffusers_keys()) == sorted(sd)
    for r in km.rules:
        assert r.diffusers_shape == tuple(sd[r.diffusers_key].shape), r.diffusers_key
        assert r.flax_key.rsplit(".", 1)[-1] in {"kernel", "bias", "scale"}
    if name == "defaults":
        assert len(km) == 1156 and sum(int(np.prod(r.diffusers_shape)) for r in km.rules) == sum(
            v.numel() for v in sd.values())


def test_key_map_rules_and_flax_model_tree():
    km = flux.key_map(DEV)
    r = km.by_diffusers["single_transformer_blocks.1.proj_out.weight"]
    want = ("single_transformer_blocks.1.proj_out.kernel", LINEAR_T, (5 * 32, 32))
    assert (r.flax_key, r.transform, r.flax_shape) == want
    n = km.by_flax["transformer_blocks.0.attn.norm_added_k.scale"]
    assert n.diffusers_key == "transformer_blocks.0.attn.norm_added_k.weight" and n.transform == Identity()
    assert km.by_diffusers["transformer_blocks.1.norm1_context.linear.weight"].diffusers_shape == (6 * 32, 32)
    assert km.by_diffusers["single_transformer_blocks.0.norm.linear.weight"].diffusers_shape == (3 * 32, 32)
    assert "time_text_embed.guidance_embedder.linear_1.kernel" in km.by_flax
    schnell = flux.key_map(VARIANTS["schnell"])
    assert "time_text_embed.guidance_embedder.linear_1.kernel" not in schnell.by_flax
    assert "single_transformer_blocks.0.attn.to_out.0.kernel" not in km.by_flax  # pre-only attention
    # the Flax model's per-layer parameters are exactly the key map's Flax keys (shapes included)
    for name in ("dev", "patch2_out6", "no_double"):
        cfg = FluxConfig.from_dict(VARIANTS[name])
        m = nnx.eval_shape(lambda cfg=cfg: FlaxFlux(cfg, rngs=nnx.Rngs(0)))
        got = {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
        assert got == {r.flax_key: r.flax_shape for r in flux.key_map(VARIANTS[name]).rules}, name
    assert get_converter("flux") is flux and flux.CLASS_NAMES == ("FluxTransformer2DModel",)
    with pytest.raises(ConversionError, match="num_single_layers=-1"):
        flux.key_map(dict(TINY, num_single_layers=-1))


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype,shard",
                         [(torch.float32, None), (torch.bfloat16, "20KB"), (torch.float16, "20KB")])
def test_round_trip_bit_exact(tmp_path, dtype, shard):
    src = tmp_path / "diffusers"
    _tiny(DEV, dtype).save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    assert (src / "diffusion_pytorch_model.safetensors.index.json").exists() == bool(shard)
    to_flax(src, tmp_path / "flax", "flux", max_shard_bytes=30_000 if shard else 2**31)
    assert (tmp_path / "flax/model.safetensors.index.json").exists() == bool(shard)
    to_diffusers(tmp_path / "flax", tmp_path / "back", "flux")
    a, b = _tensors(src), _tensors(tmp_path / "back")
    assert a == b  # same keys, dtypes and bytes
    assert {d for d, _ in a.values()} == {str(dtype).split(".")[1]}
    assert json.loads((tmp_path / "flax/config.json").read_text())["awm_jax"] == {
        "format": "flax", "model": "flux", "weights": "model"}
    back = json.loads((tmp_path / "back/config.json").read_text())
    assert back == json.loads((src / "config.json").read_text())
    with SafetensorsReader(tmp_path / "flax") as f, SafetensorsReader(src) as d:
        for key in ("single_transformer_blocks.1.proj_mlp", "transformer_blocks.0.attn.to_add_out"):
            np.testing.assert_array_equal(f.get(f"{key}.kernel"), d.get(f"{key}.weight").T)


def _rewrite(src: pathlib.Path, dst: pathlib.Path, edit) -> None:
    with SafetensorsReader(src) as r:
        t = {k: r.get(k) for k in r.keys()}
    edit(t)
    entries = [(k, v.dtype, v.shape) for k, v in t.items()]
    write_sharded(dst, "diffusion_pytorch_model", entries, t.__getitem__)
    (dst / "config.json").write_text((src / "config.json").read_text())


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda t: t.pop("time_text_embed.guidance_embedder.linear_2.weight"),
         r"missing .*'time_text_embed\.guidance_embedder\.linear_2\.weight' \(expected shape \(32, 32\)\)"),
        (lambda t: t.__setitem__("single_transformer_blocks.0.attn.to_out.0.weight", np.zeros((32, 32))),
         r"unexpected diffusers tensor.*'single_transformer_blocks\.0\.attn\.to_out\.0\.weight' \(32, 32\) "
         r"in .*diffusion_pytorch_model\.safetensors"),
        (lambda t: t.__setitem__("single_transformer_blocks.1.proj_out.weight", np.zeros((32, 128))),
         r"'single_transformer_blocks\.1\.proj_out\.weight' in .*diffusion_pytorch_model\.safetensors has "
         r"shape \(32, 128\), expected \(32, 160\)"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_bad_diffusers_checkpoint_errors(tmp_path, dev_dir, edit, pattern):
    _rewrite(dev_dir, tmp_path / "bad", edit)
    with pytest.raises(ConversionError, match=pattern):
        to_flax(tmp_path / "bad", tmp_path / "flax", "flux")
    assert not (tmp_path / "flax").exists()  # validated before anything is written


def test_wrong_class_and_config_mismatch(tmp_path, dev_dir):
    bad = tmp_path / "sd3"
    _rewrite(dev_dir, bad, lambda t: None)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, _class_name="SD3Transformer2DModel")))
    with pytest.raises(ConversionError, match="_class_name 'SD3Transformer2DModel' is not a flux model"):
        to_flax(bad, tmp_path / "x", "flux")
    # a schnell config over dev weights: the guidance MLP is unexpected
    (bad / "config.json").write_text(json.dumps(dict(cfg, guidance_embeds=False)))
    with pytest.raises(ConversionError, match="unexpected diffusers tensor.*guidance_embedder"):
        read_flax_params(bad, "flux")


# ------------------------------------------------------------------------------------------ loading


def _load_params(path, **kw):
    """Test-local loader: ``read_flax_params`` (diffusers or Flax folder) -> a FluxTransformer2DModel."""
    config, _, tensors = read_flax_params(path, "flux")
    cfg = FluxConfig.from_dict(config, source=str(path))
    model = nnx.eval_shape(lambda: FlaxFlux(cfg, rngs=nnx.Rngs(0), **kw))
    values = {tuple(int(p) if p.isdigit() else p for p in k.split(".")): v for k, v in tensors}
    if kw.get("scan_layers"):
        nested: dict = {}
        for path, v in values.items():
            node = nested
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = v
        values = dict(_flatten(stack_state(nested, stacks(cfg))))
    flat = []
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))):
        flat.append((p, var.replace(value=jnp.asarray(values.pop(p), jnp.float32))))
    assert not values, sorted(values)
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def _flatten(d, prefix=()):
    for k, v in d.items():
        yield from _flatten(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)]


@nnx.jit
def _forward(model, x):
    return model(**x)


@pytest.fixture(scope="module")
def dev_ref(dev_dir):
    """Inputs (packed grid 3x2, 7 text tokens) and diffusers' output for the tiny dev folder."""
    g = torch.Generator().manual_seed(1)
    img = torch.zeros(3, 2, 3)
    img[..., 1], img[..., 2] = torch.arange(3)[:, None], torch.arange(2)[None, :]
    x = dict(hidden_states=torch.randn(2, 6, 16, generator=g),
             encoder_hidden_states=torch.randn(2, 7, 24, generator=g),
             pooled_projections=torch.randn(2, 12, generator=g), timestep=torch.tensor([0.3, 0.95]),
             img_ids=img.reshape(6, 3), txt_ids=torch.zeros(7, 3), guidance=torch.tensor([3.5, 4.0]))
    with oracle():
        ref = FluxTransformer2DModel.from_pretrained(dev_dir).eval()(**x).sample.double().numpy()
    return {k: v.numpy() for k, v in x.items()}, ref


def test_read_flax_params_reproduce_diffusers_forward(tmp_path, dev_dir, dev_ref):
    x, ref = dev_ref
    err = _rel(_forward(_load_params(dev_dir), x), ref)
    print(f"[converted dev] fp32 rel max err {err:.2e}")
    assert err <= 1e-5, err
    to_flax(dev_dir, tmp_path / "flax", "flux", max_shard_bytes=50_000)  # sharded Flax folder, scanned model
    assert _rel(_forward(_load_params(tmp_path / "flax", scan_layers=True), x), ref) <= 1e-5
    # the generic loader, where it already recognises FLUX folders (it is optional here)
    try:
        from awm_jax.models.loading import load_transformer

        model = load_transformer(tmp_path / "flax")
    except (ImportError, AttributeError, NotImplementedError, KeyError, ConversionError):
        model = None
    if model is not None:
        assert isinstance(model, FlaxFlux) and _rel(_forward(model, x), ref) <= 1e-5
