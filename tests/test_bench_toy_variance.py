"""benchmarks/toy_variance.py analysis on synthetic curves (no training)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import toy_variance as TV  # noqa: E402


def _curve(vals, accs):
    return [
        {"step": 100 * (i + 1), "val_loss_clean": v, "train_loss": v + 0.1, "accuracy": {"overall": a}}
        for i, (v, a) in enumerate(zip(vals, accs))
    ]


def test_summary_and_outputs(tmp_path):
    curves = {
        "clean_x0": _curve([0.5, 0.3, 0.2, 0.15], [0.1, 0.2, 0.3, 0.35]),
        "noisy_xs": _curve([0.6, 0.45, 0.31, 0.25], [0.05, 0.1, 0.2, 0.25]),
    }
    s = TV.summarize(curves)
    assert s["clean_x0"]["final_val_loss_clean"] == 0.15 and s["noisy_xs"]["best_accuracy"] == 0.25
    assert s["clean_steps_to_noisy_final_val"] == 300  # clean hit 0.2 <= 0.25 at step 300
    assert TV.steps_to_reach(curves["clean_x0"], "overall", 0.3, lower_is_better=False) == 300
    assert TV.steps_to_reach(curves["noisy_xs"], "val_loss_clean", 0.1, lower_is_better=True) is None
    for obj, c in curves.items():
        (tmp_path / "root" / obj).mkdir(parents=True)
        (tmp_path / "root" / obj / "curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in c))
    out = tmp_path / "out"
    got = TV.main(["--analyze-only", "--root", str(tmp_path / "root"), "--out", str(out)])
    assert all(got[obj].pop("final_eval") is None for obj in curves)  # no eval.json in these run dirs
    assert got == s
    assert (out / "toy_variance.png").stat().st_size > 1000
    md = (out / "toy_variance.md").read_text()
    assert "| 400 | 0.1500 | 0.2500 |" in md and "by step 300" in md


def test_missing_curve_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="curve.jsonl does not exist"):
        TV.main(["--analyze-only", "--root", str(tmp_path), "--out", str(tmp_path / "o")])
