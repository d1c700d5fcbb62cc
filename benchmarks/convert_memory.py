"""Peak host memory of the weight converter on a multi-GB synthetic SD3.5M- or FLUX.1-dev-shaped checkpoint.

Writes (streaming, in a temp dir) a random diffusers checkpoint: ``--model sd3`` an fp16
``SD3Transformer2DModel`` with the full SD3.5 Medium width (24 heads x 64, joint dim 4096, pooled 2048,
pos_embed_max_size 384, rms qk norm, dual attention) but fewer layers; ``--model flux`` a bf16
``FluxTransformer2DModel`` with the full FLUX.1-dev width (24 heads x 128, joint dim 4096, pooled 768,
guidance embedding) but fewer double / single blocks; as ONE ``diffusion_pytorch_model.safetensors``; then
runs ``tools/convert_weights.py to-flax`` and ``to-diffusers`` as child processes under
``/usr/bin/time -v`` (peak RSS), checks the round trip is bit-exact, writes the numbers to
``benchmarks/results/convert_memory.md`` and deletes the temp files.

    python benchmarks/convert_memory.py [--layers 14] [--keep]
    python benchmarks/convert_memory.py --model flux --layers 2 --single-layers 4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from awm_jax.convert import get_converter  # noqa: E402
from awm_jax.convert.io import SafetensorsReader, total_bytes, write_config, write_sharded  # noqa: E402

SD35M = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
}


FLUX1_DEV = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 64,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}


def model_config(model: str, layers: int, single_layers: int) -> tuple[dict, np.dtype]:
    """(diffusers config, storage dtype) of the synthetic checkpoint."""
    if model == "flux":
        import ml_dtypes

        cfg = dict(FLUX1_DEV, num_layers=layers, num_single_layers=single_layers)
        return cfg, np.dtype(ml_dtypes.bfloat16)
    dual = list(range(min(13, layers - 1)))
    return dict(SD35M, num_layers=layers, dual_attention_layers=dual), np.dtype(np.float16)


def write_checkpoint(dst: pathlib.Path, model: str, layers: int, single_layers: int = 0) -> int:
    """Stream a random diffusers checkpoint; returns its size in bytes."""
    config, dtype = model_config(model, layers, single_layers)
    km = get_converter(model).key_map(config)
    entries = [(r.diffusers_key, dtype, r.diffusers_shape) for r in km.rules]
    rng = np.random.default_rng(0)

    def get(key):
        shape = km.by_diffusers[key].diffusers_shape
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    meta = {"format": "pt"}
    write_sharded(dst, "diffusion_pytorch_model", entries, get, max_shard_bytes=2**40, metadata=meta)
    write_config(dst, config)
    return total_bytes(entries)


def timed(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of ``cmd`` run under ``/usr/bin/time -v``."""
    t0 = time.time()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{r.stdout}\n{r.stderr}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return kb / 1024, wall


def digest(path: pathlib.Path) -> dict[str, str]:
    """{key: dtype + sha1 of bytes} of every tensor of a checkpoint folder."""
    with SafetensorsReader(path) as r:
        return {k: f"{r.dtype(k)}:{hashlib.sha1(r.get(k).tobytes()).hexdigest()}" for k in r.keys()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd3", choices=("sd3", "flux"))
    ap.add_argument("--layers", type=int, default=14, help="(double-stream) blocks")
    ap.add_argument("--single-layers", type=int, default=4, help="flux: single-stream blocks")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--out", default=None,
                    help="markdown output (default benchmarks/results/convert_memory[_flux].md)")
    args = ap.parse_args()
    suffix = "" if args.model == "sd3" else f"_{args.model}"
    args.out = args.out or str(ROOT / f"benchmarks/results/convert_memory{suffix}.md")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="awm_convert_mem_"))
    tool = [sys.executable, str(ROOT / "tools/convert_weights.py")]
    try:
        t0 = time.time()
        size = write_checkpoint(tmp / "diffusers", args.model, args.layers, args.single_layers)
        t_write = time.time() - t0
        base_rss, _ = timed([sys.executable, "-c", "import awm_jax.convert"])
        rows = []
        for name, src, dst in (("to-flax", "diffusers", "flax"), ("to-diffusers", "flax", "roundtrip")):
            cmd = [*tool, name, "--model", args.model, "--src", str(tmp / src), "--dst", str(tmp / dst)]
            rss, wall = timed(cmd)
            rows.append((name, rss, wall))
        exact = digest(tmp / "diffusers") == digest(tmp / "roundtrip")
        n_out = len(list((tmp / "flax").glob("*.safetensors")))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    gib = size / 2**30
    config, dtype = model_config(args.model, args.layers, args.single_layers)
    km = get_converter(args.model).key_map(config)
    largest = max(int(np.prod(r.diffusers_shape)) for r in km.rules) * dtype.itemsize / 2**20
    what = (f"SD3.5M-width checkpoint (fp16, {args.layers} layers" if args.model == "sd3" else
            f"FLUX.1-dev-width checkpoint (bf16, {args.layers} double + {args.single_layers} single blocks")
    cmd_line = f"python benchmarks/convert_memory.py --model {args.model} --layers {args.layers}" + (
        f" --single-layers {args.single_layers}" if args.model == "flux" else "")
    lines = [
        "# Converter peak host memory",
        "",
        f"Synthetic {what}, one "
        f"`diffusion_pytorch_model.safetensors`): **{gib:.2f} GiB**, largest tensor {largest:.0f} MiB, "
        f"written in {t_write:.0f}s. "
        f"Flax output: {n_out} shard(s) of <= 2 GB. Round trip bit-exact: **{exact}**.",
        f"Peak RSS of a bare `python -c 'import awm_jax.convert'` (baseline): {base_rss:.0f} MiB.",
        "",
        "| direction | checkpoint | peak RSS | RSS / checkpoint | wall |",
        "|---|---|---|---|---|",
    ]
    for name, rss, wall in rows:
        lines.append(f"| {name} | {gib:.2f} GiB | {rss:.0f} MiB | {rss / 1024 / gib:.3f}x | {wall:.1f} s |")
    lines += [
        "",
        "Measured with `/usr/bin/time -v` on the CLI (`tools/convert_weights.py`) as a child process,",
        f"`{cmd_line}`, on the 2-core CPU dev machine",
        "(shared with other jobs; wall times are indicative). The converter validates every header first,",
        "then reads, transforms and writes one tensor at a time, so peak RSS ~ interpreter + largest tensor.",
        "",
        "```json",
        json.dumps({"bytes": size, "rows": rows, "exact": exact}),
        "```",
    ]
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not exact:
        sys.exit(1)


if __name__ == "__main__":
    main()
