"""diffusers <-> Flax weight conversion: key maps, bit-exact round trips, errors, CLI, load_transformer."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from flax import nnx

from awm_jax.convert import (
    ConversionError,
    get_converter,
    read_flax_params,
    save_flax,
    sd3,
    to_diffusers,
    to_flax,
)
from awm_jax.convert.io import SafetensorsReader, write_sharded
from awm_jax.convert.keymap import CONV2D_T, LINEAR_T, Chain, Identity, KeyMap, Reshape, Rule, Transpose

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    caption_projection_dim=16,
    pooled_projection_dim=12,
    out_channels=4,
    pos_embed_max_size=8,
)
SD35M_LIKE = dict(TINY, qk_norm="rms_norm", dual_attention_layers=(0,))
VARIANTS = {
    "sd3_medium": dict(TINY),
    "sd35_medium": SD35M_LIKE,
    "sd35_large": dict(TINY, qk_norm="rms_norm"),
    "layer_norm_qk_all_dual": dict(TINY, qk_norm="layer_norm", dual_attention_layers=(0, 1, 2)),
    "no_pos_embed_max": dict(TINY, pos_embed_max_size=None, num_layers=2),
}


def _tiny(config: dict, dtype=torch.float32, seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    m = SD3Transformer2DModel(**config).eval()
    with torch.no_grad():  # non-trivial values everywhere (zero-init adaLN / norms would hide mistakes)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.to(dtype)


def _tensors(path) -> dict[str, tuple[str, bytes]]:
    with SafetensorsReader(path) as r:
        return {k: (str(r.dtype(k)), r.get(k).tobytes()) for k in r.keys()}


def _inputs(seed=0, h=8, w=8, b=2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(b, 4, h, w, generator=g),
        encoder_hidden_states=torch.randn(b, 5, 16, generator=g),
        pooled_projections=torch.randn(b, 12, generator=g),
        timestep=torch.tensor([10.0, 700.0][:b]),
    )


@pytest.fixture(scope="module")
def sd35m_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny SD3.5M-like diffusers folder (fp32, single file)."""
    d = tmp_path_factory.mktemp("sd35m") / "transformer"
    _tiny(SD35M_LIKE).save_pretrained(d)
    return d


# ----------------------------------------------------------------------------------------------------
# key map
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_key_map_matches_diffusers_state_dict(name):
    config = VARIANTS[name]
    with torch.device("meta"):
        sd = SD3Transformer2DModel(**config).state_dict()
    km = sd3.key_map(config)
    assert sorted(km.diffusers_keys()) == sorted(sd)
    for r in km.rules:
        assert r.diffusers_shape == tuple(sd[r.diffusers_key].shape), r.diffusers_key
        assert r.flax_key.rsplit(".", 1)[-1] in {"kernel", "bias", "scale", "pos_embed"}


def test_key_map_rules_are_declarative_and_invertible():
    km = sd3.key_map(SD35M_LIKE)
    r = km.by_diffusers["transformer_blocks.0.attn.to_q.weight"]
    assert (r.flax_key, r.transform, r.flax_shape) == (
        "transformer_blocks.0.attn.to_q.kernel",
        LINEAR_T,
        (16, 16),
    )
    conv = km.by_flax["pos_embed.proj.kernel"]
    assert conv.transform == CONV2D_T and conv.flax_shape == (2, 2, 4, 16)  # OIHW -> HWIO
    assert km.by_flax["transformer_blocks.0.attn.norm_q.scale"].diffusers_key.endswith("norm_q.weight")
    assert "transformer_blocks.2.attn.to_add_out.kernel" not in km.by_flax  # context-pre-only last block
    assert "transformer_blocks.2.ff_context.net.0.proj.kernel" not in km.by_flax
    assert km.by_diffusers["transformer_blocks.0.norm1.linear.weight"].diffusers_shape == (9 * 16, 16)
    assert km.by_diffusers["transformer_blocks.1.norm1.linear.weight"].diffusers_shape == (6 * 16, 16)
    rng = np.random.default_rng(0)
    for t, shape in [
        (LINEAR_T, (3, 5)),
        (CONV2D_T, (6, 4, 2, 3)),
        (Identity(), (7,)),
        (Reshape((4, 6), (2, 2, 6)), (4, 6)),
        (Chain((Transpose((1, 0)), Reshape((6, 4), (24,)))), (4, 6)),
    ]:
        x = rng.standard_normal(shape).astype(np.float32)
        y = t.forward(x)
        assert y.shape == t.forward_shape(shape) and t.inverse_shape(y.shape) == shape
        np.testing.assert_array_equal(t.inverse(y), x)
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        KeyMap([Rule("a", "x", (1,)), Rule("a", "y", (1,))])


def test_unsupported_config_values_raise():
    with pytest.raises(ConversionError, match="qk_norm='l2'"):
        sd3.key_map(dict(TINY, qk_norm="l2"))
    with pytest.raises(ConversionError, match=r"dual_attention_layers \[5\]"):
        sd3.key_map(dict(TINY, dual_attention_layers=(5,)))


# ----------------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,shard",
    [(torch.float32, None), (torch.float16, "30KB"), (torch.bfloat16, "30KB"), (torch.bfloat16, None)],
)
def test_round_trip_bit_exact(tmp_path, dtype, shard):
    src = tmp_path / "diffusers"
    m = _tiny(SD35M_LIKE, dtype)
    m.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    assert (src / "diffusion_pytorch_model.safetensors.index.json").exists() == bool(shard)
    to_flax(src, tmp_path / "flax", "sd3", max_shard_bytes=40_000 if shard else 2**31)
    to_diffusers(tmp_path / "flax", tmp_path / "back", "sd3")
    a, b = _tensors(src), _tensors(tmp_path / "back")
    assert a == b  # same keys, dtypes and bytes
    want = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}[str(dtype).split(".")[1]]
    assert {d for d, _ in a.values()} == {want}
    flax_cfg = json.loads((tmp_path / "flax/config.json").read_text())
    assert flax_cfg["awm_jax"] == {"format": "flax", "model": "sd3", "weights": "model"}
    assert (tmp_path / "flax/model.safetensors.index.json").exists() == bool(shard)
    back_cfg = json.loads((tmp_path / "back/config.json").read_text())
    assert back_cfg == json.loads((src / "config.json").read_text())
    # the Flax folder holds the transformed layouts under the Flax per-layer paths
    with SafetensorsReader(tmp_path / "flax") as f, SafetensorsReader(src) as d:
        np.testing.assert_array_equal(
            f.get("transformer_blocks.1.ff.net.2.kernel"), d.get("transformer_blocks.1.ff.net.2.weight").T
        )
        np.testing.assert_array_equal(
            f.get("pos_embed.proj.kernel"), d.get("pos_embed.proj.weight").transpose(2, 3, 1, 0)
        )


def test_to_diffusers_output_loads_in_diffusers_with_same_forward(tmp_path, sd35m_dir):
    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    for f in sd35m_dir.iterdir():
        (pipe / "transformer" / f.name).write_bytes(f.read_bytes())
    to_flax(pipe, tmp_path / "flax", "sd3")  # a pipeline folder is accepted
    to_diffusers(tmp_path / "flax", tmp_path / "back", "sd3")
    ref = SD3Transformer2DModel.from_pretrained(sd35m_dir).eval()
    got = SD3Transformer2DModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        x = _inputs()
        torch.testing.assert_close(got(**x).sample, ref(**x).sample, rtol=0, atol=0)


def test_save_flax_and_read_flax_params(tmp_path, sd35m_dir):
    config, km, tensors = read_flax_params(sd35m_dir, "sd3")
    params = dict(tensors)
    assert set(params) == set(km.flax_keys()) and "awm_jax" not in config
    params.pop("pos_embed.pos_embed")  # optional: the Flax model recomputes the table
    save_flax(params, config, tmp_path / "flax", "sd3")
    _, _, again = read_flax_params(tmp_path / "flax", "sd3")
    again = dict(again)
    assert set(again) == set(params)
    for k, v in params.items():
        assert again[k].dtype == v.dtype and again[k].tobytes() == np.ascontiguousarray(v).tobytes(), k
    # a Flax folder written from a model (config without _class_name, no pos_embed buffer) converts to a
    # diffusers folder that diffusers loads: the buffer is recomputed from the config
    bare = {k: v for k, v in config.items() if not k.startswith("_")}
    save_flax(params, bare, tmp_path / "flax2", "sd3")
    to_diffusers(tmp_path / "flax2", tmp_path / "back", "sd3")
    assert json.loads((tmp_path / "back/config.json").read_text())["_class_name"] == "SD3Transformer2DModel"
    got = SD3Transformer2DModel.from_pretrained(tmp_path / "back").state_dict()
    ref = SD3Transformer2DModel.from_pretrained(sd35m_dir).state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6 if k == "pos_embed.pos_embed" else 0)


# ----------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------


def _rewrite(src: pathlib.Path, dst: pathlib.Path, edit) -> None:
    """Copy the diffusers folder ``src`` to ``dst`` with ``edit(tensors: dict)`` applied."""
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
            lambda t: t.pop("transformer_blocks.1.attn.to_k.weight"),
            r"missing .*'transformer_blocks\.1\.attn\.to_k\.weight' \(expected shape \(16, 16\)\)",
        ),
        (
            lambda t: t.__setitem__("extra.weight", np.zeros((3,), np.float32)),
            r"unexpected diffusers tensor.*'extra\.weight' \(3,\) in .*diffusion_pytorch_model\.safetensors",
        ),
        (
            lambda t: t.__setitem__("proj_out.weight", np.zeros((15, 16), np.float32)),
            r"'proj_out\.weight' in .*diffusion_pytorch_model\.safetensors has shape \(15, 16\), "
            r"expected \(16, 16\)",
        ),
    ],
    ids=["missing", "extra", "shape"],
)
def test_bad_diffusers_checkpoint_errors(tmp_path, sd35m_dir, edit, pattern):
    _rewrite(sd35m_dir, tmp_path / "bad", edit)
    with pytest.raises(ConversionError, match=pattern):
        to_flax(tmp_path / "bad", tmp_path / "flax", "sd3")
    assert not (tmp_path / "flax").exists()  # validated before anything is written


def test_bad_flax_folder_and_model_errors(tmp_path, sd35m_dir):
    with pytest.raises(ConversionError, match=r"unknown model 'sd4'; valid models: \[.*'sd3'.*\]"):
        to_flax(sd35m_dir, tmp_path / "x", "sd4")
    with pytest.raises(ConversionError, match="is a diffusers folder; this conversion needs an awm-jax Flax"):
        to_diffusers(sd35m_dir, tmp_path / "x", "sd3")
    config, _, tensors = read_flax_params(sd35m_dir, "sd3")
    params = dict(tensors)
    del params["transformer_blocks.0.attn2.to_out.0.kernel"]
    with pytest.raises(ConversionError, match=r"missing .*'transformer_blocks\.0\.attn2\.to_out\.0\.kernel'"):
        save_flax(params, config, tmp_path / "flax", "sd3")
    with pytest.raises(ConversionError, match="is the source folder"):
        to_flax(sd35m_dir, sd35m_dir, "sd3")
    with pytest.raises(ConversionError, match="no config.json"):
        to_flax(tmp_path, tmp_path / "y", "sd3")
    assert get_converter("sd3") is sd3


def test_cli_round_trip_and_error(tmp_path, sd35m_dir, capsys):
    tool = [sys.executable, str(ROOT / "tools/convert_weights.py")]
    r = subprocess.run(
        [
            *tool,
            "to-flax",
            "--model",
            "sd3",
            "--src",
            str(sd35m_dir),
            "--dst",
            str(tmp_path / "f"),
            "--max-shard-size",
            "20KB",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "f").glob("model-*-of-*.safetensors"))) > 1
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import convert_weights
    finally:
        sys.path.pop(0)
    rc = convert_weights.main(
        ["to-diffusers", "--model", "nope", "--src", str(tmp_path / "f"), "--dst", str(tmp_path / "d")]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("error: unknown model 'nope'; valid models: [")
        and "'sd3'" in err[0]
    )


# ----------------------------------------------------------------------------------------------------
# load_transformer
# ----------------------------------------------------------------------------------------------------


@nnx.jit
def _forward(model, x):
    return model(**x)


def _rel_err(got, ref) -> float:
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def sd35m_ref(sd35m_dir):
    """Reference diffusers output on a non-square latent that exercises the pos-embed crop."""
    x = _inputs(seed=1, h=8, w=6)
    with torch.no_grad():
        ref = SD3Transformer2DModel.from_pretrained(sd35m_dir).eval()(**x).sample.double().numpy()
    return {k: v.numpy() for k, v in x.items()}, ref


def test_load_transformer_from_diffusers_and_pipeline_folder(tmp_path, sd35m_dir, sd35m_ref):
    from awm_jax.models import SD3Transformer2DModel as FlaxSD3
    from awm_jax.models import load_transformer, transformer_params

    x, ref = sd35m_ref
    model = load_transformer(sd35m_dir)
    assert isinstance(model, FlaxSD3) and model.config.dual_attention_layers == (0,)
    err = _rel_err(_forward(model, x), ref)
    assert err <= 1e-5, err
    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    for f in sd35m_dir.iterdir():
        (pipe / "transformer" / f.name).write_bytes(f.read_bytes())
    a, b = transformer_params(model), transformer_params(load_transformer(pipe))
    with SafetensorsReader(sd35m_dir) as r:
        np.testing.assert_array_equal(
            a["transformer_blocks.0.attn.to_q.kernel"], r.get("transformer_blocks.0.attn.to_q.weight").T
        )
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_load_transformer_from_flax_folder_scanned_with_lora(tmp_path, sd35m_dir, sd35m_ref):
    from awm_jax.models import LoRAConfig, LoRAParam, load_transformer, transformer_params

    x, ref = sd35m_ref
    to_flax(sd35m_dir, tmp_path / "flax", "sd3")
    model = load_transformer(tmp_path / "flax", scan_layers=True, lora=LoRAConfig(rank=2, alpha=2.0))
    lora = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam))}
    a_mats = [v for p, v in lora.items() if p[-1] == "lora_a"]
    b_mats = [v for p, v in lora.items() if p[-1] == "lora_b"]
    assert a_mats and all(float(np.abs(a).max()) > 0 for a in a_mats)  # really initialised, not abstract
    assert all(float(np.abs(b).max()) == 0 for b in b_mats)
    err = _rel_err(_forward(model, x), ref)
    assert err <= 1e-5, err
    params = transformer_params(model)  # unstacked back to per-layer paths, LoRA excluded
    _, _, tensors = read_flax_params(sd35m_dir, "sd3")
    want = {k: v for k, v in tensors if k != "pos_embed.pos_embed"}
    assert params.keys() == want.keys() and all(np.array_equal(params[k], want[k]) for k in want)


def test_load_transformer_dtypes_and_config_mismatch(tmp_path):
    from awm_jax.models import load_transformer, transformer_params

    src = tmp_path / "bf16"
    _tiny(SD35M_LIKE, torch.bfloat16).save_pretrained(src)
    model = load_transformer(src, dtype="bfloat16", param_dtype="bfloat16")
    assert model.dtype == "bfloat16"
    params = transformer_params(model)
    with SafetensorsReader(src) as r:
        w = r.get("transformer_blocks.1.attn.add_k_proj.weight")
        got = params["transformer_blocks.1.attn.add_k_proj.kernel"]
        assert got.dtype == w.dtype and np.array_equal(got, w.T)  # bf16 stored -> bf16 params, bit-exact
    assert transformer_params(load_transformer(src))["proj_out.bias"].dtype == np.float32
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, sample_size=16)))  # table no longer matches
    with pytest.raises(ConversionError, match="pos_embed.pos_embed differs from the sin-cos table"):
        load_transformer(src)
