"""``python -m awm_jax.evaluate``: benchmarks (benchmarks.py), subjects (subjects.py), cached generation and
scoring (runner.py), reports (report.py)."""

from awm_jax.evaluation.benchmarks import BENCHMARKS, EvalError

__all__ = ["BENCHMARKS", "EvalError"]
