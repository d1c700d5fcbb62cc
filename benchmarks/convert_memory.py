"""Peak host memory of the weight converter on a multi-GB synthetic SD3.5M-shaped checkpoint.

Writes (streaming, in a temp dir) a random fp16 diffusers ``SD3Transformer2DModel`` checkpoint with the
full SD3.5 Medium width (24 heads x 64, joint dim 4096, pooled 2048, pos_embed_max_size 384, rms qk norm,
dual attention) but fewer layers, as ONE ``diffusion_pytorch_model.safetensors`` like the released
model; then runs ``tools/convert_weights.py to-flax`` and ``to-diffusers`` as child processes under
``/usr/bin/time -v`` (peak RSS), checks the round trip is bit-exact, writes the numbers to
``benchmarks/results/convert_memory.md`` and deletes the temp files.

    python benchmarks/convert_memory.py [--layers 14] [--keep]
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

from awm_jax.convert import sd3  # noqa: E402
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


def write_checkpoint(dst: pathlib.Path, layers: int) -> int:
    """Stream a random fp16 diffusers checkpoint; returns its size in bytes."""
    config = dict(SD35M, num_layers=layers, dual_attention_layers=list(range(min(13, layers - 1))))
    km = sd3.key_map(config)
    entries = [(r.diffusers_key, np.dtype(np.float16), r.diffusers_shape) for r in km.rules]
    rng = np.random.default_rng(0)

    def get(key):
        shape = km.by_diffusers[key].diffusers_shape
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

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
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/convert_memory.md"))
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="awm_convert_mem_"))
    tool = [sys.executable, str(ROOT / "tools/convert_weights.py")]
    try:
        t0 = time.time()
        size = write_checkpoint(tmp / "diffusers", args.layers)
        t_write = time.time() - t0
        base_rss, _ = timed([sys.executable, "-c", "import awm_jax.convert"])
        rows = []
        for name, src, dst in (("to-flax", "diffusers", "flax"), ("to-diffusers", "flax", "roundtrip")):
            cmd = [*tool, name, "--model", "sd3", "--src", str(tmp / src), "--dst", str(tmp / dst)]
            rss, wall = timed(cmd)
            rows.append((name, rss, wall))
        exact = digest(tmp / "diffusers") == digest(tmp / "roundtrip")
        n_out = len(list((tmp / "flax").glob("*.safetensors")))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    gib = size / 2**30
    lines = [
        "# Converter peak host memory",
        "",
        f"Synthetic SD3.5M-width checkpoint (fp16, {args.layers} layers, one "
        f"`diffusion_pytorch_model.safetensors`): **{gib:.2f} GiB**, written in {t_write:.0f}s. "
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
        f"`python benchmarks/convert_memory.py --layers {args.layers}`, on the 2-core CPU dev machine",
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
