"""VAE decode benchmark: Flax ``AutoencoderKL.decode`` (jitted) vs diffusers ``AutoencoderKL.decode``.

Random diffusers VAE with the SD3.5 Medium architecture (16 latent channels, block_out_channels
(128, 256, 512, 512), 2 layers per block, no quant convs), converted with the project's loader
(``save_pretrained`` + ``awm_jax.models.load_vae``); parity of the decoded images, then timings
(JAX jit vs torch eager vs ``torch.compile``), medians after warm-up, ratios, JSONL record::

    python benchmarks/vae_decode.py --size 128 --batch 2              # CPU
    python benchmarks/vae_decode.py --size 512 --device cuda --dtype bf16
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

_DOWN, _UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
PRESETS: dict[str, dict[str, Any]] = {
    "sd35m": dict(in_channels=3, out_channels=3, down_block_types=[_DOWN] * 4, up_block_types=[_UP] * 4,
                  block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16,
                  norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                  use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True),
    "tiny": dict(in_channels=3, out_channels=3, down_block_types=[_DOWN] * 2, up_block_types=[_UP] * 2,
                 block_out_channels=[16, 32], layers_per_block=1, latent_channels=16, norm_num_groups=8,
                 sample_size=32, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                 use_post_quant_conv=False, mid_block_add_attention=True),
}


def build_torch_vae(name: str, seed: int = 0):
    """Random diffusers ``AutoencoderKL`` of preset ``name`` (fp32, eval), norm scales moved away from 1."""
    import torch
    from diffusers import AutoencoderKL

    if name not in PRESETS:
        raise ValueError(f"unknown --preset {name!r}; choose from {sorted(PRESETS)}")
    torch.manual_seed(seed)
    vae = AutoencoderKL(**PRESETS[name]).eval()
    with torch.no_grad():
        for key, p in vae.named_parameters():
            if key.endswith(".weight") and p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return vae


def run_benchmark(preset_name: str = "sd35m", *, size: int = 128, batch: int = 2, dtype: str = "fp32",
                  runs: int = 5, warmup: int = 2, compile: bool = True, device: str = "cpu", seed: int = 0,
                  out: str | None = None, torch_threads: int | None = None, verbose: bool = True) -> dict:
    """Parity + decode timings at ``size`` pixels; returns (and appends to ``out``) the result record."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from awm_jax.models import load_vae

    dev, tdt, jdt = U.torch_device(device), U.torch_dtype(dtype), U.jax_dtype(dtype)
    U.set_torch_threads(torch_threads)
    tv = build_torch_vae(preset_name, seed)
    factor = 2 ** (len(PRESETS[preset_name]["block_out_channels"]) - 1)
    if size % factor:
        raise ValueError(f"--size {size} must be a multiple of the VAE factor {factor}")
    with tempfile.TemporaryDirectory() as d:
        tv.save_pretrained(d)
        fv = load_vae(d, dtype=jdt, param_dtype=jdt)
    tv = tv.to(device=dev, dtype=tdt)
    z = np.random.RandomState(seed + 1).randn(batch, 16, size // factor, size // factor).astype(np.float32)
    zt = torch.from_numpy(z).to(dev, tdt)
    zj = jnp.asarray(z, jdt)

    graphdef, state = nnx.split(fv)

    @jax.jit
    def decode(st, lat):
        return nnx.merge(graphdef, st).decode(lat)

    def tdecode(m=tv):
        with torch.inference_mode():
            return m.decode(zt, return_dict=False)[0]

    t0 = time.perf_counter()
    j_out = np.asarray(decode(state, zj).astype(jnp.float32))
    jax_first = time.perf_counter() - t0
    t_out = tdecode().float().cpu().numpy()
    rec: dict[str, Any] = {
        "bench": "vae_decode", "preset": preset_name, "batch": batch, "resolution": size,
        "latent": size // factor, "dtype": dtype, "n_params": sum(p.numel() for p in tv.decoder.parameters()),
        "parity_rel_max_err": U.rel_max_err(j_out, t_out),
        "finite": bool(np.isfinite(j_out).all() and np.isfinite(t_out).all()), "runs": runs, "warmup": warmup,
    }
    rec["jax"] = U.time_calls(lambda: decode(state, zj), runs, warmup, jax.block_until_ready)
    rec["jax"]["first_s"] = jax_first
    sync = lambda r: U.torch_sync(dev)  # noqa: E731
    rec["torch_eager"] = U.time_calls(tdecode, runs, warmup, sync)
    if compile:
        rec["torch_compile"] = U.torch_compile_timing(
            tv.decode, lambda f: _compiled_call(f, zt), runs, warmup, sync)
    return U.finish_record(rec, dev, out, report if verbose else None)


def _compiled_call(f, zt):
    import torch

    with torch.inference_mode():
        return f(zt, return_dict=False)[0]


def report(rec: dict[str, Any]) -> str:
    """Header + markdown timing table of a result record."""
    rows = [dict(impl=k, **rec[k]) for k in ("jax", "torch_eager", "torch_compile") if k in rec]
    m = rec["machine"]
    return (f"vae_decode preset={rec['preset']} B={rec['batch']} {rec['resolution']}px "
            f"(latent {rec['latent']}) "
            f"{rec['dtype']} decoder params={rec['n_params'] / 1e6:.1f}M\n"
            f"parity rel max err (flax vs diffusers) = {rec['parity_rel_max_err']:.3g}\n"
            f"jax {m['jax']} on {m['jax_backend']} ({m['jax_device_kind']}), torch {m['torch']} on "
            f"{m['torch_device']} ({m['torch_threads']} threads), {m['cpu_count']} CPUs\n"
            + U.format_table(rows))


def main(argv=None) -> dict[str, Any]:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="sd35m", choices=sorted(PRESETS))
    ap.add_argument("--size", type=int, default=128, help="image pixels (latent = size / 8)")
    ap.add_argument("--batch", type=int, default=2)
    U.add_common_args(ap)
    a = ap.parse_args(argv)
    return run_benchmark(a.preset, size=a.size, batch=a.batch, dtype=a.dtype, runs=a.runs, warmup=a.warmup,
                         compile=not a.no_compile, device=a.device, seed=a.seed,
                         out=U.out_path(a.out, "vae_decode"), torch_threads=a.torch_threads)


if __name__ == "__main__":
    main()
