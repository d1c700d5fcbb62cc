"""Sampler rollout benchmark: jitted ``lax.scan`` Euler ODE (``awm_jax.sampling.sample_ode``) over the Flax
MMDiT vs a PyTorch Python loop over the diffusers model (same SD3 shifted grid, same initial noise).

Parity: relative max error of the final latents.  Timing: medians of whole rollouts after warm-up,
ratio torch / jax (> 1: JAX faster)::

    python benchmarks/sampler_rollout.py --preset small --steps 10 --runs 3
    python benchmarks/sampler_rollout.py --preset sd35m --steps 10 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as U  # noqa: E402
import mmdit_forward as F  # noqa: E402


def _velocity(graphdef, x, t, context):
    """Flax MMDiT as a sampler ``velocity_fn(x, t in [0,1], (state, ctx, pooled))``."""
    from flax import nnx

    state, ctx, pooled = context
    return nnx.merge(graphdef, state)(x.astype(ctx.dtype), ctx, pooled, 1000.0 * t)


def torch_rollout(model, x, ctx, pooled, grid):
    """Euler ODE loop over ``grid`` (t = 1 -> 0) with the diffusers model; returns float32 latents."""
    import torch

    x = x.float()
    with torch.inference_mode():
        for t, t_next in zip(grid[:-1], grid[1:]):
            tb = torch.full((x.shape[0],), 1000.0 * float(t), device=x.device)
            v = model(hidden_states=x.to(ctx.dtype), encoder_hidden_states=ctx, pooled_projections=pooled,
                      timestep=tb, return_dict=False)[0]
            x = x + (float(t_next) - float(t)) * v.float()
    return x


def run_benchmark(preset_name: str = "tiny", *, steps: int = 10, shift: float = 3.0,
                  batch: int | None = None, resolution: int | None = None, seq_len: int | None = None,
                  dtype: str = "fp32", runs: int = 3, warmup: int = 1, device: str = "cpu", seed: int = 0,
                  out: str | None = None,
                  torch_threads: int | None = None, verbose: bool = True,
                  attention: str = "auto") -> dict[str, Any]:
    """Parity + timings of an ``steps``-step rollout; returns (and appends to ``out``) the result record.
    ``attention``: the Flax model's kernel (``model.attention``)."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from awm_jax.sampling import sample_ode
    from awm_jax.sampling.schedules import shifted_grid

    p = F.preset(preset_name)
    batch, resolution = batch or p["batch"], resolution or p["resolution"]
    seq_len = seq_len or p["seq_len"]
    dev, tdt, jdt = U.torch_device(device), U.torch_dtype(dtype), U.jax_dtype(dtype)
    U.set_torch_threads(torch_threads)

    tm = F.build_torch_transformer(preset_name, seed)
    from awm_jax.models.attention import resolve, set_attention

    fm = set_attention(F.convert_to_flax(tm, dtype), attention)
    tm = tm.to(device=dev, dtype=tdt)
    inp = F.make_inputs(preset_name, batch, resolution, seq_len, seed + 1)
    grid = np.asarray(shifted_grid(steps, shift), np.float32)

    graphdef, state = nnx.split(fm)
    vfn = functools.partial(_velocity, graphdef)
    jctx = (state, jnp.asarray(inp["encoder_hidden_states"], jdt),
            jnp.asarray(inp["pooled_projections"], jdt))
    jx, jgrid = jnp.asarray(inp["hidden_states"]), jnp.asarray(grid)
    tx = torch.from_numpy(inp["hidden_states"]).to(dev)
    tctx = torch.from_numpy(inp["encoder_hidden_states"]).to(dev, tdt)
    tpool = torch.from_numpy(inp["pooled_projections"]).to(dev, tdt)

    def jrun():
        return sample_ode(vfn, jx, jgrid, jctx)

    def trun():
        return torch_rollout(tm, tx, tctx, tpool, grid)

    t0 = time.perf_counter()
    j_out = np.asarray(jrun())
    jax_first = time.perf_counter() - t0
    t_out = trun().cpu().numpy()
    rec: dict[str, Any] = {
        "bench": "sampler_rollout", "preset": preset_name, "steps": steps, "shift": shift, "batch": batch,
        "resolution": resolution, "latent": resolution // F.VAE_FACTOR, "seq_len": seq_len, "dtype": dtype,
        "image_tokens": (resolution // F.VAE_FACTOR // p["config"]["patch_size"]) ** 2,
        "n_params": sum(x.numel() for x in tm.parameters()),
        "parity_rel_max_err": U.rel_max_err(j_out, t_out),
        "finite": bool(np.isfinite(j_out).all() and np.isfinite(t_out).all()), "runs": runs, "warmup": warmup,
        "attention": resolve(attention, jdt),
    }
    rec["jax"] = U.time_calls(jrun, runs, warmup, jax.block_until_ready)
    rec["jax"]["first_s"] = jax_first
    rec["torch_eager"] = U.time_calls(trun, runs, warmup, lambda r: U.torch_sync(dev))
    rec["ratio_eager"] = U.ratio(rec["torch_eager"]["median_s"], rec["jax"]["median_s"])
    rec["machine"] = U.machine_info(dev)
    U.append_jsonl(out, rec)
    if verbose:
        m = rec["machine"]
        print(f"sampler_rollout preset={preset_name} {steps} Euler steps B={batch} {resolution}px "
              f"(latent {rec['latent']}, {rec['image_tokens']} img tokens, {seq_len} txt) {dtype}\n"
              f"parity rel max err of final latents (flax vs diffusers) = {rec['parity_rel_max_err']:.3g}\n"
              f"jax {m['jax']} on {m['jax_backend']}, torch {m['torch']} on {m['torch_device']} "
              f"({m['torch_threads']} threads), {m['cpu_count']} CPUs\n"
              + U.format_table([dict(impl=k, **rec[k]) for k in ("jax", "torch_eager")]))
    return rec


def main(argv=None) -> dict[str, Any]:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", choices=sorted(F.PRESETS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--resolution", type=int, default=None, help="pixels (latent = resolution / 8)")
    ap.add_argument("--seq-len", type=int, default=None)
    U.add_common_args(ap)
    a = ap.parse_args(argv)
    if not a.no_compile:
        print("note: sampler_rollout times torch eager only (--no-compile implied)")
    return run_benchmark(a.preset, steps=a.steps, shift=a.shift, batch=a.batch, resolution=a.resolution,
                         seq_len=a.seq_len, dtype=a.dtype, runs=a.runs, warmup=a.warmup, device=a.device,
                         seed=a.seed, out=U.out_path(a.out, "sampler_rollout"), torch_threads=a.torch_threads,
                         attention=a.attention)


if __name__ == "__main__":
    main()
