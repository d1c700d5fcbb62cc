"""One-run GPU suite for full-size SD3.5-M shapes (random weights): Flax/JAX vs diffusers + PyTorch eager and
``torch.compile`` in the same process; writes one JSON and a markdown table::

    python benchmarks/gpu_suite.py --out-dir benchmarks/results/gpu   # one H100/H200: sd35m, bf16, cuda
    python benchmarks/gpu_suite.py --dry                              # CPU: tiny preset, same code path

Parts (each the project's benchmark of that piece, called in process): the transformer forward at 512 px,
B = 8 (``mmdit_forward.run_benchmark``: parity with diffusers, medians, peak memory where the backend
reports it) and the 14-step rollout at B = 24 (``sampler_rollout.run_benchmark``: the Euler ODE scan vs
a PyTorch loop). Not in the suite yet:
the AWM (LoRA r 32, K = 6) and Flow-GRPO train steps against a PyTorch step, and MFU against the chip's
dense bf16 peak (the TPU planner, ``python -m awm_jax.plan``, gives XLA's FLOPs for the same programs).
``--dry`` runs the tiny preset in fp32 on the CPU without ``torch.compile`` (seconds; the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmdit_forward as F  # noqa: E402
import sampler_rollout as R  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_suite(dry: bool, out_dir: str, runs: int = 3) -> dict:
    """Run the parts; write ``gpu_suite.json`` and ``gpu_suite.md`` in ``out_dir``; return the record."""
    common = dict(dtype="fp32", device="cpu", out=None, verbose=False) if dry else dict(
        dtype="bf16", device="cuda", out=None, verbose=True)
    preset = "tiny" if dry else "sd35m"
    t0 = time.time()
    parts = {
        "forward": F.run_benchmark(preset, batch=2 if dry else 8, resolution=None if dry else 512,
                                   runs=1 if dry else runs, warmup=1, compile=not dry, **common),
        "rollout_14": R.run_benchmark(preset, steps=14, batch=2 if dry else 24,
                                      resolution=None if dry else 512, runs=1 if dry else runs, warmup=1,
                                      **common),
    }
    rec = {"suite": "gpu_suite", "dry": dry, "preset": preset, "wall_s": time.time() - t0, "parts": parts,
           "pending": ["awm_train_step", "flow_grpo_train_step", "mfu"]}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_suite.json"), "w") as f:
        json.dump(rec, f, indent=1, default=str)
    lines = ["| part | impl | median s | torch / jax | parity rel max err |", "|---|---|---:|---:|---:|"]
    for name, p in parts.items():
        jax_s = p["jax"]["median_s"]
        for impl in ("jax", "torch_eager", "torch_compile"):
            if impl in p:
                s = p[impl]["median_s"]
                lines.append(f"| {name} | {impl} | {s:.4g} | {s / jax_s:.2f} | "
                             f"{p.get('parity_rel_max_err', float('nan')):.3g} |")
    with open(os.path.join(out_dir, "gpu_suite.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rec


def main(argv=None) -> dict:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU, tiny preset, fp32, no torch.compile")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results", "gpu"))
    a = ap.parse_args(argv)
    rec = run_suite(a.dry, a.out_dir, a.runs)
    print(open(os.path.join(a.out_dir, "gpu_suite.md")).read())
    return rec


if __name__ == "__main__":
    main()
