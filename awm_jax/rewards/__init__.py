"""Reward scorers and their registry.

``get(name, **config)`` builds a scorer ``(images uint8 (B,H,W,3), prompts, metadata) -> np.float32 (B,)``.
Built-in scorers are imported lazily (first ``get``), so importing this package pulls in neither
torch nor transformers:

    ocr                     awm_jax.rewards.ocr:OCRScorer
    pickscore               awm_jax.rewards.clip_rewards:pickscore (host or accelerator)
    geneval                 awm_jax.rewards.geneval:GenEvalScorer
    aesthetic               awm_jax.rewards.clip_rewards:aesthetic (host or accelerator)
    hps                     awm_jax.rewards.clip_rewards:hps (HPSv2.1; host or accelerator)
    clipscore               awm_jax.rewards.clip_rewards:clipscore (2.5 * max(cos, 0); host or accelerator)
    imagereward             awm_jax.rewards.imagereward:ImageRewardScorer
    jpeg_compressibility    awm_jax.rewards.jpeg:JpegCompressibility
    jpeg_incompressibility  awm_jax.rewards.jpeg:JpegIncompressibility
    multi                   awm_jax.rewards.multi:MultiScorer
    toy_geneval             awm_jax.toy.reward:ToyGenEvalScorer

``register(name)`` adds a factory (class or function) eagerly; ``available()`` lists every name.
``from_config(config)`` builds the trainer's scorer from ``config.reward`` (the section named by
``reward.name``, e.g. ``reward.geneval.detector_path``, plus ``reward.kwargs``); ``config_problems(config)``
lists the reward model paths that are missing, before anything loads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from awm_jax.rewards.base import RewardConfigError, RewardError

__all__ = ["RewardConfigError", "RewardError", "available", "config_kwargs", "config_problems", "from_config",
           "get", "register", "resolve"]

_LAZY: dict[str, str] = {
    "ocr": "awm_jax.rewards.ocr:OCRScorer",
    "pickscore": "awm_jax.rewards.clip_rewards:pickscore",
    "geneval": "awm_jax.rewards.geneval:GenEvalScorer",
    "aesthetic": "awm_jax.rewards.clip_rewards:aesthetic",
    "hps": "awm_jax.rewards.clip_rewards:hps",
    "clipscore": "awm_jax.rewards.clip_rewards:clipscore",
    "imagereward": "awm_jax.rewards.imagereward:ImageRewardScorer",
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
    """The factory for ``name``, importing its module on first use; ``"package.module:attr"`` names a
    factory outside the registry (a scorer of your own, e.g. in pool workers or behind a reward server)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    spec = _LAZY.get(name) or (name if ":" in name else None)
    if spec is None:
        raise KeyError(f"unknown reward {name!r}; valid names: {', '.join(available())} "
                       "(or 'package.module:factory')")
    module_name, attr = spec.split(":", 1)
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


def _sections(config) -> dict:
    """The declared per-reward config sections (configs/awm_base.py), by reward name."""
    r = config.reward
    return {"geneval": r.geneval, "ocr": r.ocr, "pickscore": r.pickscore, "aesthetic": r.aesthetic,
            "hps": r.hps, "clipscore": r.clipscore, "toy_geneval": r.toy_geneval}


def config_kwargs(config) -> dict[str, tuple[str, Any]]:
    """``{keyword: (config key, value)}`` for ``get(config.reward.name, ...)``: the reward's own section
    (values "" dropped: the scorer's default) overridden by ``reward.kwargs``."""
    name = config.reward.name
    out: dict[str, tuple[str, Any]] = {}
    section = _sections(config).get(name)
    if section is not None:
        for k, v in section.to_dict().items():
            if v != "":
                out[k] = (f"reward.{name}.{k}", v)
    for k, v in config.reward.kwargs.to_dict().items():
        out[k] = (f"reward.kwargs.{k}", v)
    return out


def from_config(config) -> Any:
    """The scorer ``config.reward`` names, built with :func:`config_kwargs`: in this process, in
    ``reward.workers`` worker processes (``awm_jax.rewards.pool``), or on the reward servers listed in
    ``reward.remote`` (``awm_jax.rewards.remote``; the scorer is built there, not here)."""
    from awm_jax.rewards import pool

    if config.reward.remote:
        from awm_jax.rewards.remote import RemoteScorer

        return RemoteScorer(config.reward.remote, name=config.reward.name,
                            timeout_s=config.reward.remote_timeout_s,
                            retries=0)  # a failed batch is retried by the bridge (reward.retries)
    kwargs = {k: v for k, (_, v) in config_kwargs(config).items()}
    workers = pool.resolve_workers(config.reward.workers, name=config.reward.name)
    if workers > 1 and kwargs.get("device") != "accelerator":  # accelerator scorers stay in this process
        return pool.ScorerPool(config.reward.name, workers=workers, threads=config.reward.worker_threads,
                               **kwargs)
    return get(config.reward.name, **kwargs)


def config_problems(config) -> list[str]:
    """Pre-flight: the reward name is known, every ``*_path`` keyword the scorer requires is given, and every
    given path exists; one message per problem naming the config key and the path. Loads no model."""
    import inspect
    import os

    name = config.reward.name
    if config.reward.remote:  # built on the reward servers: their paths are not this host's
        return []
    try:
        factory = resolve(name)
    except KeyError as e:
        return [f"config key 'reward.name' = {name!r}: {e.args[0]}"]
    except ImportError as e:
        return [f"config key 'reward.name' = {name!r}: cannot import the scorer ({e})"]
    kw = config_kwargs(config)
    out = []
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    for p in params.values():
        if p.name.endswith("_path") and p.default is inspect.Parameter.empty and p.name not in kw:
            out.append(f"config key 'reward.{name}.{p.name}' is empty: reward {name!r} needs it "
                       "(tools/fetch_assets.py downloads the reward models)")
    for k, (key, v) in kw.items():
        if k.endswith("_path") and isinstance(v, str) and v and not os.path.exists(v):
            out.append(f"config key '{key}' = {v!r}: no such file or folder")
    return out
