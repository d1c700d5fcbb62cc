"""The compile-only TPU rehearsal (``python -m awm_jax.plan``) on the tiny toy model for v5e:2x2 through
libtpu (CPU only), and its errors: no libtpu, unknown topology."""

import importlib.util
import os

import pytest

from awm_jax import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", os.path.join(ROOT, "configs", "toy.py"), "--config.model.path=",
        "--config.model.attention=xla",
        "--config.data.prompts_per_step=2", "--config.data.group_size=4", "--config.sample.batch_size=1",
        "--config.sample.num_steps=3", "--config.train.micro_batch_size=1", "--config.awm.train_timesteps=2"]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def test_without_libtpu_explains_the_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a))
    assert plan.main(TINY + ["--topology", "v5e:2x2"]) == 2
    assert 'pip install "jax[tpu]==' in capsys.readouterr().err


def test_unknown_chip_is_a_clear_error(capsys):
    if not HAS_LIBTPU:
        pytest.xfail("needs libtpu (pip install 'jax[tpu]'); the install hint is tested above")
    assert plan.main(TINY + ["--topology", "v9z:2x2"]) == 2
    assert "expected <chip>:<shape>" in capsys.readouterr().err


def test_tiny_toy_plan_on_v5e_2x2(tmp_path, capsys):
    if not HAS_LIBTPU:
        pytest.xfail("needs libtpu (pip install 'jax[tpu]'); the install hint is tested above")
    out = tmp_path / "plan.json"
    assert plan.main(TINY + ["--topology", "v5e:2x2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "plan for v5e:2x2: 4 chips" in text and "train_step:" in text and "rollout:" in text
    import json

    res = json.load(open(out))
    for k in ("train_step", "rollout"):
        assert res[k]["flops"] > 0 and res[k]["peak_bytes"] > 0 and 0 < res[k]["mfu"] <= 1
        # the jaxpr count has the loops' trip counts (sampler steps, micro-batches): above XLA's one iteration
        assert res[k]["program_flops"] > res[k]["flops"] and res[k]["est_s"] >= res[k]["time_s"]
    assert res["train_step"]["model_flops"] == res["train_step"]["program_flops"]  # no remat: no recompute
    assert res["step_s"] == pytest.approx(2 * res["rollout"]["est_s"] + res["train_step"]["est_s"])
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import plan_report  # the BENCHMARKS.md table row of this plan

    line = plan_report.row(res)
    assert line.startswith("|  | v5e:2x2 | data 4 |") and f"8 in {res['step_s']:.0f} s" in line
    assert line.count("|") == plan_report.HEADER.splitlines()[0].count("|")
    # the same plan on a pretend 1 MiB chip fails with exit code 1 and the numbers
    plan.CHIPS["v5e"], saved = (197e12, 2**20), plan.CHIPS["v5e"]
    try:
        assert plan.main(TINY + ["--topology", "v5e:2x2"]) == 1
    finally:
        plan.CHIPS["v5e"] = saved
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_scanned_layers_with_remat_plan(tmp_path):
    """The shipped full-size defaults (scanned layers, full remat) compile: the LoRA train step merges the
    split state into fresh Variables at its own trace level (nnx.scan refuses Variables of an outer one)."""
    if not HAS_LIBTPU:
        pytest.xfail("needs libtpu (pip install 'jax[tpu]'); the install hint is tested above")
    out = tmp_path / "plan.json"
    args = TINY + ["--config.model.scan_layers=True", "--config.model.remat_policy=full"]
    assert plan.main(args + ["--topology", "v5e:2x2", "--json", str(out)]) == 0
    import json

    res = json.load(open(out))
    assert res["train_step"]["flops"] > 0 and res["train_step"]["compile_s"] > 0
    t = res["train_step"]  # full remat recomputes each block's forward in the backward pass
    assert 1.05 * t["model_flops"] < t["program_flops"] < 2 * t["model_flops"]


def test_splash_plan_times_the_kernel_from_its_shapes(tmp_path):
    """``model.attention = auto`` picks splash for a TPU topology; the Mosaic kernels compile inside
    shard_map, their FLOPs are counted from shapes (XLA's own count of them is not used) and timed apart."""
    if not HAS_LIBTPU:
        pytest.xfail("needs libtpu (pip install 'jax[tpu]'); the install hint is tested above")
    out = tmp_path / "plan.json"
    args = TINY + ["--config.model.attention=auto", "--topology", "v5e:2x2", "--json", str(out)]
    assert plan.main(args) == 0
    import json

    res = json.load(open(out))
    assert res["attention"] == "splash"
    for k in ("train_step", "rollout"):
        r = res[k]
        assert r["kernel_flops"] > 0 and "custom kernels" in r["time_model"]
        assert r["est_s"] >= r["kernel_s"] == pytest.approx(r["kernel_flops"] / res["peak_flops"])
        # model FLOPs: XLA attention at the real lengths; the kernel also computes the padded blocks
        assert r["model_flops"] < r["program_flops"]
