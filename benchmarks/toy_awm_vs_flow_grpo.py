"""AWM vs Flow-GRPO on the embedded toy world: accuracy and reward against compute and wall-clock.

Trains ``configs/toy.py`` (AWM) and ``configs/toy_flow_grpo.py`` (Flow-GRPO; same base model, reward and
prompts) for several seeds, one workdir per run (``<root>/<algo>_s<seed>``, its output in
``<workdir>.log``), then compares the curves::

    python benchmarks/toy_awm_vs_flow_grpo.py --seeds 0 1 2 --jobs 2
    python benchmarks/toy_awm_vs_flow_grpo.py --seeds 0 1 2 --analyze-only   # re-read existing workdirs

**Compute: transformer forward-pass equivalents (FPE) per optimizer step**, from each run's saved
``config.json`` (machine independent; :func:`forward_pass_equivalents`).  One FPE = one transformer call on
one sample; a forward + backward pass counts 3; classifier-free guidance (``guidance_scale != 1``) doubles
every call it wraps (the model runs on ``[uncond; cond]``).  ``batch = prompts_per_step x group_size``.

- rollout (both): ``batch x sample.num_steps x (2 if sample.guidance_scale != 1 else 1)`` (ODE / SDE / CPS /
  SA-Solver all call the model once per sampling step).
- AWM training (``awm_jax.rl.losses.awm_loss_fn`` + ``awm_jax.rl.awm.awm_loss``): per sample and
  training time, the policy pass with gradient (3), the reference pass (LoRA B = 0) only if
  ``awm.beta != 0`` (+1), the kl-EMA pass only if ``awm.ema_beta != 0`` (+1), and off-policy
  (``awm.on_policy = False``) the ``logp_old`` pass with the kl-EMA adapter (+1, on-policy uses
  ``stopgrad(logp)`` of the policy pass): ``batch x awm.train_timesteps x (3 + ...)``.
- Flow-GRPO training (``awm_jax.rl.losses.grpo_loss_fn`` + ``awm_jax.rl.grpo.flow_grpo_step_loss``): per
  sample and trained sampling step (``int(sample.num_steps x flow_grpo.timestep_fraction)``) the policy
  pass (3) and the reference pass only if ``flow_grpo.beta != 0`` (+1), both with ``sample.guidance_scale``'s
  CFG (x2).
- Evaluation (40-step ODE on the held-out prompts) is NOT counted: it is the same for both algorithms.

**Wall-clock**: the x-axis is the *training* wall time: the sum over steps of ``batch / samples_per_s``
from ``metrics.jsonl`` (the trainer's per-step time: rollout + reward + train step; evaluation,
checkpointing and start-up excluded), with step 1 counted at the median step time: its excess (the
one-time JIT compile, 30-60 s on the 2-core CPU, which does not grow with training length) is reported
separately as ``first_step_excess_s``.  The trainer's cumulative ``wall_s``
(which includes the evaluations) is kept in the JSONL.  Across seeds the wall time at a step is the mean.

**Headline**: ``A*`` = Flow-GRPO's best seed-mean held-out strict GenEval ``overall`` accuracy over its eval
points; for each algorithm the first eval point whose seed-mean is >= ``A*`` (no interpolation), its FPE and
wall time; speedup = Flow-GRPO's / AWM's (or "not reached").  Outputs in ``--out``:
``toy_awm_vs_flow_grpo.{md,jsonl}`` and ``toy_awm_vs_flow_grpo_{accuracy,reward}.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import queue
import shlex
import subprocess
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as U  # noqa: E402
from _toy_compare_analysis import (  # noqa: E402, F401 (re-exported: the analysis API of the benchmark)
    DRIFT_KEYS,
    TOL,
    accuracy_points,
    aggregate,
    analyze,
    drift_table,
    final_accuracy,
    first_reach,
    headline,
    reward_points,
    speedup,
    stability,
    sweep_summary,
)
from _toy_compare_report import (  # noqa: E402
    ALGOS,
    LABELS,
    NAME,
    plot_curves,
    plot_drift,
    write_jsonl,
    write_report,
)

# THE method table: name -> (label, config file, config overrides). Add a method (e.g. another objective's
# configs/toy_<objective>.py) with one line here; workdirs are cached per (method, lr, seed).
METHODS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "awm": ("AWM", "configs/toy.py", ("optim.lr=1e-3", "reward.kwargs.strict=false")),  # the partial score
    "flow_grpo": ("Flow-GRPO", "configs/toy_flow_grpo.py", ()),
    "flow_grpo_2step": ("Flow-GRPO, 2 steps/epoch", "configs/toy_flow_grpo.py", ("train.steps_per_epoch=2",)),
    "nft": ("DiffusionNFT", "configs/toy_nft.py", ()),
    "elbo_reinforce": ("ELBO REINFORCE", "configs/toy_elbo_reinforce.py", ()),
    "elbo_grpo": ("ELBO GRPO", "configs/toy_elbo_grpo.py", ()),
}
CONFIGS = {m: v[1] for m, v in METHODS.items()}
LABELS.update({m: v[0] for m, v in METHODS.items()})
PINNED_ENV = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
PINNED_ENV.update(dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), "1"))
FINE = "_fine"  # <workdir>_fine: the run's first steps again with eval.every = 1 (--fine-start)


# ----------------------------------------------------------------------------- compute accounting


def _get(cfg: dict, dotted: str):
    for k in dotted.split("."):
        cfg = cfg[k]
    return cfg


def forward_pass_equivalents(config: dict) -> dict[str, int]:
    """Transformer forward-pass equivalents of ONE optimizer step of the run configured by ``config`` (the
    nested dict of a workdir's ``config.json``): ``{"rollout", "train", "total"}`` (module docstring)."""
    batch = int(_get(config, "data.prompts_per_step")) * int(_get(config, "data.group_size"))
    num_steps = int(_get(config, "sample.num_steps"))
    rollout = batch * num_steps * (2 if float(_get(config, "sample.guidance_scale")) != 1.0 else 1)
    algo = str(config["algorithm"])
    if algo in ("awm", "nft", "elbo_reinforce", "elbo_grpo"):  # K clean-sample times (docs/objectives.md)
        ref = int(float(_get(config, "awm.beta")) != 0)
        ema = int(float(_get(config, "awm.ema_beta")) != 0)
        if algo == "awm":
            per = 3 + ref + ema + int(not bool(_get(config, "awm.on_policy")))
        elif algo == "nft":
            per = 3 + 1 + ref + ema  # + the old policy's velocity
        elif algo == "elbo_reinforce":
            per = 3 + ref + ema
        else:  # elbo_grpo: the old policy's pass also serves the kl-EMA term
            per = 3 + 1 + ref
        train = batch * int(_get(config, "awm.train_timesteps")) * per
    elif algo == "flow_grpo":
        s_train = int(num_steps * float(_get(config, "flow_grpo.timestep_fraction")))
        ref = int(float(_get(config, "flow_grpo.beta")) != 0)
        if float(_get(config, "sample.guidance_scale")) == 1.0:
            per = 3 + ref
        else:  # [uncond; cond] in one call: a detached uncond half is forward only (1), else fwd + bwd (3)
            detach = bool(_get(config, "flow_grpo").get("cfg_detach_uncond", False))
            per = 3 + (1 if detach else 3) + 2 * ref
        train = batch * s_train * per
    else:
        raise ValueError(f"config algorithm {algo!r}: expected one of {ALGOS}")
    return {"rollout": rollout, "train": train, "total": rollout + train}


# ----------------------------------------------------------------------------- running


def run_key(method: str, lr: str | None) -> str:
    """The key of a (method, lr) pair in curves and reports: ``method`` or ``method@lr``."""
    return method if lr is None else f"{method}@{lr}"


def workdir_of(root: str, method: str, seed: int, lr: str | None = None) -> str:
    """``<root>/<method>_s<seed>`` or ``<root>/<method>_lr<lr>_s<seed>`` (absolute): one cached workdir per
    (method, lr, seed)."""
    name = f"{method}_s{seed}" if lr is None else f"{method}_lr{lr}_s{seed}"
    return os.path.abspath(os.path.join(root, name))


def is_done(workdir: str) -> bool:
    """Whether ``workdir`` holds a finished run (its last metrics step reached its config's max_steps)."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            max_steps = int(json.load(f)["max_steps"])
        recs = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    except (OSError, ValueError, KeyError):
        return False
    return bool(recs) and max(int(r["step"]) for r in recs) >= max_steps


def train_command(method: str, workdir: str, seed: int, max_steps: int | None, sets: list[str],
                  lr: str | None = None) -> list[str]:
    """The ``python -m awm_jax.train`` command of one run (the method's config and overrides, then ``lr``,
    then ``sets``: ``KEY=VALUE`` config overrides)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} unknown; expected one of {sorted(METHODS)}")
    _, config, over = METHODS[method]
    cmd = [sys.executable, "-m", "awm_jax.train", "--config", config, "--workdir", workdir]
    cmd.append(f"--config.seed={seed}")
    if max_steps is not None:
        cmd.append(f"--config.max_steps={max_steps}")
    for kv in (*over, *((f"optim.lr={lr}",) if lr is not None else ()), *sets):
        if "=" not in kv:
            raise ValueError(f"--set {kv!r}: expected KEY=VALUE")
        cmd.append(f"--config.{kv}")
    return cmd


def _run_one(name: str, cmd: list[str], log_path: str, cores: queue.Queue | None) -> None:
    core = None if cores is None else cores.get()
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if core is not None:
            cmd = ["taskset", "-c", str(core), *cmd]
            env.update(PINNED_ENV)
        where = "" if core is None else f" on core {core}"
        print(f"[{NAME}] start {name}{where}: {shlex.join(cmd)}", flush=True)
        with open(log_path, "w") as log:
            rc = subprocess.run(cmd, cwd=U.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"run {name} failed with exit code {rc}; see its log {log_path}")
        print(f"[{NAME}] done {name}", flush=True)
    finally:
        if core is not None:
            cores.put(core)


def run_all(runs: list[dict], jobs: int) -> None:
    """Run ``runs`` (dicts with ``name``, ``cmd``, ``workdir``), ``jobs`` at a time; raise on the first
    failure (pending runs are cancelled, running ones finish)."""
    if jobs not in (1, 2):
        raise ValueError(f"--jobs must be 1 or 2, got {jobs}")
    cores = None
    if jobs == 2:
        cores = queue.Queue()
        for i in range(jobs):
            cores.put(i)
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futs = [pool.submit(_run_one, r["name"], r["cmd"], r["workdir"] + ".log", cores) for r in runs]
        try:
            for f in cf.as_completed(futs):
                f.result()
        except BaseException:
            for f in futs:
                f.cancel()
            raise


# ----------------------------------------------------------------------------- loading and curves


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_run(workdir: str) -> dict[str, Any]:
    """``{"workdir", "config", "metrics", "evals"}`` of a trainer workdir (records sorted by step, last
    record of a step kept)."""
    paths = {
        k: os.path.join(workdir, f)
        for k, f in (("config", "config.json"), ("metrics", "metrics.jsonl"), ("evals", "eval.jsonl"))
    }
    for p in paths.values():
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{workdir}: no {os.path.basename(p)} (run not trained?)")
    with open(paths["config"]) as f:
        config = json.load(f)

    def by_step(recs):
        return [v for _, v in sorted({int(r["step"]): r for r in recs}.items())]

    metrics, evals = by_step(_read_jsonl(paths["metrics"])), by_step(_read_jsonl(paths["evals"]))
    run = {"workdir": workdir, "config": config, "metrics": metrics, "evals": evals}
    if os.path.isdir(workdir + FINE) and os.path.isfile(os.path.join(workdir + FINE, "eval.jsonl")):
        run = merge_fine_start(run, load_run(workdir + FINE))
    return run


def merge_fine_start(run: dict, fine: dict) -> dict:
    """``run`` with the evaluations of its fine-start twin (``<workdir>_fine``: the same config and seed for
    the first steps with ``eval.every = 1``) at the steps ``run`` did not evaluate. Training is deterministic
    (constant lr, evaluation on its own key), so the twin's per-step reward and loss must equal the run's:
    a twin that differs raises."""
    mine = {int(m["step"]): m for m in run["metrics"]}
    for m in fine["metrics"]:
        r = mine.get(int(m["step"]))
        if r is None or not all(np.isclose(float(r[k]), float(m[k]), rtol=1e-5, atol=1e-8)
                                for k in ("reward_mean", "loss")):
            theirs = None if r is None else r["reward_mean"]
            raise ValueError(f"{fine['workdir']}: step {m['step']} differs from {run['workdir']} (reward "
                             f"{m['reward_mean']} vs {theirs}): not its twin")
    have = {int(e["step"]) for e in run["evals"]}
    extra = [e for e in fine["evals"] if int(e["step"]) not in have]
    return {**run, "evals": sorted(run["evals"] + extra, key=lambda e: int(e["step"]))}


def _tags(rec: dict) -> dict[str, float]:
    return {
        k.split("/", 1)[1]: float(v)
        for k, v in rec.items()
        if k.startswith("accuracy/") and k != "accuracy/overall"
    }


def run_curves(run: dict) -> dict[str, Any]:
    """Per-step and per-eval curves of one loaded run: cumulative FPE, training wall time (eval excluded),
    training reward mean, held-out ``overall`` and per-tag strict accuracy."""
    cfg = run["config"]
    fpe = forward_pass_equivalents(cfg)
    batch = int(_get(cfg, "data.prompts_per_step")) * int(_get(cfg, "data.group_size"))
    steps = [int(m["step"]) for m in run["metrics"]]
    if steps != list(range(1, len(steps) + 1)):
        raise ValueError(f"{run['workdir']}: metrics.jsonl steps are not 1..N: {steps[:5]}...")
    step_s = [batch / float(m["samples_per_s"]) for m in run["metrics"]]
    compile_s = 0.0
    if len(step_s) > 1:  # step 1 includes the one-time JIT compile: count it at the median step time
        typical = float(np.median(step_s[1:]))
        compile_s, step_s[0] = step_s[0] - typical, typical
    train_wall = np.cumsum(step_s).tolist()
    wall_at = {0: 0.0, **dict(zip(steps, train_wall))}
    evals = [e for e in run["evals"] if int(e["step"]) in wall_at]
    return {
        "algorithm": str(cfg["algorithm"]),
        "seed": int(cfg["seed"]),
        "workdir": os.path.relpath(run["workdir"]),  # relative: no machine paths in results
        "fpe_per_step": fpe,
        "first_step_excess_s": compile_s,
        "batch": batch,
        "steps": steps,
        "cum_fpe": [s * fpe["total"] for s in steps],
        "train_wall_s": train_wall,
        "wall_s": [float(m["wall_s"]) for m in run["metrics"]],
        "reward_mean": [float(m["reward_mean"]) for m in run["metrics"]],
        "drift": {k: [float(m.get(k, math.nan)) for m in run["metrics"]] for k in DRIFT_KEYS},
        "eval": {
            "step": [int(e["step"]) for e in evals],
            "cum_fpe": [int(e["step"]) * fpe["total"] for e in evals],
            "train_wall_s": [wall_at[int(e["step"])] for e in evals],
            "overall": [float(e.get("accuracy/overall", math.nan)) for e in evals],
            "per_tag": [_tags(e) for e in evals],
        },
    }


# ----------------------------------------------------------------------------- outputs


def write_outputs(
    out_dir: str, curves: dict[str, list[dict]], command: str, machine: dict | None = None,
    sweep: dict[str, list[dict]] | None = None,
) -> dict[str, Any]:
    """Analyze ``curves`` (and the learning-rate ``sweep``'s curves, if any) and write the report, JSONL and
    the PNGs into ``out_dir``; returns the analysis with ``paths``."""
    os.makedirs(out_dir, exist_ok=True)
    res = analyze(curves)
    if sweep:
        res["sweep"] = sweep_summary(sweep)
    base = os.path.join(out_dir, NAME)
    pngs = [
        plot_curves(
            res["accuracy"],
            "held-out strict accuracy (overall)",
            base + "_accuracy.png",
            hline=None if res["headline"] is None else res["headline"]["a_star"],
        ),
        plot_curves(res["reward"], "training reward mean", base + "_reward.png"),
        plot_drift(curves, base + "_drift.png"),
    ]
    configs = {a: next(iter(curves[a]))["config"] for a in curves}
    curves_out = {a: [{k: v for k, v in c.items() if k != "config"} for c in curves[a]] for a in curves}
    md = write_report(base + ".md", res, curves_out, configs, command, machine, pngs)
    js = write_jsonl(base + ".jsonl", res, curves_out, command)
    res["paths"] = {"md": md, "jsonl": js, "png": pngs}
    return res


def _lrs_of(lrs, method: str) -> list:
    """The lr grid of ``method``: ``lrs`` itself (one list for every method) or ``lrs[method]``."""
    return list(lrs[method] if isinstance(lrs, dict) else lrs)


def load_curves(root: str, seeds: list[int], methods=ALGOS, lrs=(None,)) -> dict[str, list[dict]]:
    """``{run key: [run_curves + "config"]}`` for every (method, lr, seed) workdir under ``root``."""
    out: dict[str, list[dict]] = {}
    for m, lr in ((meth, lr) for meth in methods for lr in _lrs_of(lrs, meth)):
        a = run_key(m, lr)
        out[a] = []
        for s in seeds:
            run = load_run(workdir_of(root, m, s, lr))
            c = run_curves(run)
            if not c["eval"]["step"]:
                raise ValueError(f"{run['workdir']}: eval.jsonl holds no evaluation (eval.every = 0?)")
            out[a].append({**c, "config": run["config"]})
    return out


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(ALGOS), choices=sorted(METHODS),
                    help="rows of the METHODS table to run")
    ap.add_argument("--lr-grid", action="append", default=[], metavar="METHOD=LR[,LR...]",
                    help="the lr sweep of one method (replaces --lrs for it; repeatable)")
    ap.add_argument("--lrs", nargs="+", default=None,
                    help="learning-rate sweep (optim.lr values; default: each config's lr)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the sweep")
    ap.add_argument("--best-seeds", type=int, nargs="+", default=None,
                    help="after the sweep: these seeds at each method's best lr (best seed-mean peak "
                         "accuracy over --seeds); the report then covers the best lr per method")
    ap.add_argument("--max-steps", type=int, default=None, help="max_steps of every run (default: config)")
    ap.add_argument("--root", default="runs/bench_toy", help="workdirs <root>/<method>[_lr<lr>]_s<seed>")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra --config.KEY=VALUE for every method (repeatable)")
    ap.add_argument("--jobs", type=int, default=1, choices=[1, 2],
                    help="runs at once; 2 pins each to its own core with single-threaded XLA")
    ap.add_argument("--fine-start", type=int, default=0, metavar="N",
                    help="after the best-lr seeds: the first N steps of the --fine-methods runs again "
                         "with eval.every=1 (<workdir>_fine), merged into their curves: a finer grid where a "
                         "method crosses A* early")
    ap.add_argument("--fine-methods", nargs="+", default=["awm"], choices=sorted(METHODS),
                    help="methods that get --fine-start twins (default: awm)")
    ap.add_argument("--analyze-only", action="store_true", help="skip training, read existing workdirs")
    ap.add_argument("--out", default=None,
                    help="report folder (default <root>/report; the committed results are written only when "
                         "--out names benchmarks/results)")
    return ap.parse_args(argv)


def lr_grids(a: argparse.Namespace) -> dict[str, list]:
    """``{method: [lr, ...]}`` from ``--lrs`` (every method; None: the config's lr) and ``--lr-grid``."""
    grids = {m: [None] if a.lrs is None else list(a.lrs) for m in a.methods}
    for item in a.lr_grid:
        m, sep, vals = item.partition("=")
        if not sep or m not in grids or not vals:
            raise SystemExit(f"error: --lr-grid {item!r}: expected METHOD=LR[,LR...] with METHOD one of "
                             f"--methods {a.methods}")
        grids[m] = vals.split(",")
    return grids


def check_plotting() -> None:
    """matplotlib must import before hours of training are spent (the report plots the curves)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"error: matplotlib is not importable ({e}); pip install matplotlib before running "
                         f"benchmarks/{NAME}.py") from None


def _train(a, methods, lrs, seeds) -> None:
    runs = []
    for s in seeds:
        for m in methods:  # the methods of a seed side by side (with --jobs 2: at the same time)
            for lr in _lrs_of(lrs, m):
                wd = workdir_of(a.root, m, s, lr)
                if is_done(wd):
                    print(f"[{NAME}] cached {run_key(m, lr)} seed {s}: {os.path.relpath(wd)}", flush=True)
                    continue
                os.makedirs(os.path.dirname(wd), exist_ok=True)
                runs.append({"name": f"{run_key(m, lr)}_s{s}", "workdir": wd,
                             "cmd": train_command(m, wd, s, a.max_steps, a.set, lr)})
    run_all(runs, a.jobs)


def _train_fine(a, method: str, lr, seeds) -> None:
    """The ``--fine-start`` twins ``<workdir>_fine`` of (method, lr, seeds): max_steps N, eval.every 1."""
    runs = []
    for s in seeds:
        wd = workdir_of(a.root, method, s, lr) + FINE
        if not is_done(wd):
            runs.append({"name": f"{run_key(method, lr)}_s{s}{FINE}", "workdir": wd,
                         "cmd": train_command(method, wd, s, a.fine_start, [*a.set, "eval.every=1"], lr)})
    run_all(runs, a.jobs)


def best_lrs(curves: dict[str, list[dict]], methods, lrs) -> dict[str, str | None]:
    """Per method, the lr whose seed-mean accuracy curve has the highest point."""
    out = {}
    for m in methods:
        peak = {lr: max(aggregate([accuracy_points(c) for c in curves[run_key(m, lr)]])["mean"])
                for lr in _lrs_of(lrs, m)}
        out[m] = max(_lrs_of(lrs, m), key=lambda lr: peak[lr])  # a tie: the one listed first
    return out


def main(argv=None) -> dict[str, Any]:
    """CLI entry point: train what is not cached (unless ``--analyze-only``), analyze, write outputs."""
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    check_plotting()
    command = shlex.join(["python", f"benchmarks/{NAME}.py", *argv])
    lrs = lr_grids(a)
    if not a.analyze_only:
        _train(a, a.methods, lrs, a.seeds)
    curves = load_curves(a.root, a.seeds, a.methods, lrs)
    sweep = None
    if a.best_seeds is not None:
        sweep = curves
        best = best_lrs(curves, a.methods, lrs)
        print(f"[{NAME}] best lr per method: {best}", flush=True)
        curves = {}
        for m, lr in best.items():
            if not a.analyze_only:
                _train(a, [m], [lr], a.best_seeds)
                if a.fine_start and m in a.fine_methods:
                    _train_fine(a, m, lr, a.best_seeds)
            curves.update(load_curves(a.root, a.best_seeds, [m], [lr]))
    out = a.out or os.path.join(a.root, "report")
    res = write_outputs(out, curves, command, machine=U.machine_info("cpu"), sweep=sweep)
    with open(res["paths"]["md"]) as f:
        print(f.read())
    return res


if __name__ == "__main__":
    main()
