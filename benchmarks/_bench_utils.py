"""Shared helpers of the JAX-vs-PyTorch benchmarks (timing medians, machine info, results files).

Every benchmark times the Flax side and the diffusers PyTorch reference in the same process, reports
medians of several runs after warm-up and the ratio ``torch_time / jax_time`` (> 1: JAX faster).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")  # the committed records (pass --out to write there)
RUNS_DIR = os.path.join(ROOT, "runs", "benchmarks")  # default output: never onto committed files


def require_plotting(what: str) -> None:
    """Stop before any work when matplotlib (the optional plotting dependency, dev extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(f"error: {what} plots its results with matplotlib, which is not installed: "
                         "pip install matplotlib (or -e '.[dev]')") from None


def torch_device(name: str):
    """``torch.device`` for ``--device`` (``cpu`` or ``cuda``); a clear error if CUDA is asked but absent."""
    import torch

    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch reports no CUDA device on this machine")
    return torch.device(name)


def torch_dtype(name: str):
    """``torch`` dtype for ``--dtype`` (``fp32`` / ``bf16``)."""
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"--dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def jax_dtype(name: str):
    """``jnp`` dtype for ``--dtype`` (``fp32`` / ``bf16``)."""
    import jax.numpy as jnp

    table = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
    if name not in table:
        raise ValueError(f"--dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def set_torch_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` when ``n`` is given (None keeps torch's default)."""
    import torch

    if n is not None:
        if n < 1:
            raise ValueError(f"--torch-threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def torch_sync(device) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], runs: int, warmup: int = 1,
               sync: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Time ``fn()``: ``warmup`` untimed calls (the first one timed separately as ``first_s``, i.e. the
    compile / first-call time), then ``runs`` timed calls; ``sync(result)`` blocks until the result is
    ready (``jax.block_until_ready`` / CUDA synchronize).  Returns median/min/all times in seconds."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    sync = sync or (lambda r: r)
    first = None
    for i in range(max(warmup, 1)):
        t0 = time.perf_counter()
        sync(fn())
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "first_s": first, "times_s": times}


def rel_max_err(a, b) -> float:
    """``max|a - b| / max|b|`` in float64 (b is the reference)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_max_err: shapes differ {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def machine_info(device) -> dict[str, Any]:
    """Platform, CPU count, library versions and the accelerators both frameworks run on."""
    import jax
    import torch

    jdev = jax.devices()[0]
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_device_kind": jdev.device_kind,
        "torch": torch.__version__,
        "torch_device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    if getattr(device, "type", "") == "cuda":
        info["torch_device_kind"] = torch.cuda.get_device_name(device)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover - diffusers is a hard dependency of the benchmarks
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def append_jsonl(path: str | None, record: dict[str, Any]) -> str | None:
    """Append ``record`` (plus a UTC timestamp) as one JSON line to ``path`` (None: don't write)."""
    if path is None:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rec = {"utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **record}
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=_json_default) + "\n")
    return path


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def ratio(torch_s: float | None, jax_s: float | None) -> float | None:
    """``torch_s / jax_s`` (None if either is missing)."""
    if torch_s is None or jax_s is None or jax_s <= 0:
        return None
    return torch_s / jax_s


def format_table(rows: list[dict[str, Any]], jax_key: str = "jax") -> str:
    """Markdown table of ``rows`` (``{"impl", "median_s", "min_s", "first_s"}``) with a ratio column
    ``median(row) / median(jax)``."""
    base = next((r["median_s"] for r in rows if r["impl"] == jax_key and r.get("median_s")), None)
    lines = ["| impl | median (ms) | min (ms) | first call (s) | time / jax time |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['impl']} | error: {r['error']} | | | |")
            continue
        rat = ratio(r["median_s"], base)
        lines.append(f"| {r['impl']} | {1e3 * r['median_s']:.2f} | {1e3 * r['min_s']:.2f} | "
                     f"{r['first_s']:.2f} | {'' if rat is None else f'{rat:.2f}'} |")
    return "\n".join(lines)


def finish_record(rec: dict[str, Any], device, out: str | None,
                  report: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any]:
    """Add torch/JAX ratios and machine info to a benchmark record, append it to ``out``, print the report."""
    for k in ("eager", "compile"):
        r = rec.get(f"torch_{k}")
        rec[f"ratio_{k}"] = ratio(r.get("median_s"), rec["jax"]["median_s"]) if r else None
    rec["machine"] = machine_info(device)
    append_jsonl(out, rec)
    if report is not None:
        print(report(rec))
    return rec


def add_common_args(p) -> None:
    """The flags every benchmark shares."""
    p.add_argument("--runs", type=int, default=5, help="timed runs after warm-up (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (the first includes compile)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch device")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile timing")
    p.add_argument("--out", default=None, help="results JSONL (default benchmarks/results/<name>.jsonl; "
                                               "'-' to write nothing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "splash", "cudnn"],
                   help="the Flax model's attention kernel (config key model.attention)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own choice = all cores)")


def out_path(arg: str | None, name: str) -> str | None:
    """Resolve ``--out``: default ``runs/benchmarks/<name>.jsonl`` (the committed records are written with
    ``--out benchmarks/results/<name>.jsonl``), ``-`` for none."""
    if arg == "-":
        return None
    return arg or os.path.join(RUNS_DIR, f"{name}.jsonl")


def torch_compile_timing(module_fn: Callable, call: Callable[[Callable], Any], runs: int, warmup: int,
                         sync) -> dict[str, Any]:
    """Time ``call(torch.compile(module_fn))``; a failure to compile is reported, not raised."""
    import torch

    try:
        compiled = torch.compile(module_fn)
        return time_calls(lambda: call(compiled), runs, warmup, sync)
    except Exception as e:  # noqa: BLE001 - inductor needs a working C++/triton toolchain; report why not
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return {"error": msg}
