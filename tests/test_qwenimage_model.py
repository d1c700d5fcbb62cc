"""Parity of the Flax NNX Qwen-Image transformer with diffusers' ``QwenImageTransformer2DModel`` (tiny random
model: several grids, text lengths and masks, batch 2), the scanned layout, the key map's bit-exact round trip
through ``tools/convert_weights.py`` and ``load_transformer`` recognising the folder."""

import numpy as np
import pytest
import torch
from flax import nnx

from awm_jax.models import detect_family, load_transformer, transformer_params
from awm_jax.models.qwenimage import QwenImageConfig, QwenImageTransformer2DModel
from awm_jax.models.stacking import stack_state
from awm_jax.parallel import LOGICAL_AXIS_RULES
from tests.flux_oracle import oracle

TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
# (token grid h x w, text length, per-sample valid text lengths or None): non-square, odd sizes (the MSRoPE
# centring), masked padding
CASES = [((2, 3), 7, None), ((3, 2), 9, (9, 4)), ((4, 4), 5, (3, 5))]
FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffusers import QwenImageTransformer2DModel as TorchQwen

    torch.manual_seed(0)
    tm = TorchQwen(**TINY).eval()
    with torch.no_grad():
        for k, p in tm.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if k.endswith(".weight") and p.ndim == 1
                    else 0.12 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("qwenimage") / "transformer"
    tm.save_pretrained(path)
    return path, tm


def _inputs(grid, t_len, lens, seed):
    rs = np.random.RandomState(seed)
    x = rs.randn(2, grid[0] * grid[1], TINY["in_channels"]).astype(np.float32)
    c = rs.randn(2, t_len, TINY["joint_attention_dim"]).astype(np.float32)
    mask = None if lens is None else np.arange(t_len)[None] < np.asarray(lens)[:, None]
    return x, c, mask, np.array([0.3, 0.8], np.float32)


def _ref(tm, grid, x, c, mask, t):
    with oracle():  # correctly rounded timestep frequencies, as the Flax model has (tests/flux_oracle.py)
        return tm(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(c),
                  encoder_hidden_states_mask=None if mask is None else torch.from_numpy(mask),
                  timestep=torch.from_numpy(t), img_shapes=[[(1, *grid)]] * 2, return_dict=False)[0].numpy()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_fp32_parity_scan_and_names(folder):
    path, tm = folder
    assert detect_family(path).name == "qwenimage"
    fm = load_transformer(path)  # through the key map
    assert isinstance(fm, QwenImageTransformer2DModel)
    for i, (grid, t_len, lens) in enumerate(CASES):
        x, c, mask, t = _inputs(grid, t_len, lens, i)
        out = nnx.jit(lambda m, x, c, k, t, g=grid: m(x, c, k, t, img_shapes=[(1, *g)]))(fm, x, c, mask, t)
        ref = _ref(tm, grid, x, c, mask, t)
        assert out.shape == ref.shape == (2, grid[0] * grid[1], 4 * TINY["out_channels"])
        err = _rel(out, ref)
        print(f"[grid {grid} T={t_len} lens {lens}] fp32 rel max err {err:.2e}")
        assert err <= FP32_TOL, (grid, t_len, lens, err)
    # scanned layers (remat): same output; every parameter carries logical axis names
    cfg = fm.config
    sm = nnx.eval_shape(lambda: QwenImageTransformer2DModel(cfg, rngs=nnx.Rngs(0), scan_layers=True,
                                                            remat_policy="dots_saveable"))
    nnx.update(sm, stack_state(nnx.state(fm), get_stacks(cfg)))
    x, c, mask, t = _inputs(*CASES[1], seed=9)
    run = nnx.jit(lambda m, x, c, k, t: m(x, c, k, t, img_shapes=[(1, 3, 2)]))
    assert _rel(run(sm, x, c, mask, t), run(fm, x, c, mask, t)) <= 1e-6
    names = {n for n, _ in LOGICAL_AXIS_RULES} | {None}
    for p, v in nnx.to_flat_state(nnx.state(sm)):
        meta = v.get_metadata().get("out_sharding")
        assert meta is not None and len(meta) == len(v.shape) and set(meta) <= names, (p, meta)


def get_stacks(cfg):
    from awm_jax.models.qwenimage import stacks

    return stacks(cfg)


def test_convert_round_trip_and_errors(folder, tmp_path):
    from awm_jax.convert.io import SafetensorsReader
    from tools.convert_weights import main

    path, _ = folder
    assert main(["to-flax", "--model", "qwenimage", "--src", str(path), "--dst", str(tmp_path / "flax")]) == 0
    assert main(["to-diffusers", "--model", "qwenimage", "--src", str(tmp_path / "flax"),
                 "--dst", str(tmp_path / "back")]) == 0
    assert detect_family(tmp_path / "flax").name == "qwenimage"
    a = transformer_params(load_transformer(path))
    b = transformer_params(load_transformer(tmp_path / "flax"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert "transformer_blocks.1.img_mod.linear.kernel" in a
    with SafetensorsReader(path) as r0, SafetensorsReader(tmp_path / "back") as r1:
        assert sorted(r0.keys()) == sorted(r1.keys())
        assert all(r0.get(k).tobytes() == r1.get(k).tobytes() for k in r0.keys())
    assert main(["to-flax", "--model", "zimage", "--src", str(path), "--dst", str(tmp_path / "x")]) == 2
    for bad, match in ((dict(zero_cond_t=True), "zero_cond_t"), (dict(axes_dims_rope=(4, 6, 8)), "axes_dims"),
                       (dict(bogus=1), "unknown")):
        with pytest.raises(ValueError, match=match):
            QwenImageConfig.from_dict(dict(TINY, **bad))


def test_lora_export_into_diffusers(folder, tmp_path):
    """A Flax LoRA model (Flow-GRPO's Qwen-Image targets) -> peft folder -> diffusers ``load_lora_adapter``:
    same output; merged weights (``merge_lora``) too."""
    import jax.numpy as jnp
    from diffusers import QwenImageTransformer2DModel as TorchQwen

    from awm_jax.convert import lora_export as le
    from awm_jax.convert import read_flax_params, save_flax, to_diffusers
    from awm_jax.models.lora import LoRAConfig, LoRAParam
    from awm_jax.models.qwenimage import QWENIMAGE_LORA_TARGETS

    path, _ = folder
    fm = load_transformer(path, lora=LoRAConfig(rank=2, alpha=4.0, target_modules=QWENIMAGE_LORA_TARGETS))
    rs = np.random.RandomState(1)
    flat = [(p, v.replace(value=jnp.asarray(0.1 * rs.randn(*v.shape), jnp.float32)))
            for p, v in nnx.to_flat_state(nnx.state(fm, LoRAParam))]
    nnx.update(fm, nnx.from_flat_state(flat))
    params = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in flat}
    assert len(params) == 2 * 2 * len(QWENIMAGE_LORA_TARGETS)
    x, c, mask, t = _inputs(*CASES[1], seed=4)
    want = np.asarray(nnx.jit(lambda m, x, c, k, t: m(x, c, k, t, img_shapes=[(1, 3, 2)]))(fm, x, c, mask, t))
    info = dict(model="qwenimage", rank=2, alpha=4.0)
    config, _, tensors = read_flax_params(path, "qwenimage")
    dst = le.write_peft_lora(params, info, tmp_path / "peft", config, "qwenimage")
    tm = TorchQwen.from_pretrained(path)
    tm.load_lora_adapter(str(dst), prefix="transformer", weight_name=le.PEFT_WEIGHTS)
    assert _rel(_ref(tm.eval(), (3, 2), x, c, mask, t), want) <= FP32_TOL
    merged = le.merge_lora(dict(tensors), params, 2, 4.0)
    save_flax(merged, config, tmp_path / "merged_flax", "qwenimage")
    to_diffusers(tmp_path / "merged_flax", tmp_path / "merged", "qwenimage")
    tm2 = TorchQwen.from_pretrained(tmp_path / "merged").eval()
    assert _rel(_ref(tm2, (3, 2), x, c, mask, t), want) <= FP32_TOL
