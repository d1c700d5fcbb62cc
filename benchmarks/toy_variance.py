"""The paper's variance experiment at toy scale: clean-x0 vs noisy-x_s flow-matching pretraining.

    python benchmarks/toy_variance.py --steps 8000 --jobs 2
    python benchmarks/toy_variance.py --analyze-only --root runs/toy_variance

Pretrains the toy MMDiT + text encoder twice under identical settings (architecture, data order, seed,
optimiser, steps) with ``python -m awm_jax.toy.pretrain --objective clean_x0`` and ``--objective noisy_xs``
(the paper's Eq. 8 adapted to flow matching: the regression target is built from a noisy ``x_s``,
``s = t - gap``, as a DDPO step of size ``gap`` implicitly does; see ``awm_jax/toy/pretrain.py``).  Both log,
every ``--curve-every`` steps, the *clean-target* validation loss of the EMA weights on one fixed held-out
batch (so the two objectives are compared on the same yardstick) and the held-out strict GenEval accuracy.
With ``--jobs 2`` the two runs share the machine fairly: each is pinned to its own core, single-threaded.

Outputs (``--out``): ``toy_variance.md`` (table + machine), ``toy_variance.jsonl`` (curves),
``toy_variance.png`` (validation loss | training loss | accuracy against steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as U  # noqa: E402

NAME = "toy_variance"
OBJECTIVES = ("clean_x0", "noisy_xs")
LABELS = {"clean_x0": "clean x0 (flow matching / AWM)", "noisy_xs": "noisy x_s (DDPO-implicit, Eq. 8)"}
PINNED_ENV = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}


def pretrain_command(objective: str, out: str, args: argparse.Namespace) -> list[str]:
    """The pretraining command of one objective (identical settings otherwise)."""
    return [
        sys.executable,
        "-m",
        "awm_jax.toy.pretrain",
        "--out",
        out,
        "--objective",
        objective,
        "--steps",
        str(args.steps),
        "--curve-every",
        str(args.curve_every),
        "--gap",
        str(args.gap),
        "--seed",
        str(args.seed),
    ]


def run_both(args: argparse.Namespace) -> None:
    """Run the two pretrainings (at once, pinned to cores 0 and 1, with ``--jobs 2``)."""
    procs = []
    for i, obj in enumerate(OBJECTIVES):
        out = os.path.join(args.root, obj)
        cmd = pretrain_command(obj, out, args)
        env = dict(os.environ)
        if args.jobs == 2:
            env.update(PINNED_ENV)
            cmd = ["taskset", "-c", str(i)] + cmd
        os.makedirs(args.root, exist_ok=True)
        log = open(out + ".log", "w")
        procs.append(
            (obj, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=U.ROOT), log)
        )
        if args.jobs == 1:
            procs[-1][1].wait()
    for obj, p, log in procs:
        if p.wait() != 0:
            raise RuntimeError(f"pretraining {obj} failed (exit {p.returncode}); see {log.name}")
        log.close()


def load_curve(run_dir: str) -> list[dict]:
    """The ``curve.jsonl`` points of one pretraining run (a clear error when absent or empty)."""
    path = os.path.join(run_dir, "curve.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: run the pretraining first (without --analyze-only)")
    pts = [json.loads(line) for line in open(path) if line.strip()]
    if not pts:
        raise ValueError(f"{path} holds no curve points")
    return pts


def steps_to_reach(curve: list[dict], key: str, target: float, lower_is_better: bool) -> int | None:
    """First logged step whose ``key`` reaches ``target`` (``None`` when never)."""
    for p in curve:
        v = p[key] if key != "overall" else p["accuracy"]["overall"]
        if (v <= target) if lower_is_better else (v >= target):
            return int(p["step"])
    return None


def final_eval(run_dir: str) -> dict | None:
    """The larger end-of-run evaluation (``eval.json``: 48 held-out images per tag) when present."""
    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        return None
    return json.load(open(path)).get("eval_heldout")


def summarize(curves: dict[str, list[dict]]) -> dict:
    """Final numbers and the step at which noisy-x_s first matches clean-x0's final validation loss."""
    out = {}
    for obj, c in curves.items():
        last = c[-1]
        out[obj] = {
            "final_step": last["step"],
            "final_val_loss_clean": last["val_loss_clean"],
            "final_train_loss": last["train_loss"],
            "final_accuracy": last["accuracy"]["overall"],
            "best_accuracy": max(p["accuracy"]["overall"] for p in c),
        }
    clean, noisy = curves["clean_x0"], curves["noisy_xs"]
    # the step at which clean-x0 reached noisy-x_s's final validation loss: the compute noisy needed vs clean
    target = noisy[-1]["val_loss_clean"]
    out["clean_steps_to_noisy_final_val"] = steps_to_reach(clean, "val_loss_clean", target, True)
    return out


def plot(curves: dict[str, list[dict]], path: str) -> str:
    """Three panels against steps: clean validation loss, training loss (own objective), accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for obj, c in curves.items():
        steps = [p["step"] for p in c]
        axes[0].plot(steps, [p["val_loss_clean"] for p in c], marker="o", label=LABELS[obj])
        axes[1].plot(steps, [p["train_loss"] for p in c], marker="o", label=LABELS[obj])
        axes[2].plot(steps, [p["accuracy"]["overall"] for p in c], marker="o", label=LABELS[obj])
    axes[0].set_ylabel("validation loss (clean target, EMA weights)")
    axes[1].set_ylabel("training loss (each run's own target)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("held-out strict GenEval accuracy (overall)")
    for ax in axes:
        ax.set_xlabel("pretraining step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Toy pretraining: clean-x0 vs noisy-x_s flow-matching targets (identical settings)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(curves: dict[str, list[dict]], summary: dict, args: argparse.Namespace, command: str) -> str:
    """``toy_variance.md``: settings, per-point table, summary."""
    machine = U.machine_info("cpu")
    lines = [
        "# Toy variance experiment: clean-x0 vs noisy-x_s pretraining",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine['processor']}, {machine['cpu_count']} cores, jax {machine['jax']} "
        f"({machine['jax_backend']}).",
        f"Settings (both runs): {args.steps} steps, batch 32, AdamW lr 1e-3, EMA 0.995, seed {args.seed}, "
        f"gap {args.gap} (noisy run: s = max(t - {args.gap}, 0)); evaluation: 40-step Euler ODE, "
        "16 held-out images per tag (`heldout@16`), EMA weights.",
        "",
        "| step | val loss clean-x0 | val loss noisy-x_s | train loss clean-x0 | train loss noisy-x_s "
        "| accuracy clean-x0 | accuracy noisy-x_s |",
        "|---|---|---|---|---|---|---|",
    ]
    by_step = {p["step"]: p for p in curves["noisy_xs"]}
    for p in curves["clean_x0"]:
        q = by_step.get(p["step"])
        if q is None:
            continue
        lines.append(
            f"| {p['step']} | {p['val_loss_clean']:.4f} | {q['val_loss_clean']:.4f} | {p['train_loss']:.4f} "
            f"| {q['train_loss']:.4f} | {p['accuracy']['overall']:.3f} | {q['accuracy']['overall']:.3f} |"
        )
    s = summary
    hit = s["clean_steps_to_noisy_final_val"]
    lines += [
        "",
        f"Final validation loss (clean target): clean-x0 {s['clean_x0']['final_val_loss_clean']:.4f}, "
        f"noisy-x_s {s['noisy_xs']['final_val_loss_clean']:.4f}. "
        + (
            f"clean-x0 had reached noisy-x_s's final validation loss by step {hit} "
            f"(of {s['noisy_xs']['final_step']})."
            if hit is not None
            else "clean-x0 never reached noisy-x_s's final validation loss at a logged step."
        ),
    ]
    finals = {obj: s[obj].get("final_eval") for obj in OBJECTIVES}
    if all(finals.values()):
        lines += [
            "",
            "End-of-run evaluation (48 held-out images per tag, 288 images, 40-step ODE):",
            "",
            "| objective | " + " | ".join(sorted(finals["clean_x0"]["accuracy"])) + " |",
            "|---|" + "---|" * len(finals["clean_x0"]["accuracy"]),
        ]
        for obj in OBJECTIVES:
            acc = finals[obj]["accuracy"]
            lines.append(f"| {obj} | " + " | ".join(f"{acc[k]:.3f}" for k in sorted(acc)) + " |")
    lines += ["", f"![curves]({NAME}.png)"]
    path = os.path.join(args.out, f"{NAME}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv=None) -> dict:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--curve-every", type=int, default=1000)
    p.add_argument("--gap", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, choices=[1, 2])
    p.add_argument("--root", default="runs/toy_variance")
    p.add_argument("--out", default=os.path.join(U.RUNS_DIR, NAME),
                   help="report dir (default runs/benchmarks/toy_variance; the record: benchmarks/results)")
    p.add_argument("--analyze-only", action="store_true")
    args = p.parse_args(argv)
    U.require_plotting("benchmarks/toy_variance.py")  # before minutes of training, not after
    if not args.analyze_only:
        run_both(args)
    curves = {obj: load_curve(os.path.join(args.root, obj)) for obj in OBJECTIVES}
    summary = summarize(curves)
    for obj in OBJECTIVES:
        summary[obj]["final_eval"] = final_eval(os.path.join(args.root, obj))
    os.makedirs(args.out, exist_ok=True)
    plot(curves, os.path.join(args.out, f"{NAME}.png"))
    command = "python benchmarks/toy_variance.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(curves, summary, args, command)
    with open(os.path.join(args.out, f"{NAME}.jsonl"), "w") as f:
        for obj in OBJECTIVES:
            f.write(json.dumps({"objective": obj, "curve": curves[obj]}) + "\n")
        f.write(json.dumps({"summary": summary}) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
