"""Deprecated name of ``benchmarks/memory_plan.py`` (it plans every family since 2026-12-07); kept for one
release: ``python benchmarks/flux_memory_plan.py ...`` runs the same script and says so."""

import runpy
import sys
import warnings
from pathlib import Path

if __name__ == "__main__":
    warnings.warn("benchmarks/flux_memory_plan.py is renamed benchmarks/memory_plan.py", DeprecationWarning,
                  stacklevel=1)
    print("note: benchmarks/flux_memory_plan.py is renamed benchmarks/memory_plan.py", file=sys.stderr)
    runpy.run_path(str(Path(__file__).with_name("memory_plan.py")), run_name="__main__")
