"""The GPU suite's CPU dry mode (tiny preset, same code path: forward, rollout, AWM and Flow-GRPO train steps
vs their PyTorch reference steps) writes its JSON and table; the budget guard skips late parts."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_suite  # noqa: E402


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    return gpu_suite.run_suite(dry=True, out_dir=str(out), attention="xla"), out


def test_gpu_suite_dry(dry):
    rec, out = dry
    saved = json.load(open(out / "gpu_suite.json"))
    assert saved["dry"] and saved["skipped"] == []
    assert set(saved["parts"]) == {"forward", "rollout_14", "awm_train_step", "flow_grpo_train_step"}
    for name in ("forward", "rollout_14"):
        p = rec["parts"][name]
        assert p["parity_rel_max_err"] < 1e-4
        assert p["jax"]["median_s"] > 0 and p["torch_eager"]["median_s"] > 0
    table = open(out / "gpu_suite.md").read()
    assert "| forward | torch_eager |" in table and "| rollout_14 | jax |" in table
    assert table.startswith("JAX attention: xla") and saved["attention"] == "xla"
    assert rec["parts"]["forward"]["attention"] == "xla"
    assert rec["parts"]["awm_train_step"]["attention"] == "xla"


def test_cudnn_rows_need_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="--attention cudnn needs its accelerator"):
        gpu_suite.run_suite(dry=True, out_dir=str(tmp_path), attention="cudnn")
    with pytest.raises(SystemExit):  # argparse: only auto / xla / cudnn
        gpu_suite.main(["--dry", "--attention", "flash", "--out-dir", str(tmp_path)])


def test_train_step_parts(dry):
    rec, out = dry
    for algo in ("awm", "flow_grpo"):
        p = rec["parts"][f"{algo}_train_step"]
        assert p["jax"]["median_s"] > 0 and p["torch_eager"]["median_s"] > 0
        assert p["jax"]["flops"] > 0  # the model FLOPs (jaxpr, no remat): the MFU numerator
        assert p["peak_flops"] is None and "mfu" not in p["jax"]  # no bf16 peak for a CPU
    table = open(out / "gpu_suite.md").read()
    assert "| awm_train_step | torch_eager |" in table and "| flow_grpo_train_step | jax |" in table
    assert gpu_suite._peak_flops("NVIDIA H100 80GB HBM3") == 989e12


def test_budget_guard_skips_late_parts(tmp_path):
    rec = gpu_suite.run_suite(dry=True, out_dir=str(tmp_path), budget_s=-1.0)  # every part starts too late
    assert rec["skipped"] == ["forward", "rollout_14", "awm_train_step", "flow_grpo_train_step"]
    assert rec["parts"] == {}
    assert "skipped (budget" in open(tmp_path / "gpu_suite.md").read()
