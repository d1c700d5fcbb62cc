"""Scorers for the worker-pool and reward-server tests, importable by name (``pool_scorers:RowScorer``) in
the spawned worker / server processes (tests/ is on their ``sys.path``)."""

import os
import time

import numpy as np


class RowScorer:
    """``r = mean pixel + len(prompt) * scale``; a sample whose metadata has ``die`` ends the process with
    exit code 3 (a crashed worker; not where ``POOL_SCORERS_MORTAL=0``); ``fail`` raises, ``sleep`` hangs.
    ``evaluate`` reports the process and its threads."""

    def __init__(self, scale: float = 1.0, intra_op_num_threads: int = -1):
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale, self.ort_threads = float(scale), intra_op_num_threads

    def __call__(self, images, prompts, metadata=None):
        metadata = metadata or [{} for _ in prompts]
        if any(m.get("die") for m in metadata) and os.environ.get("POOL_SCORERS_MORTAL", "1") == "1":
            os._exit(3)
        time.sleep(max([float(m.get("sleep", 0)) for m in metadata] + [0.0]))  # a hung scorer
        if any(m.get("fail") for m in metadata):
            raise RuntimeError("asked to fail")
        return expected(images, prompts, self.scale)

    def evaluate(self, images, prompts, metadata=None):
        n = len(prompts)
        return {"score": self(images, prompts, metadata), "pid": np.full(n, os.getpid()),
                "omp": [os.environ.get("OMP_NUM_THREADS")] * n, "ort": [self.ort_threads] * n}


def expected(images, prompts, scale=1.0):
    images = np.asarray(images)
    return (images.reshape(len(images), -1).mean(-1) + scale * np.array([len(p) for p in prompts])).astype(
        np.float32)
