"""FLUX.1 LoRA export to diffusers: the peft LoRA folder and the merged weights reproduce the Flax LoRA model
(tiny random dev-variant ``FluxTransformer2DModel``), bad modules raise; smoke test of
``benchmarks/memory_plan.py`` on a tiny config.

The torch oracle runs with correctly rounded timestep frequencies (``tests.flux_oracle``, the same
patch as ``tests/test_flux_model.py``): torch's float32 CPU ``exp`` is off by 1 ulp for a few frequencies,
which the random models turn into ~1e-5 of the output at guidance 3.5.
"""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import torch
from flax import nnx

from awm_jax import export as ex
from awm_jax.convert import ConversionError, read_flax_params, save_flax, to_diffusers
from awm_jax.convert import lora_export as le
from awm_jax.models import load_transformer, transformer_params
from awm_jax.models.flux import FLUX_LORA_TARGETS
from awm_jax.models.lora import LoRAConfig, LoRAParam
from tests.flux_oracle import oracle

CFG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6),
           guidance_embeds=True)
INFO = dict(model="flux", rank=4, alpha=8.0, base_model="tiny-flux", algorithm="awm", reward="toy_geneval",
            step=5, which="policy")
TOL = 1e-5
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _key(path):
    return ".".join(str(getattr(p, "key", p)) for p in path)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _inputs(seed=0):
    rs = np.random.RandomState(seed)
    h2, w2, t_len = 2, 3, 5
    img = np.zeros((h2, w2, 3), np.float32)
    img[..., 1], img[..., 2] = np.arange(h2)[:, None], np.arange(w2)[None, :]
    return dict(hidden_states=rs.randn(2, h2 * w2, CFG["in_channels"]).astype(np.float32),
                encoder_hidden_states=rs.randn(2, t_len, CFG["joint_attention_dim"]).astype(np.float32),
                pooled_projections=rs.randn(2, CFG["pooled_projection_dim"]).astype(np.float32),
                timestep=np.array([0.25, 0.875], np.float32), img_ids=img.reshape(-1, 3),
                txt_ids=np.zeros((t_len, 3), np.float32), guidance=np.array([3.5, 1.5], np.float32))


def _torch_out(m, inputs):
    kw = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with oracle():
        return m.eval()(**kw, return_dict=False)[0].numpy()


def _torch_model(path):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    root = tmp_path_factory.mktemp("flux_export")
    torch.manual_seed(0)
    tm = FluxTransformer2DModel(**CFG)
    with torch.no_grad():  # away from diffusers' init (zero / unit tensors) so every mapping matters
        for k, p in tm.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if k.endswith(".weight") and p.ndim == 1
                    else 0.2 * torch.randn_like(p))
    tm.save_pretrained(root / "base")
    model_config = {k: v for k, v in dict(tm.config).items() if not k.startswith("_")}
    lora_cfg = LoRAConfig(rank=4, alpha=8, target_modules=FLUX_LORA_TARGETS)
    model = load_transformer(root / "base", lora=lora_cfg)
    rng = np.random.default_rng(0)
    lora = {}
    for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        if p[-1] == "lora_b":
            v[...] = rng.normal(0, 0.3, v.shape).astype(np.float32)
        lora[_key(p)] = np.asarray(v[...])
    le.save_flax_lora(lora, INFO, root / "ckpt")
    inputs = _inputs()
    ref = np.asarray(nnx.jit(lambda m, kw: m(**kw))(model, inputs))
    return root, model, model_config, lora, inputs, ref


def test_peft_lora_parity(setup):
    root, _, model_config, lora, inputs, ref = setup
    mods = {k.rpartition(".")[0] for k in lora}
    assert "single_transformer_blocks.1.proj_out" in mods and "transformer_blocks.0.ff_context.net.2" in mods
    assert "proj_out" not in mods and not any("norm" in m for m in mods)  # read-out / adaLN stay frozen
    dst = ex.export_peft_lora(root / "ckpt", root / "peft", model_config=model_config, model="flux")
    assert (dst / le.PEFT_WEIGHTS).is_file()
    m = _torch_model(root / "base")
    base = _torch_out(m, inputs)
    m.load_lora_adapter(str(dst), prefix="transformer", weight_name=le.PEFT_WEIGHTS)
    out = _torch_out(m, inputs)
    err = _rel(out, ref)
    print(f"FLUX peft LoRA parity: rel max err {err:.2e} (adapter effect {_rel(base, ref):.2e})")
    assert _rel(base, ref) > 1e-3  # the adapters matter
    assert err <= TOL, err
    card = (dst / "README.md").read_text()
    assert "base_model: tiny-flux" in card and "rank: 4" in card and "alpha: 8.0" in card
    # the default converter comes from the folder's info["model"]
    dst2 = ex.export_peft_lora(root / "ckpt", root / "peft2", model_config=model_config)
    from safetensors.numpy import load_file

    one, two = load_file(str(dst / le.PEFT_WEIGHTS)), load_file(str(dst2 / le.PEFT_WEIGHTS))
    assert sorted(one) == sorted(two) and all(np.array_equal(one[k], two[k]) for k in one)
    assert len(one) == len(lora) and "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" in one


def test_merged_parity_api(setup):
    """merge_lora on the loaded model's base params -> save_flax -> to_diffusers reproduces the LoRA model."""
    root, model, model_config, lora, inputs, ref = setup
    merged = le.merge_lora(transformer_params(model), lora, INFO["rank"], INFO["alpha"])
    save_flax(merged, model_config, root / "merged_flax", "flux")
    to_diffusers(root / "merged_flax", root / "merged_api", "flux")
    err = _rel(_torch_out(_torch_model(root / "merged_api"), inputs), ref)
    print(f"FLUX merged (API) parity: rel max err {err:.2e}")
    assert err <= TOL, err


def test_merged_parity_cli(setup):
    from tools.convert_weights import main

    root, _, _, _, inputs, ref = setup
    assert main(["to-diffusers", "--model", "flux", "--src", str(root / "base"),
                 "--dst", str(root / "merged"), "--merge-lora", str(root / "ckpt")]) == 0
    err = _rel(_torch_out(_torch_model(root / "merged"), inputs), ref)
    print(f"FLUX merged (CLI) parity: rel max err {err:.2e}")
    assert err <= TOL, err
    assert "which: policy" in (root / "merged" / "README.md").read_text()
    # the CLI's base read and the loaded model's base params agree
    _, _, tensors = read_flax_params(root / "base", "flux")
    assert set(dict(tensors)) == set(transformer_params(setup[1]))


def test_bad_module_raises(setup):
    root, _, model_config, lora, _, _ = setup
    d = CFG["num_attention_heads"] * CFG["attention_head_dim"]
    for mod in ("single_transformer_blocks.0.nope", "transformer_blocks.5.attn.to_q"):
        bad = dict(lora, **{f"{mod}.lora_a": np.zeros((d, 4), np.float32),
                            f"{mod}.lora_b": np.zeros((4, d), np.float32)})
        with pytest.raises(ConversionError, match=f"LoRA module '{mod}' is not a Linear in the flux key map"):
            le.lora_to_peft(bad, model_config, 4, 8.0, "flux")
    bad = dict(lora, **{"single_transformer_blocks.0.norm.lora_a": np.zeros((d, 4), np.float32),
                        "single_transformer_blocks.0.norm.lora_b": np.zeros((4, d), np.float32)})
    le.save_flax_lora(bad, INFO, root / "bad_ckpt")
    with pytest.raises(ConversionError, match="'single_transformer_blocks.0.norm' is not a Linear"):
        ex.export_peft_lora(root / "bad_ckpt", root / "bad_peft", model_config=model_config, model="flux")
    assert not (root / "bad_peft" / le.PEFT_WEIGHTS).exists()


# ------------------------------------------------------------------------------------ memory plan (smoke)


def _plan_module():
    path = ROOT / "benchmarks" / "memory_plan.py"
    spec = importlib.util.spec_from_file_location("_bench_flux_memory_plan", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    return mod


def test_flux_memory_plan_tiny():
    plan = _plan_module()
    rows = plan.memory_plan(CFG, rank=4, alpha=8.0, meshes=[(1, 1, 1), (8, 1, 1), (1, 8, 1), (1, 4, 2)])
    by = {r["mesh"]: r for r in rows}
    one = by[(1, 1, 1)]
    base, lora = plan.abstract_shapes(CFG, 4, 8.0)
    n_base = sum(int(np.prod(s)) for s in base.values())
    assert one["n_base"] == n_base and one["n_lora"] == sum(int(np.prod(s)) for s in lora.values())
    assert one["base_fp32"] == 4 * n_base and one["base_bf16"] == 2 * n_base
    assert one["adam_lora"] == 2 * one["lora"] and one["ema_lora"] == 2 * one["lora"]
    assert one["lora"] > 0 and one["adam_full"] == 2 * one["base_fp32"]
    assert by[(8, 1, 1)]["base_fp32"] == one["base_fp32"]  # data parallel replicates
    assert one["base_fp32"] / 8 <= by[(1, 8, 1)]["base_fp32"] < one["base_fp32"]  # fsdp shards (mostly)
    assert by[(1, 4, 2)]["base_fp32"] < by[(1, 8, 1)]["base_fp32"] * 2
    text = plan.markdown(rows, "tiny", rank=4, alpha=8.0, headroom=0.3)
    assert "| (1, 8, 1) |" in text and "logical_to_spec" in text
    assert plan.min_fsdp(rows, "lora", 16e9, 0.3) == (1, 1, 1)  # a tiny model fits anywhere



def test_memory_plan_of_another_family():
    """``--family zimage``: the same rule on a tiny Z-Image (the family's builder and LoRA targets)."""
    plan = _plan_module()
    tiny = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16,
                rope_theta=256.0, t_scale=1000.0, axes_dims=(4, 6, 6), axes_lens=(64, 32, 32))
    rows = plan.memory_plan(tiny, rank=4, alpha=8.0, meshes=[(1, 1, 1), (1, 2, 1)], family="zimage")
    base, lora = plan.abstract_shapes(tiny, 4, 8.0, family="zimage")
    assert rows[0]["n_base"] == sum(int(np.prod(s)) for s in base.values()) and rows[0]["n_lora"] > 0
    assert any("attention.to_q" in k for k in lora)  # the Z-Image family's LoRA targets
    assert rows[1]["base_fp32"] < rows[0]["base_fp32"]  # fsdp shards its weights
