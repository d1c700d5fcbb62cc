"""Smoke test of the JAX-vs-PyTorch forward benchmark (benchmarks/mmdit_forward.py, tiny preset)."""

import importlib.util
import json
import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _module(name):
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(BENCH)


def test_mmdit_forward_tiny_runs_in_process(tmp_path):
    bench = _module("mmdit_forward")
    out = tmp_path / "res.jsonl"
    rec = bench.run_benchmark("tiny", runs=1, warmup=1, compile=False, out=str(out), verbose=False)
    assert rec["parity_rel_max_err"] < 1e-5
    assert rec["finite"]
    for impl in ("jax", "torch_eager"):
        t = rec[impl]
        assert len(t["times_s"]) == 1
        assert all(math.isfinite(x) and x > 0 for x in (t["median_s"], t["min_s"], t["first_s"]))
    assert "torch_compile" not in rec and rec["ratio_compile"] is None
    assert math.isfinite(rec["ratio_eager"]) and rec["ratio_eager"] > 0
    line = json.loads(out.read_text().strip())
    assert line["preset"] == "tiny" and line["machine"]["cpu_count"] == os.cpu_count()
    assert line["parity_rel_max_err"] == pytest.approx(rec["parity_rel_max_err"])


def test_mmdit_forward_rejects_bad_arguments():
    bench = _module("mmdit_forward")
    with pytest.raises(ValueError, match="unknown --preset 'huge'"):
        bench.run_benchmark("huge", runs=1, verbose=False)
    with pytest.raises(ValueError, match="--resolution 72"):
        bench.make_inputs("tiny", 1, 72, 4)
    with pytest.raises(ValueError, match="pos_embed limit"):
        bench.make_inputs("tiny", 1, 512, 4)
