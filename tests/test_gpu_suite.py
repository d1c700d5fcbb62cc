"""The GPU suite's CPU dry mode (tiny preset, same code path) writes its JSON and table."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_suite  # noqa: E402


def test_gpu_suite_dry(tmp_path):
    rec = gpu_suite.run_suite(dry=True, out_dir=str(tmp_path))
    saved = json.load(open(tmp_path / "gpu_suite.json"))
    assert saved["dry"] and set(saved["parts"]) == {"forward", "rollout_14"}
    for p in rec["parts"].values():
        assert p["parity_rel_max_err"] < 1e-4
        assert p["jax"]["median_s"] > 0 and p["torch_eager"]["median_s"] > 0
    table = open(tmp_path / "gpu_suite.md").read()
    assert "| forward | torch_eager |" in table and "| rollout_14 | jax |" in table
