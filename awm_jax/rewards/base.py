"""Shared pieces of the reward scorers: errors, input validation, path checks.

A scorer is a callable ``scorer(images, prompts, metadata) -> np.float32 (B,)`` with ``images``
uint8 ``(B, H, W, 3)`` (NHWC, RGB), ``prompts`` a list of ``B`` strings and ``metadata`` a list
of ``B`` dicts (or ``None``). This module holds the checks every scorer runs on that input.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


class RewardError(RuntimeError):
    """A reward could not be computed (scorer failure after retries, NaN/inf, bad output)."""


class RewardConfigError(ValueError):
    """A scorer was configured wrongly (missing model path, bad weight, unknown option)."""


def check_dir(path: Any, what: str) -> str:
    """Return ``path`` as a string if it is an existing directory, else raise naming it."""
    if path is None or str(path) == "":
        raise RewardConfigError(f"{what}: a model folder path is required, got {path!r}")
    p = os.fspath(path)
    if not os.path.isdir(p):
        raise RewardConfigError(f"{what}: model folder {p!r} does not exist or is not a directory")
    return p


def check_file(path: Any, what: str) -> str:
    """Return ``path`` as a string if it is an existing file, else raise naming it."""
    if path is None or str(path) == "":
        raise RewardConfigError(f"{what}: a file path is required, got {path!r}")
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise RewardConfigError(f"{what}: file {p!r} does not exist")
    return p


def check_batch(images: Any, prompts: Any, metadata: Any, who: str) -> tuple[np.ndarray, list, list]:
    """Validate one scorer input; returns (uint8 (B,H,W,3) array, prompts list, metadata list).

    ``metadata=None`` becomes a list of empty dicts. Raises ``ValueError`` naming the scorer and
    the offending shape / dtype / length.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{who}: images must be (B, H, W, 3), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"{who}: images must be uint8, got dtype {images.dtype}")
    prompts = list(prompts)
    b = images.shape[0]
    if len(prompts) != b:
        raise ValueError(f"{who}: got {b} images but {len(prompts)} prompts")
    if metadata is None:
        metadata = [{} for _ in range(b)]
    metadata = list(metadata)
    if len(metadata) != b:
        raise ValueError(f"{who}: got {b} images but {len(metadata)} metadata entries")
    return images, prompts, metadata
