"""CPU step-time benchmark of the jitted AWM and Flow-GRPO train steps (awm_jax.rl.train_step).

Runs a tiny SD3-architecture MMDiT (the toy world's transformer config by default) on 1 and 8 (virtual)
CPU devices, times ``--repeats`` steps after one compile/warm-up step and reports the median, plus the
process's memory high-water mark (``resource.getrusage`` maxrss).  Writes a markdown table to
``benchmarks/results/train_step.md``::

    python benchmarks/train_step_cpu.py [--samples 16] [--repeats 5] [--out benchmarks/results/train_step.md]
"""

from __future__ import annotations

import os

_FLAG = " --xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + _FLAG).strip()

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from awm_jax import config_lib, parallel  # noqa: E402
from awm_jax.models.mmdit import SD3Config, SD3Transformer2DModel  # noqa: E402
from awm_jax.rl import train_step as ts  # noqa: E402
from awm_jax.toy.world import DEFAULT_TRANSFORMER_CONFIG  # noqa: E402


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _config(algo: str, samples: int):
    path = os.path.join(ROOT, "configs", "toy.py" if algo == "awm" else "toy_flow_grpo.py")
    c = config_lib.load_config(path)
    c.train.micro_batch_size = samples  # one micro-batch per device shard
    return c


def _inputs(mcfg: SD3Config, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    emb = jnp.asarray(rng.normal(size=(n, 8, mcfg.joint_attention_dim)), jnp.float32)
    pooled = jnp.asarray(rng.normal(size=(n, mcfg.pooled_projection_dim)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=(n,)), jnp.float32)
    return emb, pooled, adv


def bench(algo: str, devices: int, samples: int, repeats: int, mcfg: SD3Config) -> dict:
    """Median step time (s) of ``algo`` on a ``data=devices`` mesh, after one warm-up (compile) step."""
    chex.clear_trace_counter()  # max_traces below counts traces of this setting only
    cfg = _config(algo, samples)
    model = SD3Transformer2DModel(mcfg, rngs=nnx.Rngs(0))
    g, base, state = ts.create_train_state(model, cfg)
    mesh = parallel.make_mesh(data=devices, devices=jax.devices()[:devices])
    emb, pooled, adv = _inputs(mcfg, samples)
    rollout = ts.make_rollout_fn(g, cfg, mesh)
    t0 = time.perf_counter()
    out = rollout(state.trainable, base, emb, pooled, jax.random.key(1))
    jax.block_until_ready(out)
    t_roll_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(rollout(state.trainable, base, emb, pooled, jax.random.key(2)))
    t_roll = time.perf_counter() - t0
    batch = {"prompt_embeds": emb, "pooled": pooled, "advantages": adv, **out}
    if algo != "awm":
        batch.pop("x0")
    step = ts.make_train_step(g, cfg, mesh, max_traces=1)
    t0 = time.perf_counter()
    state, m = step(state, base, batch, jax.random.key(0))
    jax.block_until_ready(m)
    t_compile = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        state, m = step(state, base, batch, jax.random.key(i + 1))
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    assert bool(m["finite"]), f"{algo}: non-finite step"
    return {"algo": algo, "devices": devices, "samples": samples, "median_s": statistics.median(times),
            "min_s": min(times), "first_s": t_compile, "rollout_s": t_roll, "rollout_first_s": t_roll_compile,
            "maxrss_mb": _maxrss_mb()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16, help="rollouts per optimizer step (N)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per setting (median reported)")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--algos", nargs="+", default=["awm", "flow_grpo"])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_step.md"))
    args = ap.parse_args(argv)
    mcfg = SD3Config.from_dict(dict(DEFAULT_TRANSFORMER_CONFIG))
    rows = []
    for algo in args.algos:
        for d in args.devices:
            r = bench(algo, d, args.samples, args.repeats, mcfg)
            print(r, flush=True)
            rows.append(r)
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    lines = [
        "# Train-step CPU benchmark (`benchmarks/train_step_cpu.py`)",
        "",
        f"Machine: {cpu} (shared with other jobs while measured), {platform.system()}, "
        f"jax {jax.__version__}; N virtual CPU devices via `--xla_force_host_platform_device_count`.",
        f"Model: the toy world's SD3 MMDiT ({mcfg.num_layers} layers, width {mcfg.inner_dim}, latent "
        f"{mcfg.in_channels}x{mcfg.sample_size}x{mcfg.sample_size}), fp32, LoRA r=4 on the attention "
        "projections.",
        "AWM: K=2 training times per sample (toy config), one optimizer step per call over all N rollouts; "
        "Flow-GRPO: 10-step SDE trajectory, first 9 steps trained, KL to the reference.",
        f"Median of {args.repeats} steps after one compile step; maxrss = process memory high-water mark "
        "so far.",
        "",
        "| algorithm | devices | N | step median (s) | step min (s) | first call incl. compile (s) "
        "| rollout (s) | rollout first call (s) | maxrss (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['algo']} | {r['devices']} | {r['samples']} | {r['median_s']:.3f} "
                     f"| {r['min_s']:.3f} "
                     f"| {r['first_s']:.1f} | {r['rollout_s']:.3f} | {r['rollout_first_s']:.1f} "
                     f"| {r['maxrss_mb']:.0f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
