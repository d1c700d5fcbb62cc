"""Collect ``python -m awm_jax.plan --json`` outputs into ``results/tpu_plans.jsonl`` and print the markdown
table of ``BENCHMARKS.md`` ("TPU plan from the compiler").

    python benchmarks/plan_report.py --label "SD3.5-M, shipped defaults" plan.json [more.json ...]
    python benchmarks/plan_report.py --table    # the table of every recorded plan
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from awm_jax.plan import loop_step_s  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tpu_plans.jsonl")
GIB = 2**30


def row(rec: dict) -> str:
    """One markdown row of a plan record (``awm_jax.plan`` JSON plus ``label`` and ``overrides``)."""
    mesh = " x ".join(f"{k} {v}" for k, v in rec["mesh"].items() if v > 1) or "1 chip"
    cells = [rec.get("label", ""), rec["topology"], mesh, rec.get("overrides", "") or "-"]
    for k in ("train_step", "rollout"):
        r = rec[k]
        if r.get("error"):
            m = re.search(r"temporaries \((\S+)\) exceeds? available HBM \((\S+)\)", r["error"])
            cells.append(f"**over HBM**: temporaries {m[1]} > {m[2]}" if m else r["error"][:90])
            continue
        over = " **over HBM**" if r["peak_bytes"] > rec["hbm_bytes"] else ""
        cells.append(f"{r['peak_bytes'] / GIB:.2f} GiB{over} ({r['compile_s']:.0f} s)")
    t, ro = rec["train_step"], rec["rollout"]
    step_s = loop_step_s(rec)
    if step_s is not None:  # both programs compiled (fitting or not): the time figures
        cells += [f"{t['model_flops']:.3g} / {t['program_flops']:.3g}", f"{t['compute_bound_s']:.3g} / "
                  f"{t['est_s']:.3g}", f"{100 * t['mfu']:.0f} %",
                  f"{rec['rollout_calls']} x {ro['compute_bound_s']:.3g} / {ro['est_s']:.3g}",
                  f"{rec['rollouts_per_step']} in {step_s:.0f} s"]
    else:
        cells += ["-"] * 5
    return "| " + " | ".join(cells) + " |"


HEADER = ("| model | topology | mesh | overrides | train step peak / chip (compile) "
          "| rollout peak / chip (compile) | train FLOPs / chip: model / with remat "
          "| train s / chip: compute-bound / modeled | train modeled MFU "
          "| rollout calls x s: compute-bound / modeled | rollouts per loop step in (modeled) |\n"
          + "|---" * 11 + "|")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", help="plan JSON files to record")
    p.add_argument("--label", default="", help="the model / config of these plans")
    p.add_argument("--overrides", default="", help="the --config overrides these plans used")
    p.add_argument("--table", action="store_true", help="print the table of every recorded plan")
    args = p.parse_args(argv)
    for f in args.files:
        rec = json.load(open(f))
        rec["label"], rec["overrides"] = args.label, args.overrides
        with open(RESULTS, "a") as out:
            out.write(json.dumps(rec) + "\n")
        print(row(rec))
    if args.table:
        print(HEADER)
        recs = sorted((json.loads(line) for line in open(RESULTS)), key=lambda r: r["chips"])
        for rec in sorted(recs, key=lambda r: r.get("label", ""), reverse=True):  # stable: by chips within
            print(row(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
