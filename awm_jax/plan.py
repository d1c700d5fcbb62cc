"""Compile-only rehearsal of a TPU run: ``python -m awm_jax.plan --config configs/NAME.py --topology v5e:4x4
[--config.a.b=V ...]``.

Builds the transformer from abstract shapes (``nnx.eval_shape``: no weights), the run's ``(data, fsdp,
tensor)`` mesh over the devices of ``jax.experimental.topologies.get_topology_desc(platform="tpu",
topology_name=...)`` (libtpu compiles for a TPU topology on a machine without TPUs), and AOT-compiles the
real train step and rollout (``awm_jax.rl.train_step``) for one optimizer step's batch. Prints per chip
XLA's memory analysis (arguments, outputs, temporaries, generated code) and cost analysis (FLOPs, bytes
accessed, estimated seconds where XLA gives them). XLA counts a loop body once (scanned layers, the sampler's
steps, the micro-batch scan), so the FLOPs of the whole program come from its jaxpr (``awm_jax.flops``, trip
counts included); the estimated time is XLA's for the XLA part, scaled by the ratio of the two counts, plus
the custom kernels' (Pallas splash attention: XLA cannot cost a Mosaic call) FLOPs, counted from their shapes,
at the chip's peak; MFU is the model FLOPs (the same step traced without remat and with XLA attention: no
recomputation, no kernel padding) over that time and the chip's dense bf16 peak. Every figure is a model.
Exit 1 when a program needs more than the chip's HBM (the numbers are printed), 2 on bad input or without
libtpu (with how to install it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import warnings

__all__ = ["CHIPS", "TopologyError", "plan", "main"]

# Dense bf16 peak FLOP/s and HBM bytes per chip (Google Cloud TPU docs, "TPU v5e" / "TPU v5p" / "TPU v6e"
# system-architecture tables, checked 2026-12-03: 197 / 459 / 918 TFLOP/s bf16; HBM 16 / 95 / 32 GB, here
# as GiB; XLA's own limit is a little lower, e.g. 15.75 GiB usable on v5e, 95.74 GiB on v5p)
CHIPS = {"v5e": (197e12, 16 * 2**30), "v5p": (459e12, 95 * 2**30), "v6e": (918e12, 32 * 2**30)}
# HBM bandwidth per chip, bytes/s (same pages: 819 / 2765 / 1638 GB/s): the memory side of the roofline
HBM_BW = {"v5e": 819e9, "v5p": 2765e9, "v6e": 1638e9}


class TopologyError(RuntimeError):
    """No libtpu, or an unknown topology name."""


def _install_hint() -> str:
    import jax

    return f'libtpu is needed to compile for TPU topologies here: pip install "jax[tpu]=={jax.__version__}"'


def topology_devices(name: str):
    """The devices of TPU topology ``name`` (e.g. ``v5e:4x4``) through libtpu, without TPUs."""
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError(_install_hint())
    import os

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes (tests, helpers) may hold it
    from jax.experimental import topologies

    chip = name.split(":", 1)[0]
    if chip not in CHIPS or ":" not in name:
        raise TopologyError(f"--topology {name!r}: expected <chip>:<shape> with chip in {sorted(CHIPS)}, "
                            "e.g. v5e:4x4, v5p:2x2x1, v6e:2x4")
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu's error for an unknown shape / a broken install
        why = " ".join(str(e).split())[:300]
        raise TopologyError(f"--topology {name!r}: libtpu cannot describe it ({why}); "
                            f"{_install_hint()} if libtpu is missing or of another version") from e
    return chip, list(topo.devices)


def _text_shape(config, fam, cfg) -> tuple[int, int, int]:
    return fam.context_shape(config, cfg)


def _abstract_inputs(config, graphdef, fam, cfg, n: int, chunk: int):
    import jax
    import jax.numpy as jnp

    from awm_jax.rl.rollout import latent_shape_of

    shape = latent_shape_of(graphdef, config)
    tokens, dim, pdim = _text_shape(config, fam, cfg)
    f32 = jnp.float32
    key = jax.eval_shape(lambda: jax.random.key(0))
    emb = jax.ShapeDtypeStruct((n, tokens, dim), f32)
    pooled = jax.ShapeDtypeStruct((n, pdim), f32)
    adv = jax.ShapeDtypeStruct((n,), f32)
    if str(config.algorithm) == "awm":
        batch = {"x0": jax.ShapeDtypeStruct((n, *shape), f32), "prompt_embeds": emb, "pooled": pooled,
                 "advantages": adv}
    else:
        s = int(config.sample.num_steps)
        batch = {"latents": jax.ShapeDtypeStruct((n, s + 1, *shape), f32),
                 "log_probs": jax.ShapeDtypeStruct((n, s), f32),
                 "timesteps": jax.ShapeDtypeStruct((n, s), f32),
                 "next_timesteps": jax.ShapeDtypeStruct((n, s), f32), "prompt_embeds": emb, "pooled": pooled,
                 "advantages": adv}
    roll = (jax.ShapeDtypeStruct((chunk, tokens, dim), f32), jax.ShapeDtypeStruct((chunk, pdim), f32), key)
    neg = None
    if float(config.sample.guidance_scale) != 1.0:
        neg = (jnp.zeros((1, tokens, dim), f32), jnp.zeros((1, pdim), f32))
    return batch, key, roll, neg


def _analyse(compiled, peak: float, bandwidth: float, counted: float, model: float,
             kernel: float = 0.0) -> dict:
    """Per-chip figures of ``compiled``; ``counted`` / ``model``: the program's / the model's FLOPs per chip
    from the jaxpr (loop trip counts included; the model's without remat recomputation and with XLA attention
    at the real lengths); ``kernel``: the part of ``counted`` in custom (Pallas / Mosaic) kernels.

    Time model: XLA's time (``optimal_seconds`` where positive, else the roofline of its counts) covers the
    XLA part of one loop iteration and is scaled to the XLA part of the whole program (``counted - kernel``
    over XLA's FLOPs); custom kernels, whose cost XLA cannot see, are timed from their FLOPs at the chip's
    peak (a compute-bound floor, i.e. an optimistic figure for them). ``time_model`` says which applied."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    out = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) for k in
           ("argument", "output", "temp", "generated_code", "alias")}
    out["peak_bytes"] = out["argument"] + out["output"] + out["temp"] + out["generated_code"] - out["alias"]
    out["flops"] = float(cost.get("flops", 0.0))  # per chip (the SPMD program of one device)
    out["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    est = cost.get("optimal_seconds")
    out["optimal_seconds"] = float(est) if est is not None and float(est) > 0 else None
    roofline = max(out["flops"] / peak, out["bytes_accessed"] / bandwidth) if out["flops"] else None
    out["time_s"] = out["optimal_seconds"] or roofline
    out["time_source"] = ("xla optimal_seconds" if out["optimal_seconds"]
                          else "roofline max(flops/peak, bytes/HBM bandwidth)")
    # XLA's time covers its count (loop bodies once): scale it to the XLA part of the whole program
    xla_part = counted - kernel
    factor = max(1.0, xla_part / out["flops"]) if out["flops"] else None
    out["program_flops"], out["model_flops"], out["loop_factor"] = counted, model, factor
    out["kernel_flops"], out["kernel_s"] = kernel, kernel / peak
    xla_s = out["time_s"] * factor if factor and out["time_s"] else xla_part / peak
    out["est_s"] = xla_s + out["kernel_s"]
    out["compute_bound_s"] = counted / peak
    out["mfu"] = model / peak / out["est_s"]
    out["time_model"] = (f"XLA part: {out['time_source']} x {factor or 1:.3g} (loop trip counts)"
                         + (f"; custom kernels: {kernel:.3g} FLOPs (from shapes) at peak" if kernel else ""))
    return out


def loop_step_s(res: dict) -> float | None:
    """One loop step's estimate per chip (the rollout calls and the optimizer step; no decode or scoring)
    of a plan whose two programs compiled, else None."""
    t, r = res["train_step"], res["rollout"]
    if t.get("error") or r.get("error"):
        return None
    return res["rollout_calls"] * r["est_s"] + t["est_s"]


def plan(config, topology: str) -> dict:
    """Compile the train step and the rollout of ``config`` for ``topology``; return the per-chip figures."""
    from awm_jax import parallel
    from awm_jax.flops import traced_flops
    from awm_jax.models.family import get_family

    chip, devices = topology_devices(topology)
    peak, hbm = CHIPS[chip]
    fam = get_family(str(config.model.kind))
    arch = str(config.model.arch)
    cfg = fam.config_from_dict(fam.architecture(arch), source=f"config key model.arch = {arch!r}")
    mesh = parallel.config_mesh(config, devices=devices)
    n = int(config.data.prompts_per_step) * int(config.data.group_size)
    chunk = int(config.sample.batch_size) * len(devices)
    res = {"topology": topology, "chips": len(devices), "mesh": dict(mesh.shape), "peak_flops": peak,
           "hbm_bytes": hbm, "rollouts_per_step": n, "rollout_chunk": chunk,
           "rollout_calls": -(-n // chunk)}
    bw, chips = HBM_BW[chip], len(devices)
    from awm_jax.models.attention import resolve

    attention = str(config.model.attention)
    train, roll = _programs(config, fam, cfg, mesh, n, chunk, str(config.model.remat_policy), attention)
    # the model FLOPs of MFU: the same programs without remat recomputation and with XLA attention (the real,
    # unpadded lengths: a kernel's padding is work the chip does, not model FLOPs)
    model_train = model_roll = None
    kernel = resolve(attention, mesh=mesh) not in ("xla",)
    if str(config.model.remat_policy) != "none" or kernel:
        model_train, model_roll = _programs(config, fam, cfg, mesh, n, chunk, "none", "xla")
        model_train = traced_flops(*model_train).flops / chips
        model_roll = traced_flops(*model_roll).flops / chips if kernel else None
    res["attention"] = resolve(attention, mesh=mesh)
    with warnings.catch_warnings():
        # where a persistent compilation cache is on in this process (the trainer's, the test suite's), jax
        # finds a topology's executable there but cannot load it without a TPU client: it warns and compiles
        warnings.filterwarnings("ignore", message="Error reading persistent compilation cache entry")
        res["train_step"] = _compiled(train, peak, bw, chips, model_train)
        res["rollout"] = _compiled(roll, peak, bw, chips, model_roll)
    res["fits"] = all(res[k].get("error") is None and res[k]["peak_bytes"] <= hbm
                      for k in ("train_step", "rollout"))
    res["step_s"] = loop_step_s(res)
    return res


def _programs(config, fam, cfg, mesh, n: int, chunk: int, remat: str, attention: str):
    """``((train step, args), (rollout, args))``: the jitted programs and their abstract arguments."""
    import jax
    from flax import nnx

    from awm_jax.rl import train_step as ts

    model = nnx.eval_shape(lambda: fam.build(cfg, rngs=nnx.Rngs(0), dtype=ts._dtype(config.model.dtype),
                                             param_dtype=ts._dtype(config.model.param_dtype),
                                             scan_layers=bool(config.model.scan_layers), remat_policy=remat,
                                             attention=attention))
    graphdef, base_state, state = ts.create_train_state(model, config)
    batch, key, roll, neg = _abstract_inputs(config, graphdef, fam, cfg, n, chunk)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    step = ts.make_train_step(graphdef, config, mesh, negative=neg)
    rollout = ts.make_rollout_fn(graphdef, config, mesh, negative=neg)
    return (step, abstract, base_state, batch, key), (rollout, abstract.trainable, base_state, *roll)


def _compiled(program, peak: float, bandwidth: float, chips: int, model: float | None) -> dict:
    """:func:`_analyse` of the compiled ``(jitted, *args)``, or ``{"error": XLA's message}`` when XLA refuses
    it for lack of HBM (it states the bytes its temporaries need). ``model``: the model FLOPs per chip
    (None: the program's own count, a program without remat)."""
    import jax

    from awm_jax.flops import jaxpr_flops

    fn, *args = program
    t0 = time.perf_counter()
    traced = fn.trace(*args)
    count = jaxpr_flops(traced.jaxpr)
    counted, kernel = count.flops / chips, count.kernel_flops / chips
    model = model or counted
    try:
        compiled = traced.lower().compile()
        out = _analyse(compiled, peak, bandwidth, counted, model, kernel)
        out["compile_s"] = time.perf_counter() - t0
        return out
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"error": " ".join(str(e).split())[:400], "program_flops": counted, "model_flops": model}


def _fmt(res: dict) -> str:
    gib = 2**30
    lines = [f"plan for {res['topology']}: {res['chips']} chips, mesh {res['mesh']}, attention "
             f"{res['attention']}, "
             f"{res['rollouts_per_step']} rollouts per step ({res['rollout_calls']} rollout calls of "
             f"{res['rollout_chunk']}); per chip, HBM {res['hbm_bytes'] / gib:.1f} GiB, "
             f"peak {res['peak_flops'] / 1e12:.0f} TFLOP/s bf16"]
    for k in ("train_step", "rollout"):
        r = res[k]
        if r.get("error"):
            lines.append(f"  {k}: XLA refused it: {r['error']}")
            continue
        lines.append(f"  {k}: args {r['argument'] / gib:.2f} GiB, outputs {r['output'] / gib:.2f} GiB, temps "
                     f"{r['temp'] / gib:.2f} GiB, code {r['generated_code'] / gib:.3f} GiB -> peak "
                     f"{r['peak_bytes'] / gib:.2f} GiB; compiled in {r['compile_s']:.0f} s")
        lines.append(f"    FLOPs per chip: {r['program_flops']:.4g} (jaxpr, loops included), model "
                     f"{r['model_flops']:.4g}; XLA (loop bodies once): {r['flops']:.4g} FLOPs, "
                     f"{r['bytes_accessed']:.4g} bytes, {r['time_s']:.4g} s ({r['time_source']})")
        lines.append(f"    est. {r['est_s']:.4g} s ({r['time_model']}; compute-bound "
                     f"{r['compute_bound_s']:.4g} s); modeled MFU {100 * r['mfu']:.1f}%")
    if res["fits"]:
        lines.append(f"fits; one loop step ~{res['step_s']:.4g} s per chip ({res['rollout_calls']} rollout "
                     "calls + the train step; decode, text encoding and scoring not included)")
    else:
        lines.append("DOES NOT FIT: a program needs more than the chip's HBM")
    return "\n".join(lines)


def main(argv=None) -> int:
    """CLI; returns 0 (fits), 1 (over memory), 2 (bad input / no libtpu)."""
    from awm_jax import config_lib
    from awm_jax.accel_env import allow_shared_libtpu, lock_message

    allow_shared_libtpu()  # before any backend starts: beside other JAX processes (libtpu's lockfile)
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m awm_jax.plan", description=__doc__.split("\n")[0])
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:4x4, v5p:2x2x1, v6e:2x4")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("--host-cores-per-chip", type=float, default=0.0,
                   help="host vCPUs per chip for the reward budget (0: assumed per chip type)")
    args, rest = p.parse_known_args(argv)
    try:
        path, _, overrides = config_lib.parse_args(rest + ["--workdir", "plan"])
        config = config_lib.load_config(path)
        config_lib.apply_overrides(config, overrides)
        config_lib.validate(config)
        res = plan(config, args.topology)
    except (config_lib.ConfigError, RuntimeError, ValueError) as e:
        lock = "lockfile" in str(e)  # libtpu's "ABORTED: ... lockfile": one line naming who holds it
        if not (lock or isinstance(e, (config_lib.ConfigError, TopologyError, ValueError))):
            raise
        print(f"error: {lock_message() if lock else ' '.join(str(e).split())}", file=sys.stderr)
        return 2
    from awm_jax import reward_budget  # host scoring seconds per step beside the device estimate

    res["reward_budget"] = reward_budget.budget(config, res, args.host_cores_per_chip)
    print(_fmt(res) + "\n" + reward_budget.fmt(res["reward_budget"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if res["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
