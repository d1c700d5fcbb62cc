"""Forward-pass benchmark: Flax NNX MMDiT (jitted) vs diffusers ``SD3Transformer2DModel`` (eager, compiled).

Builds a random diffusers transformer from a size preset, converts it with the project's own loader
(``save_pretrained`` to a temp dir + ``awm_jax.models.load_transformer``), checks parity, then times the
forward at the given batch / resolution: JAX ``jit`` vs PyTorch eager vs ``torch.compile``; medians of
``--runs`` calls after ``--warmup`` calls; prints a table with ratios and appends a JSON line to
``benchmarks/results/mmdit_forward.jsonl``::

    python benchmarks/mmdit_forward.py --preset small --runs 5          # CPU
    python benchmarks/mmdit_forward.py --preset sd35m --device cuda --dtype bf16   # GPU machine

Presets: ``tiny`` (smoke test), ``small`` (4 layers, width 384, SD3.5 text dims, 256 px -> 256 image
tokens + 205 text tokens; fits a CPU), ``sd35m`` (the full SD3.5 Medium config; GPU only).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as U  # noqa: E402

# resolution in pixels (latent = resolution / 8); seq = text tokens (SD3.5: 77 CLIP + 128 T5 in AWM)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        config=dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                    caption_projection_dim=16, pooled_projection_dim=24, pos_embed_max_size=16,
                    qk_norm="rms_norm", dual_attention_layers=(0,)),
        resolution=64, seq_len=8, batch=2),
    "small": dict(
        config=dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
                    attention_head_dim=64, num_attention_heads=6, joint_attention_dim=4096,
                    caption_projection_dim=384, pooled_projection_dim=2048, pos_embed_max_size=64,
                    qk_norm="rms_norm", dual_attention_layers=(0, 1)),
        resolution=256, seq_len=205, batch=2),
    "sd35m": dict(
        config=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                    qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
        resolution=512, seq_len=205, batch=2),
}
VAE_FACTOR = 8


def preset(name: str) -> dict[str, Any]:
    """The preset ``name`` (clear error for unknown names)."""
    if name not in PRESETS:
        raise ValueError(f"unknown --preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


def build_torch_transformer(name: str, seed: int = 0):
    """Random diffusers ``SD3Transformer2DModel`` of preset ``name`` (fp32, eval mode).

    Default torch init, with the norm scales moved away from 1 so the parity check exercises them."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**preset(name)["config"]).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith(".weight") and p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def convert_to_flax(torch_model, dtype: str = "fp32", tmpdir: str | None = None):
    """Flax model from the torch one via the project's loader (``save_pretrained`` + ``load_transformer``)."""
    from awm_jax.models import load_transformer

    jdt = U.jax_dtype(dtype)
    with tempfile.TemporaryDirectory(dir=tmpdir) as d:
        torch_model.save_pretrained(d)
        return load_transformer(d, dtype=jdt, param_dtype=jdt)


def make_inputs(name: str, batch: int, resolution: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 inputs ``{hidden_states (B,C,h,w), encoder_hidden_states (B,T,D), pooled (B,P),
    timestep (B,) in 0..1000}`` for ``resolution`` pixels."""
    cfg = preset(name)["config"]
    if resolution % (VAE_FACTOR * cfg["patch_size"]):
        raise ValueError(f"--resolution {resolution} must be a multiple of {VAE_FACTOR * cfg['patch_size']}")
    lat = resolution // VAE_FACTOR
    limit = cfg["pos_embed_max_size"] * cfg["patch_size"]
    if lat > limit:
        raise ValueError(f"--resolution {resolution}: latent {lat} exceeds preset {name!r}'s pos_embed limit "
                         f"{limit} (max {limit * VAE_FACTOR} px)")
    rs = np.random.RandomState(seed)
    return {
        "hidden_states": rs.randn(batch, cfg["in_channels"], lat, lat).astype(np.float32),
        "encoder_hidden_states": rs.randn(batch, seq_len, cfg["joint_attention_dim"]).astype(np.float32),
        "pooled_projections": rs.randn(batch, cfg["pooled_projection_dim"]).astype(np.float32),
        "timestep": rs.uniform(0, 1000, size=(batch,)).astype(np.float32),
    }


def jax_forward_fn(flax_model):
    """``(fn, state)``: a jitted pure ``fn(state, x, ctx, pooled, t)`` over the split model state."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(flax_model)

    @jax.jit
    def fn(st, x, ctx, pooled, t):
        return nnx.merge(graphdef, st)(x, ctx, pooled, t)

    return fn, state


def torch_forward(model, inputs, dtype, device):
    """diffusers forward (no grad) on torch tensors ``inputs`` (already on ``device``)."""
    import torch

    with torch.inference_mode():
        return model(**inputs, return_dict=False)[0]


def run_benchmark(preset_name: str = "tiny", *, batch: int | None = None, resolution: int | None = None,
                  seq_len: int | None = None, dtype: str = "fp32", runs: int = 5, warmup: int = 2,
                  compile: bool = True, device: str = "cpu", seed: int = 0, out: str | None = None,
                  torch_threads: int | None = None, verbose: bool = True,
                  attention: str = "auto") -> dict[str, Any]:
    """Parity + timings of one forward; returns (and appends to ``out``) the result record. ``attention``: the
    Flax model's kernel (``model.attention``: auto|xla|splash|cudnn).

    The record holds ``parity_rel_max_err`` (Flax vs diffusers, same dtype), ``jax`` / ``torch_eager`` /
    ``torch_compile`` timing dicts (``median_s``, ``min_s``, ``first_s``, ``times_s`` or ``error``),
    ``ratio_eager`` / ``ratio_compile`` (torch median / jax median) and ``machine``."""
    import jax
    import jax.numpy as jnp
    import torch

    from awm_jax.models.attention import resolve, set_attention

    p = preset(preset_name)
    batch, resolution = batch or p["batch"], resolution or p["resolution"]
    seq_len = seq_len or p["seq_len"]
    dev, tdt, jdt = U.torch_device(device), U.torch_dtype(dtype), U.jax_dtype(dtype)
    U.set_torch_threads(torch_threads)

    tm = build_torch_transformer(preset_name, seed)
    fm = set_attention(convert_to_flax(tm, dtype), attention)
    tm = tm.to(device=dev, dtype=tdt)
    inp = make_inputs(preset_name, batch, resolution, seq_len, seed + 1)
    t_in = {k: torch.from_numpy(v).to(dev, tdt if k != "timestep" else torch.float32) for k, v in inp.items()}
    j_in = [jnp.asarray(inp[k], jdt if k != "timestep" else jnp.float32)
            for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")]

    fn, state = jax_forward_fn(fm)
    t0 = time.perf_counter()
    j_out = np.asarray(fn(state, *j_in).astype(jnp.float32))
    jax_first = time.perf_counter() - t0  # includes tracing + XLA compile
    t_out = torch_forward(tm, t_in, tdt, dev).float().cpu().numpy()
    err = U.rel_max_err(j_out, t_out)
    finite = bool(np.isfinite(j_out).all() and np.isfinite(t_out).all())

    rec: dict[str, Any] = {
        "bench": "mmdit_forward", "preset": preset_name, "config": p["config"], "batch": batch,
        "resolution": resolution, "latent": resolution // VAE_FACTOR, "seq_len": seq_len, "dtype": dtype,
        "image_tokens": (resolution // VAE_FACTOR // p["config"]["patch_size"]) ** 2,
        "n_params": sum(x.numel() for x in tm.parameters()), "parity_rel_max_err": err, "finite": finite,
        "runs": runs, "warmup": warmup, "attention": resolve(attention, jdt),
    }
    rec["jax"] = U.time_calls(lambda: fn(state, *j_in), runs, warmup, jax.block_until_ready)
    rec["jax"]["first_s"] = jax_first
    sync = lambda r: U.torch_sync(dev)  # noqa: E731
    rec["torch_eager"] = U.time_calls(lambda: torch_forward(tm, t_in, tdt, dev), runs, warmup, sync)
    if compile:
        def call(m):
            with torch.inference_mode():
                return m(**t_in, return_dict=False)[0]
        rec["torch_compile"] = U.torch_compile_timing(tm, call, runs, warmup, sync)
    return U.finish_record(rec, dev, out, report if verbose else None)


def report(rec: dict[str, Any]) -> str:
    """Human-readable summary (header + markdown timing table) of a result record."""
    rows = [dict(impl=k, **rec[k]) for k in ("jax", "torch_eager", "torch_compile") if k in rec]
    m = rec["machine"]
    head = (f"{rec['bench']} preset={rec['preset']} B={rec['batch']} {rec['resolution']}px "
            f"(latent {rec['latent']}, {rec['image_tokens']} img tokens, {rec['seq_len']} txt) "
            f"{rec['dtype']} params={rec['n_params'] / 1e6:.1f}M\n"
            f"parity rel max err (flax vs diffusers) = {rec['parity_rel_max_err']:.3g}\n"
            f"jax {m['jax']} on {m['jax_backend']} ({m['jax_device_kind']}), torch {m['torch']} on "
            f"{m['torch_device']} ({m['torch_threads']} threads), {m['cpu_count']} CPUs")
    return head + "\n" + U.format_table(rows)


def main(argv=None) -> dict[str, Any]:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--resolution", type=int, default=None, help="pixels (latent = resolution / 8)")
    ap.add_argument("--seq-len", type=int, default=None, help="text tokens")
    U.add_common_args(ap)
    a = ap.parse_args(argv)
    return run_benchmark(a.preset, batch=a.batch, resolution=a.resolution, seq_len=a.seq_len, dtype=a.dtype,
                         runs=a.runs, warmup=a.warmup, compile=not a.no_compile, device=a.device, seed=a.seed,
                         out=U.out_path(a.out, "mmdit_forward"), torch_threads=a.torch_threads,
                         attention=a.attention)


if __name__ == "__main__":
    main()
