"""Plots and report files of ``toy_awm_vs_flow_grpo.py`` (markdown tables, JSONL, PNG curves).

The analysis (curves, aggregates, headline) lives in ``toy_awm_vs_flow_grpo.py``; this module only renders
its result dicts.
"""

from __future__ import annotations

import json
import os
from typing import Any

import _bench_utils as U
from _toy_compare_analysis import speedup

NAME = "toy_awm_vs_flow_grpo"
ALGOS = ("awm", "flow_grpo")  # the default --methods; every method: toy_awm_vs_flow_grpo.METHODS
LABELS = {"awm": "AWM", "flow_grpo": "Flow-GRPO"}  # more labels: the METHODS table of the benchmark


def label(key: str) -> str:
    """Display name of a run key ``method`` or ``method@lr``."""
    m, _, lr = key.partition("@")
    return LABELS.get(m, m) + (f" (lr {lr})" if lr else "")
X_AXES = (("fpe", "transformer forward-pass equivalents"), ("wall", "training wall-clock (s, eval excluded)"))


def plot_curves(agg: dict[str, dict], ylabel: str, path: str, hline: float | None = None) -> str:
    """Two panels (vs cumulative FPE | vs training wall seconds): mean line and min/max band per algo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, (xkey, xlabel) in zip(axes, X_AXES):
        for algo, a in agg.items():
            line = ax.plot(a[xkey], a["mean"], marker="o", ms=3, label=f"{label(algo)} (n={a['n']})")[0]
            ax.fill_between(a[xkey], a["lo"], a["hi"], color=line.get_color(), alpha=0.2, lw=0)
        if hline is not None:
            ax.axhline(hline, color="gray", ls="--", lw=1, label="A* (Flow-GRPO best mean)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


DRIFT_PANELS = (("kl", "KL to the reference (train metric)"), ("lora_b_norm", "LoRA B-factor norm"),
                ("reward_mean", "training reward mean"), ("adv_zero_frac", "fraction of zero advantages"))


def plot_drift(curves: dict[str, list[dict]], path: str) -> str:
    """Four panels over optimizer steps (seed mean per run key): what moves while accuracy drifts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_p = len(DRIFT_PANELS)
    fig, axes = plt.subplots(1, n_p, figsize=(4 * n_p, 3.6), constrained_layout=True)
    for ax, (key, title) in zip(axes, DRIFT_PANELS):
        for algo, cs in curves.items():
            n = min(len(c["steps"]) for c in cs)
            y = np.nanmean([c["drift"][key][:n] for c in cs], axis=0)
            ax.plot(cs[0]["steps"][:n], y, label=label(algo))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step (epoch)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt_hit(hit: dict | None) -> str:
    if hit is None:
        return "not reached"
    return f"step {hit['step']} ({hit['fpe']:.3g} FPE, {hit['wall_s']:.1f} s): {hit['accuracy']:.3f}"


def _fmt_x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_lines(curves: dict[str, list[dict]], configs: dict[str, dict]) -> list[str]:
    """Markdown lines: FPE per step and the config keys that differ between the algorithms."""
    lines = ["| algorithm | seeds | steps | batch | FPE/step rollout | previews | train | total |",
             "|---" * 8 + "|"]
    for a in curves:
        c0 = curves[a][0]
        f = c0["fpe_per_step"]
        seeds = ", ".join(str(c["seed"]) for c in curves[a])
        lines.append(
            f"| {label(a)} | {seeds} | {configs[a]['max_steps']} | {c0['batch']} | "
            f"{f['rollout']} | {f.get('preview', 0)} | {f['train']} | {f['total']} |"
        )
    keys = list(configs)
    fa, fg = _flat(configs[keys[0]]), _flat(configs[keys[-1]])
    diff = [k for k in sorted(set(fa) | set(fg)) if fa.get(k) != fg.get(k) and k not in ("seed", "max_steps")]
    lines += ["", "Config keys that differ (seed and max_steps aside):", ""]
    lines += [f"| key | {label(keys[0])} | {label(keys[-1])} |", "|---|---|---|"]
    lines += [f"| `{k}` | {fa.get(k)} | {fg.get(k)} |" for k in diff]
    return lines


def _curve_table(acc: dict[str, dict]) -> list[str]:
    lines = [
        "| algorithm | eval step | cum. FPE | train wall (s) | overall mean | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in acc:
        g = acc[a]
        for i, s in enumerate(g["step"]):
            lines.append(
                f"| {label(a)} | {s} | {g['fpe'][i]:.4g} | {g['wall'][i]:.1f} | "
                f"{g['mean'][i]:.3f} | {g['lo'][i]:.3f} | {g['hi'][i]:.3f} |"
            )
    return lines


def _final_table(final: dict[str, dict]) -> list[str]:
    tags = sorted(set().union(*(set(f["per_tag"]) for f in final.values())))
    lines = ["| algorithm | eval step | overall | " + " | ".join(tags) + " |", "|---" * (len(tags) + 3) + "|"]
    for a in final:
        f = final[a]
        cells = [
            f"{f['per_tag'][t]['mean']:.3f} +- {f['per_tag'][t]['std']:.3f}" if t in f["per_tag"] else ""
            for t in tags
        ]
        lines.append(
            f"| {label(a)} | {', '.join(map(str, f['steps']))} | {f['overall']['mean']:.3f} +- "
            f"{f['overall']['std']:.3f} | " + " | ".join(cells) + " |"
        )
    return lines


ACCOUNTING = (
    "FPE = transformer forward-pass equivalents (one model call on one sample; forward+backward = 3; CFG x2; "
    "reference / kl-EMA passes only when their weight is non-zero; evaluation not counted; see the module "
    "docstring). Wall = training wall-clock: sum over steps of batch / samples_per_s (rollout + reward + "
    "train step; evaluation and checkpointing excluded; step 1 counted at the median step time, its "
    "one-time JIT compile excluded), mean over seeds."
)


def _methods_table(res: dict) -> list[str]:
    """Every run key: where it first reaches A*, its speedups over the Flow-GRPO key that set A*, its peak
    and its end (stability: the drop after the peak)."""
    h = res["headline"] or {"per_key": {}, "baseline_key": None}
    base = h["per_key"].get(h["baseline_key"])
    lines = ["| method | first reaches A* | speedup FPE | speedup wall | peak (step) | final (step) | drop |",
             "|---|---|---|---|---|---|---|"]
    for key, st in res["stability"].items():
        hit = h["per_key"].get(key)
        sf = sw = None
        if hit is not None and base is not None and base["step"] > 0 and hit["step"] > 0:
            sf, sw = speedup(base["fpe"], hit["fpe"]), speedup(base["wall_s"], hit["wall_s"])
        lines.append(f"| {label(key)} | {_fmt_hit(hit)} | {_fmt_x(sf)} | {_fmt_x(sw)} | "
                     f"{st['peak']:.3f} ({st['peak_step']}) | {st['final']:.3f} ({st['final_step']}) | "
                     f"{st['drop']:.3f} |")
    return lines


def _sweep_table(rows: list[dict]) -> list[str]:
    lines = ["| method (lr) | seeds | peak seed-mean accuracy (step) | final (step) | drop "
             "| final train reward |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {label(r['key'])} | {', '.join(map(str, r['seeds']))} | {r['peak']:.3f} "
                     f"({r['peak_step']}) | {r['final']:.3f} ({r['final_step']}) | {r['drop']:.3f} | "
                     f"{r['final_reward']:.3f} |")
    return lines


def _drift_tables(drift: dict[str, dict], every: int = 4) -> list[str]:
    lines = []
    for key, d in drift.items():
        rows = [r for r in d["rows"] if r["step"] % every == 0 or r is d["rows"][-1]]
        if not rows:
            continue
        tags = list(rows[0]["per_tag"])
        lines += [f"**{label(key)}** (mean of {d['n']} seeds)", "",
                  "| step | held-out | train reward | kl | lora_norm | lora_b_norm | adv_abs_mean "
                  "| adv_zero_frac | zero_std_frac | " + " | ".join(tags) + " |",
                  "|---" * (9 + len(tags)) + "|"]
        for r in rows:
            lines.append(f"| {r['step']} | {r['accuracy']:.3f} | {r['reward_mean']:.3f} | {r['kl']:.2e} | "
                         f"{r['lora_norm']:.3f} | {r['lora_b_norm']:.3f} | {r['adv_abs_mean']:.3f} | "
                         f"{r['adv_zero_frac']:.3f} | {r['zero_std_frac']:.3f} | "
                         + " | ".join(f"{r['per_tag'][t]:.3f}" for t in tags) + " |")
        lines.append("")
    return lines


def _headline_lines(h: dict | None) -> list[str]:
    if h is None:
        return ["No headline: A* needs both an AWM and a Flow-GRPO method among --methods."]
    note = f" ({h['note']})" if h["note"] else ""
    return [
        f"- A* = Flow-GRPO's best seed-mean held-out strict GenEval overall accuracy: **{h['a_star']:.3f}**",
        f"- Flow-GRPO first reaches A* at {_fmt_hit(h['flow_grpo'])}",
        f"- AWM first reaches A* at {_fmt_hit(h['awm'])}",
        f"- Speedup (Flow-GRPO / AWM): compute **{_fmt_x(h['speedup_fpe'])}**, "
        f"wall-clock **{_fmt_x(h['speedup_wall'])}**{note}",
        "",
        "First eval point at or above A* of the seed-mean curve, no interpolation between eval points.",
    ]


def write_report(
    path: str,
    res: dict,
    curves: dict[str, list[dict]],
    configs: dict[str, dict],
    command: str,
    machine: dict | None,
    pngs: list[str],
) -> str:
    """The markdown report (machine, command, settings, curves table, headline, final accuracies)."""
    m = machine or {}
    machine_line = (
        f"Machine: {m.get('processor', '?')}, {m.get('cpu_count', '?')} CPUs, "
        f"{m.get('platform', '?')}, python {m.get('python', '?')}, jax {m.get('jax', '?')} "
        f"({m.get('jax_backend', '?')})."
    )
    lines = [
        f"# Toy world: AWM vs Flow-GRPO ({NAME}.py)",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        machine_line,
        "",
        "## Settings",
        "",
        *settings_lines(curves, configs),
        "",
        ACCOUNTING,
        "",
        "## Headline",
        "",
        *_headline_lines(res["headline"]),
        "",
        "## Every method: reaching A*, peak and drift after it (seed means)",
        "",
        *_methods_table(res),
        "",
        *(["## Learning-rate sweep (one seed per lr; the rest of the report: each method at its best lr)", "",
           *_sweep_table(res["sweep"]), ""] if res.get("sweep") else []),
        "## Final held-out accuracy (last eval, mean +- std over seeds)",
        "",
        *_final_table(res["final"]),
        "",
        "## Held-out overall accuracy per eval point (seed mean, min, max)",
        "",
        *_curve_table(res["accuracy"]),
        "",
        "## What moves (per eval step, seed means; kl is the step's train metric)",
        "",
        *_drift_tables(res["drift"]),
        "Plots: " + ", ".join(f"`{os.path.basename(p)}`" for p in pngs),
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def write_jsonl(path: str, res: dict, curves: dict[str, list[dict]], command: str) -> str:
    """Raw curves: one line per run, then one summary line (overwrites ``path``)."""
    with open(path, "w") as f:
        for a in curves:
            for c in curves[a]:
                f.write(json.dumps({"kind": "run", **c}) + "\n")
        f.write(json.dumps({"kind": "summary", "command": command, **res}, default=U._json_default) + "\n")
    return path
