"""Analysis of the toy comparison's curves (``toy_awm_vs_flow_grpo.py``): seed aggregates, the A* headline,
final accuracies, stability after the peak, drift tables and the learning-rate sweep summary.

Pure functions of the curve dicts ``run_curves`` builds; rendering lives in ``_toy_compare_report.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TOL = 1e-9  # ">= A*" tolerance against float summation order only
# What moves during training (per step, from metrics.jsonl; awm_jax.rl.epoch.drift_stats and the step's kl)
DRIFT_KEYS = ("reward_mean", "kl", "lora_norm", "lora_b_norm", "adv_abs_mean", "adv_zero_frac",
              "zero_std_frac")


def aggregate(points: list[dict[int, tuple[float, float, float]]]) -> dict[str, list]:
    """Seed-aggregate of curves given as ``{step: (fpe, wall_s, y)}`` per seed, over the steps all seeds
    have: ``step, fpe, wall`` (mean over seeds), ``mean, lo, hi`` (of y) and ``n`` (seeds)."""
    if not points:
        raise ValueError("aggregate: no runs")
    common = sorted(set.intersection(*(set(p) for p in points)))
    out: dict[str, list] = {k: [] for k in ("step", "fpe", "wall", "mean", "lo", "hi")}
    for s in common:
        vals = np.asarray([p[s] for p in points], np.float64)
        out["step"].append(s)
        out["fpe"].append(float(vals[:, 0].mean()))
        out["wall"].append(float(vals[:, 1].mean()))
        out["mean"].append(float(vals[:, 2].mean()))
        out["lo"].append(float(vals[:, 2].min()))
        out["hi"].append(float(vals[:, 2].max()))
    out["n"] = len(points)
    return out


def reward_points(c: dict) -> dict[int, tuple[float, float, float]]:
    """``{step: (cum FPE, train wall, reward mean)}`` of one run's curves."""
    return {s: (f, w, y) for s, f, w, y in zip(c["steps"], c["cum_fpe"], c["train_wall_s"], c["reward_mean"])}


def accuracy_points(c: dict) -> dict[int, tuple[float, float, float]]:
    """``{eval step: (cum FPE, train wall, overall accuracy)}`` of one run's curves."""
    e = c["eval"]
    return {s: (f, w, y) for s, f, w, y in zip(e["step"], e["cum_fpe"], e["train_wall_s"], e["overall"])}


# ----------------------------------------------------------------------------- headline


def first_reach(agg: dict, threshold: float) -> dict | None:
    """The first aggregated eval point whose mean is >= ``threshold`` (no interpolation), or None."""
    for i, y in enumerate(agg["mean"]):
        if y >= threshold - TOL:
            return {"step": agg["step"][i], "fpe": agg["fpe"][i], "wall_s": agg["wall"][i], "accuracy": y}
    return None


def speedup(baseline: float, ours: float) -> float | None:
    """``baseline / ours`` (None when undefined: ``ours`` or ``baseline`` is 0)."""
    if ours <= 0 or baseline <= 0:
        return None
    return baseline / ours


def headline(acc: dict[str, dict], algos: dict[str, str] | None = None) -> dict[str, Any]:
    """A* (the best seed-mean accuracy of any Flow-GRPO run key), where each run key first reaches it, and
    the speedups of the earliest AWM key over the Flow-GRPO key that set A* (``algos``: key -> algorithm;
    default: the key itself)."""
    algos = algos or {k: k for k in acc}
    grpo = [k for k in acc if algos[k] == "flow_grpo"]
    awm = [k for k in acc if algos[k] == "awm"]
    if not grpo or not awm:
        raise ValueError(f"headline needs an AWM and a Flow-GRPO run; got {sorted(acc)}")
    base = max(grpo, key=lambda k: max(acc[k]["mean"]))
    a_star = max(acc[base]["mean"])
    hits = {k: first_reach(a, a_star) for k, a in acc.items()}
    reached = [k for k in awm if hits[k] is not None]
    best_awm = min(reached, key=lambda k: hits[k]["fpe"]) if reached else awm[0]
    hit_g, hit_a = hits[base], hits[best_awm]
    out: dict[str, Any] = {"a_star": a_star, "flow_grpo": hit_g, "awm": hit_a, "reached": hit_a is not None,
                           "baseline_key": base, "awm_key": best_awm, "per_key": hits}
    out.update(speedup_fpe=None, speedup_wall=None, note="")
    if hit_a is None:
        out["note"] = "AWM's mean accuracy never reaches A*: speedup not reached"
        return out
    out["speedup_fpe"] = speedup(hit_g["fpe"], hit_a["fpe"])
    out["speedup_wall"] = speedup(hit_g["wall_s"], hit_a["wall_s"])
    if hit_g["step"] == 0:
        out["note"] = "A* is the base model's accuracy (Flow-GRPO never improved on it): speedup undefined"
    elif hit_a["step"] == 0:
        out["note"] = "the base model already reaches A*: speedup undefined"
    return out


def final_accuracy(curves: list[dict]) -> dict[str, Any]:
    """Mean and std (ddof 1; 0 for one seed) over seeds of the last eval point's overall and per-tag
    accuracy; also the step of that point."""

    def stats(vals):
        v = np.asarray(vals, np.float64)
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}

    last = [(c["eval"]["step"][-1], c["eval"]["overall"][-1], c["eval"]["per_tag"][-1]) for c in curves]
    tags = sorted(set.intersection(*(set(t) for _, _, t in last)))
    return {
        "steps": sorted({s for s, _, _ in last}),
        "overall": stats([o for _, o, _ in last]),
        "per_tag": {t: stats([pt[t] for _, _, pt in last]) for t in tags},
    }


def stability(agg: dict) -> dict[str, Any]:
    """Peak and end of a seed-mean accuracy curve: ``peak`` (value, step), ``final`` (last point) and
    ``drop`` = peak - final (>= 0; 0 when the curve ends at its peak)."""
    i = int(np.argmax(agg["mean"]))
    return {"peak": agg["mean"][i], "peak_step": agg["step"][i], "final": agg["mean"][-1],
            "final_step": agg["step"][-1], "drop": agg["mean"][i] - agg["mean"][-1]}


def drift_table(curves: list[dict], every: int | None = None) -> dict[str, Any]:
    """Seed means of the drift series (:data:`DRIFT_KEYS`) and of the held-out accuracy (overall and per
    tag) at every eval step > 0 (or every ``every``-th of them)."""
    steps = sorted(set.intersection(*(set(c["eval"]["step"]) for c in curves)) - {0})
    if every:
        steps = [s for s in steps if s % every == 0 or s == steps[-1]]
    rows = []
    for s in steps:
        row: dict[str, Any] = {"step": s}
        for k in DRIFT_KEYS:
            row[k] = float(np.nanmean([c["drift"][k][c["steps"].index(s)] for c in curves]))
        ev = [c["eval"]["step"].index(s) for c in curves]
        row["accuracy"] = float(np.mean([c["eval"]["overall"][i] for c, i in zip(curves, ev)]))
        tags = sorted(set.intersection(*(set(c["eval"]["per_tag"][i]) for c, i in zip(curves, ev))))
        row["per_tag"] = {t: float(np.mean([c["eval"]["per_tag"][i][t] for c, i in zip(curves, ev)]))
                          for t in tags}
        rows.append(row)
    return {"n": len(curves), "rows": rows}


def sweep_summary(curves: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """One row per run key ``method@lr`` of the sweep: seeds, peak / final seed-mean accuracy (stability)
    and the final training reward."""
    rows = []
    for key, cs in curves.items():
        st = stability(aggregate([accuracy_points(c) for c in cs]))
        rows.append({"key": key, "seeds": [c["seed"] for c in cs], **st,
                     "final_reward": float(np.mean([c["reward_mean"][-1] for c in cs]))})
    return rows


def analyze(curves: dict[str, list[dict]]) -> dict[str, Any]:
    """Aggregates, headline and final accuracies from ``{algo: [run_curves per seed]}``."""
    acc = {a: aggregate([accuracy_points(c) for c in curves[a]]) for a in curves}
    rew = {a: aggregate([reward_points(c) for c in curves[a]]) for a in curves}
    final = {a: final_accuracy(curves[a]) for a in curves}
    algos = {a: str(curves[a][0]["algorithm"]) for a in curves}
    have = set(algos.values())
    head = headline(acc, algos) if {"awm", "flow_grpo"} <= have else None  # A* needs a Flow-GRPO run
    return {"accuracy": acc, "reward": rew, "headline": head, "final": final,
            "stability": {a: stability(acc[a]) for a in acc},
            "drift": {a: drift_table(curves[a]) for a in curves}}
