"""The evaluation's outputs: ``results.json``, ``results.md`` (subjects side by side) and image grids."""

from __future__ import annotations

import json
import os

import numpy as np

from awm_jax.logging_lib import save_image_grid, to_jsonable


def _metric_order(keys) -> list[str]:
    """Overall scores first, then per-tag accuracies, then the rest (each group sorted)."""
    def rank(k: str):
        top = k.endswith("/overall") or k == "ocr/accuracy"
        return (0 if top else 1 if k.startswith("accuracy/") else 2, k)
    return sorted(set(keys), key=rank)


def markdown_table(results: dict) -> str:
    """One Markdown table per benchmark: a row per metric, a column per subject."""
    lines = []
    for bench, per_subject in results.items():
        labels = list(per_subject)
        keys = _metric_order(k for r in per_subject.values() for k in r["summary"])
        n_img = {r["num_images"] for r in per_subject.values()}
        lines += [f"### {bench} ({'/'.join(map(str, sorted(n_img)))} images per subject)", "",
                  "| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for k in keys:
            cells = [per_subject[lab]["summary"].get(k) for lab in labels]
            lines.append(f"| {k} | " + " | ".join("-" if c is None else f"{c:.4f}" for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _caption(records: dict, metric: str | None, i: int) -> str:
    parts = []
    if metric and metric in records:
        rec = records[metric][i]
        parts.append(("OK " if rec["accuracy"] else "x ") if "accuracy" in rec else f"[{rec['reward']:.2f}] ")
    first = next(iter(records.values()), None)
    return "".join(parts) + (first[i]["prompt"] if first else "")


def write_grids(results: dict, benches: dict, grid_images: int) -> list[str]:
    """Per benchmark and subject ``grid.png`` (``grid_images`` images spread over the set, verdict or reward
    in the caption) and, with several subjects, ``<out>/grid_<benchmark>.png``: the same prompts, one block
    of images per subject."""
    from awm_jax.evaluation.runner import load_images

    paths = []
    if grid_images <= 0:
        return paths
    for bench, per_subject in results.items():
        metric = benches[bench].metric
        rows = []
        for label, r in per_subject.items():
            n = r["num_images"]
            pick = np.unique(np.linspace(0, n - 1, min(grid_images, n)).astype(int))
            imgs = load_images(r["folder"], pick)
            caps = [_caption(r["records"], metric, int(i)) for i in pick]
            paths.append(save_image_grid(os.path.join(r["folder"], "grid.png"), imgs, caps))
            rows.append((imgs, [f"{label}: {c}" for c in caps]))
        if len(rows) > 1 and len({x[0].shape for x in rows}) == 1:
            out = os.path.dirname(os.path.dirname(next(iter(per_subject.values()))["folder"]))
            paths.append(save_image_grid(os.path.join(out, f"grid_{bench}.png"),
                                         np.concatenate([x[0] for x in rows]), sum((x[1] for x in rows), [])))
    return paths


def write_reports(out: str, results: dict, subjects: dict, benches: dict, grid_images: int = 16) -> dict:
    """``results.json`` (summaries, subjects, folders), ``results.md``, grids; returns the JSON object."""
    obj = {"subjects": subjects,
           "benchmarks": {b: {lab: {"summary": r["summary"], "num_images": r["num_images"],
                                    "folder": r["folder"]} for lab, r in per.items()}
                          for b, per in results.items()}}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(to_jsonable(obj), f, indent=1, sort_keys=True)
    md = "# Evaluation\n\n" + "\n".join(f"- `{lab}`: " + ", ".join(f"{k} {v}" for k, v in d.items()
                                                                 if k != "label")
                                         for lab, d in subjects.items()) + "\n\n" + markdown_table(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    obj["grids"] = write_grids(results, benches, grid_images)
    obj["markdown"] = md
    return obj
