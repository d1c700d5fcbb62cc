"""A pool of reward-scorer worker processes: host scoring that uses every core of the host.

``ScorerPool(name, workers=W, threads=k, **scorer_kwargs)`` starts ``W`` worker processes (``spawn``
context: a fresh interpreter each, no fork of the trainer's JAX / torch state); each builds its own copy of
the scorer (``awm_jax.rewards.get(name, **scorer_kwargs)``) with ``torch.set_num_threads(k)`` (and
``OMP_NUM_THREADS=k``, and ``intra_op_num_threads=k`` for a scorer that takes it, e.g. the onnxruntime OCR;
``JAX_PLATFORMS=cpu``: a worker never claims the accelerator). A call splits the
batch into ``min(W, B)`` contiguous chunks, one per worker, and re-assembles the results in row order, so
the pool is an ordinary scorer ``(images uint8 (B,H,W,3), prompts, metadata) -> float32 (B,)`` behind the
reward bridge (with ``evaluate`` where the wrapped scorer has one: per-sample entries are concatenated).

Failures are named: a worker that dies (segfault, OOM kill, ``os._exit``) or raises yields a
``RewardError`` naming the worker, its pid, its exit code and the prompts of its chunk; every other
chunk of that call is still collected first, so the pipes stay in step. A dead worker is replaced on the
next call (the bridge's retry re-scores the batch on the fresh worker). A scorer that cannot be built
(bad path, bad keyword) raises ``RewardConfigError`` at construction with the worker's message.

``reward.workers`` (configs/awm_base.py) sizes it: ``-1`` = :func:`default_workers` (one worker per
``CORES_PER_WORKER`` = 4 host cores) for the heavy scorers (>= 0.1 vCPU-s per image in
``awm_jax.reward_budget.COST``: GenEval, OCR, PickScore, ...; cheap or unknown ones stay in-process), ``0`` /
``1`` = the scorer in-process (no pool). Why 4: the host
scorers are a few transformer / CNN forwards per image at small batch, whose intra-op (threads) scaling
flattens after a few threads while separate processes scale with the cores; 4 threads per copy keeps the
model copies few (memory: a CLIP-H copy is ~4 GB in fp32, 45 copies on a 180-vCPU v6e-8 host ~180 GB of
its 1.4 TB) and each worker's chunk large enough to batch. On this 2-core VM it resolves to 1 (in-process).
Measured: ``benchmarks/rewards_throughput.py --workers`` (BENCHMARKS.md "Reward worker pool").
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from awm_jax.rewards.base import RewardConfigError, RewardError

__all__ = ["CORES_PER_WORKER", "ScorerPool", "default_workers", "resolve_workers"]

CORES_PER_WORKER = 4  # host cores per scorer worker of the default pool size (see the module docstring)
HEAVY_VCPU_S = 0.1  # the default pool only for scorers costing at least this many vCPU-seconds per image


def default_workers(cpu_count: int | None = None) -> int:
    """One worker per ``CORES_PER_WORKER`` cores of this host (at least 1)."""
    n = int(cpu_count or os.cpu_count() or 1)
    return max(1, n // CORES_PER_WORKER)


def resolve_workers(value: Any, cpu_count: int | None = None, name: str | None = None) -> int:
    """``reward.workers`` as a count: ``0`` -> 1 (in-process); ``-1`` -> :func:`default_workers` for a heavy
    scorer (``name`` costs >= ``HEAVY_VCPU_S`` vCPU-s per image in ``awm_jax.reward_budget.COST``, or
    ``name`` is None), else 1: a cheap or unknown scorer (JPEG, the toy's) is not worth the processes."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise RewardConfigError(f"config key 'reward.workers' = {value!r}: expected an integer "
                                "(-1 = one per 4 cores, 0 or 1 = in-process, N = N workers)") from None
    if v < -1:
        raise RewardConfigError(f"config key 'reward.workers' = {v}: expected -1, 0, 1 or a worker count")
    if v == -1:
        from awm_jax.reward_budget import COST

        heavy = name is None or COST.get(str(name), (0.0, ""))[0] >= HEAVY_VCPU_S
        return default_workers(cpu_count) if heavy else 1
    return max(1, v)


def _preview(prompts: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(repr(str(p)[:80]) for p in list(prompts)[:limit])
    more = len(prompts) - limit
    return f"[{shown}{f', ... (+{more} more)' if more > 0 else ''}]"


def _worker_main(conn, name: str, kwargs: dict, threads: int) -> None:
    """A worker process: build the scorer, then answer ``(method, images, prompts, metadata)`` requests
    with ``("ok", result)`` / ``("error", message)`` until ``None`` or the pipe closes."""
    try:
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:  # a scorer without torch (ONNX, numpy)
            pass
        import inspect

        from awm_jax import rewards

        factory = rewards.resolve(name)
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        if "intra_op_num_threads" in params and int(kwargs.get("intra_op_num_threads", -1)) == -1:
            kwargs = {**kwargs, "intra_op_num_threads": threads}  # onnxruntime (OCR): not set by torch / OMP
        scorer = factory(**kwargs)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it named
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", hasattr(scorer, "evaluate")))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        method, images, prompts, metadata = msg
        try:
            if method == "evaluate":
                out = scorer.evaluate(images, prompts, metadata)
            else:
                out = np.asarray(scorer(images, prompts, metadata), np.float32)
            conn.send(("ok", out))
        except Exception as e:  # noqa: BLE001 - sent back and raised named in the parent
            tb = traceback.format_exc(limit=3).strip().splitlines()[-3:]
            conn.send(("error", f"{type(e).__name__}: {e} ({' | '.join(tb)})"))


class _Env:
    """Set environment variables around a ``spawn`` start (the child copies ``os.environ``)."""

    _lock = threading.Lock()

    def __init__(self, **env: str):
        self.env, self.old = env, {}

    def __enter__(self):
        self._lock.acquire()
        self.old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._lock.release()


class ScorerPool:
    """``workers`` processes each holding scorer ``name`` built with ``scorer_kwargs``; see the module
    docstring. ``threads``: torch threads per worker (0 = cores // workers, at least 1); ``timeout_s``: the
    longest wait for one call's chunks (0 = none; a worker past it is killed and named);
    ``start_timeout_s``: the longest wait for the workers to build their scorers."""

    def __init__(self, name: str, workers: int, threads: int = 0, timeout_s: float = 0.0,
                 start_timeout_s: float = 900.0, **scorer_kwargs: Any):
        import multiprocessing as mp

        from awm_jax import rewards

        try:
            factory = rewards.resolve(name)
        except (KeyError, ImportError) as e:
            raise RewardConfigError(f"reward pool: {e}") from e
        self.name, self.workers = str(name), int(workers)
        if self.workers < 1:
            raise RewardConfigError(f"reward pool {name!r}: workers must be >= 1, got {workers!r}")
        cores = os.cpu_count() or 1
        self.threads = int(threads) if int(threads) > 0 else max(1, cores // self.workers)
        self.timeout_s, self.start_timeout_s = float(timeout_s), float(start_timeout_s)
        self.kwargs = dict(scorer_kwargs)
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._procs: list[Any] = [None] * self.workers
        self._conns: list[Any] = [None] * self.workers
        self._has_evaluate = hasattr(factory, "evaluate")  # until the workers report on the built scorer
        self._start(range(self.workers))

    # -- processes -----------------------------------------------------------------------
    def _start(self, indices) -> None:
        from multiprocessing.connection import wait

        pending = {}
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
        for i in indices:
            parent, child = self._ctx.Pipe(duplex=True)
            proc = self._ctx.Process(target=_worker_main, args=(child, self.name, self.kwargs, self.threads),
                                     name=f"reward-worker-{i}", daemon=True)
            with _Env(**env):
                proc.start()
            child.close()
            self._procs[i], self._conns[i] = proc, parent
            pending[parent] = i
        deadline = time.monotonic() + self.start_timeout_s
        errors = []
        while pending:
            left = deadline - time.monotonic()
            ready = wait(list(pending) + [self._procs[i].sentinel for i in pending.values()], max(0.0, left))
            if not ready:
                errors.append(f"workers {sorted(pending.values())} did not build the scorer in "
                              f"{self.start_timeout_s:.0f} s")
                break
            for obj in ready:
                conn = obj if obj in pending else next((c for c, i in pending.items()
                                                        if self._procs[i].sentinel == obj), None)
                if conn is None or conn not in pending:
                    continue
                i = pending.pop(conn)
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    self._procs[i].join(5)
                    kind, payload = "error", f"exited with code {self._procs[i].exitcode} while starting"
                if kind != "ready":
                    errors.append(f"worker {i}: {payload}")
                else:
                    self._has_evaluate = bool(payload)  # the scorer built there has evaluate()
        if errors:
            self.close()
            raise RewardConfigError(f"reward pool {self.name!r} ({self.kwargs}): cannot build the scorer "
                                    f"in its workers: {'; '.join(errors)}")

    def _discard(self, i: int) -> None:
        proc, conn = self._procs[i], self._conns[i]
        self._procs[i] = self._conns[i] = None
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(5)

    def pids(self) -> list[int | None]:
        """The worker processes' ids (None: a dead worker not yet replaced)."""
        return [p.pid if p is not None else None for p in self._procs]

    # -- scoring -------------------------------------------------------------------------
    def _run(self, method: str, images, prompts, metadata) -> list[Any]:
        """Send one chunk per worker, collect every chunk, raise naming the failed ones."""
        from multiprocessing.connection import wait

        images = np.asarray(images)
        prompts = list(prompts)
        metadata = [{} for _ in prompts] if metadata is None else list(metadata)
        b = len(prompts)
        if len(images) != b or len(metadata) != b:
            raise ValueError(f"reward pool {self.name!r}: got {len(images)} images, {b} prompts and "
                             f"{len(metadata)} metadata entries")
        with self._lock:
            dead = [i for i, p in enumerate(self._procs) if p is None or not p.is_alive()]
            for i in dead:
                self._discard(i)
            if dead:
                self._start(dead)  # replace workers lost in an earlier call
            chunks = [c for c in np.array_split(np.arange(b), min(self.workers, max(b, 1))) if len(c)]
            results: list[Any] = [None] * len(chunks)
            failures: list[str] = []
            pending: dict[Any, int] = {}
            for w, rows in enumerate(chunks):
                msg = (method, images[rows], [prompts[r] for r in rows], [metadata[r] for r in rows])
                try:
                    self._conns[w].send(msg)
                    pending[self._conns[w]] = w
                except (OSError, ValueError) as e:
                    failures.append(self._failure(w, rows, prompts, f"could not take the chunk ({e})"))
                    self._discard(w)
            deadline = time.monotonic() + self.timeout_s if self.timeout_s > 0 else None
            while pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                sentinels = {self._procs[w].sentinel: c for c, w in pending.items()}
                ready = wait(list(pending) + list(sentinels), left)
                if not ready:
                    for w in list(pending.values()):
                        failures.append(self._failure(w, chunks[w], prompts,
                                                      f"no answer within {self.timeout_s:g} s (killed)"))
                        self._discard(w)
                    pending.clear()
                    break
                for obj in ready:
                    conn = obj if obj in pending else sentinels.get(obj)
                    if conn not in pending:
                        continue
                    w = pending.pop(conn)
                    try:
                        kind, payload = conn.recv()
                    except (EOFError, OSError):
                        proc = self._procs[w]
                        proc.join(5)
                        failures.append(self._failure(w, chunks[w], prompts,
                                                      f"died (exit code {proc.exitcode})"))
                        self._discard(w)
                        continue
                    if kind == "ok":
                        results[w] = payload
                    else:
                        failures.append(self._failure(w, chunks[w], prompts, f"raised {payload}"))
        if failures:
            raise RewardError(f"reward pool {self.name!r}: {'; '.join(failures)}")
        return list(zip(chunks, results))

    def _failure(self, w: int, rows, prompts, what: str) -> str:
        pid = self._procs[w].pid if self._procs[w] is not None else None
        chunk = [prompts[r] for r in rows]
        return (f"worker {w} (pid {pid}) {what} on rows {int(rows[0])}..{int(rows[-1])}, "
                f"{len(chunk)} prompt(s) {_preview(chunk)}")

    def __call__(self, images, prompts, metadata=None) -> np.ndarray:
        """Rewards float32 (B,) in row order, scored across the workers."""
        parts = self._run("score", images, prompts, metadata)
        out = np.empty((len(list(prompts)),), np.float32)
        for rows, r in parts:
            r = np.asarray(r, np.float32)
            if r.shape != (len(rows),):
                raise RewardError(f"reward pool {self.name!r}: a worker returned shape {r.shape} for "
                                  f"{len(rows)} rows")
            out[rows] = r
        return out

    @property
    def evaluate(self):
        """The wrapped scorer's ``evaluate`` across the workers (AttributeError if it has none)."""
        if not self._has_evaluate:
            raise AttributeError(f"reward scorer {self.name!r} has no evaluate()")
        return self._evaluate

    def _evaluate(self, images, prompts, metadata=None) -> dict:
        parts = self._run("evaluate", images, prompts, metadata)
        keys = list(parts[0][1]) if parts else []
        out: dict[str, Any] = {}
        for k in keys:
            vals = [res[k] for _, res in parts]
            if all(isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == len(rows)
                   for (rows, _), v in zip(parts, vals)):
                out[k] = np.concatenate(vals)
            elif all(isinstance(v, (list, tuple)) and len(v) == len(rows)
                     for (rows, _), v in zip(parts, vals)):
                out[k] = [x for v in vals for x in v]
            else:
                raise RewardError(f"reward pool {self.name!r}: evaluate() entry {k!r} is not per-sample "
                                  "(an array or list with one entry per image), so it cannot be re-assembled")
        return out

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop every worker (asks, then kills after 2 s)."""
        for conn in self._conns:
            if conn is not None:
                try:
                    conn.send(None)
                except (OSError, ValueError):
                    pass
        for i, proc in enumerate(self._procs):
            if proc is not None:
                proc.join(2)
            self._discard(i)

    def __enter__(self) -> ScorerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
