"""Reward scorers and their registry.

``get(name, **config)`` builds a scorer ``(images uint8 (B,H,W,3), prompts, metadata) -> np.float32 (B,)``.
Built-in scorers are imported lazily (first ``get``), so importing this package pulls in neither
torch nor transformers:

    ocr                     awm_jax.rewards.ocr:OCRScorer
    pickscore               awm_jax.rewards.pickscore:PickScoreScorer
    geneval                 awm_jax.rewards.geneval:GenEvalScorer
    aesthetic               awm_jax.rewards.aesthetic:AestheticScorer
    jpeg_compressibility    awm_jax.rewards.jpeg:JpegCompressibility
    jpeg_incompressibility  awm_jax.rewards.jpeg:JpegIncompressibility
    multi                   awm_jax.rewards.multi:MultiScorer
    toy_geneval             awm_jax.toy.reward:ToyGenEvalScorer

``register(name)`` adds a factory (class or function) eagerly; ``available()`` lists every name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from awm_jax.rewards.base import RewardConfigError, RewardError

__all__ = ["RewardConfigError", "RewardError", "available", "get", "register", "resolve"]

_LAZY: dict[str, str] = {
    "ocr": "awm_jax.rewards.ocr:OCRScorer",
    "pickscore": "awm_jax.rewards.pickscore:PickScoreScorer",
    "geneval": "awm_jax.rewards.geneval:GenEvalScorer",
    "aesthetic": "awm_jax.rewards.aesthetic:AestheticScorer",
    "jpeg_compressibility": "awm_jax.rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "awm_jax.rewards.jpeg:JpegIncompressibility",
    "multi": "awm_jax.rewards.multi:MultiScorer",
    "toy_geneval": "awm_jax.toy.reward:ToyGenEvalScorer",
}
_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a scorer factory under ``name`` (an already used name is an error)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"reward {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    """Sorted names of every registered (eager or lazy) scorer."""
    return sorted(set(_REGISTRY) | set(_LAZY))


def resolve(name: str) -> Callable[..., Any]:
    """The factory for ``name``, importing its module on first use."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name not in _LAZY:
        raise KeyError(f"unknown reward {name!r}; valid names: {', '.join(available())}")
    module_name, attr = _LAZY[name].split(":")
    module = importlib.import_module(module_name)
    try:
        factory = getattr(module, attr)
    except AttributeError as e:
        raise ImportError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}") from e
    _REGISTRY[name] = factory
    return factory


def get(name: str, **config: Any) -> Any:
    """Build the scorer ``name`` with keyword ``config`` (model paths etc.).

    Unknown names raise ``KeyError`` listing the valid ones; a bad config raises at construction.
    """
    return resolve(name)(**config)
