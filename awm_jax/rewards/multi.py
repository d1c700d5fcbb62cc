"""Weighted sum of rewards: ``r = sum_i w_i r_i``.

Config: ``components = {key: {"weight": w, "name": registry_name (default: key), **scorer_config}}``;
a component may instead give a built scorer as ``{"weight": w, "scorer": callable}``. Example:
``get("multi", components={"ocr": {"weight": 1.0}, "jpeg_compressibility": {"weight": 0.1}})``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from awm_jax.rewards.base import RewardConfigError, check_batch


class MultiScorer:
    """Weighted sum of component scorers; ``components(...)`` gives each one's rewards."""

    def __init__(self, components: dict[str, dict[str, Any]]):
        from awm_jax.rewards import get

        if not isinstance(components, dict) or not components:
            raise RewardConfigError(f"multi: 'components' must be a non-empty dict, got {components!r}")
        self.scorers: dict[str, Any] = {}
        self.weights: dict[str, float] = {}
        for key, cfg in components.items():
            cfg = dict(cfg or {})
            if "weight" not in cfg:
                raise RewardConfigError(f"multi: component {key!r} needs a 'weight'")
            w = float(cfg.pop("weight"))
            if not math.isfinite(w):
                raise RewardConfigError(f"multi: component {key!r} has a non-finite weight {w!r}")
            scorer = cfg.pop("scorer", None)
            if scorer is None:
                scorer = get(cfg.pop("name", key), **cfg)
            elif cfg:
                raise RewardConfigError(f"multi: component {key!r} gives a scorer and extra keys "
                                        f"{sorted(cfg)}")
            self.scorers[key], self.weights[key] = scorer, w

    def components(self, images, prompts, metadata=None) -> dict[str, np.ndarray]:
        """Each component's float32 (B,) rewards, unweighted."""
        images, prompts, metadata = check_batch(images, prompts, metadata, "multi")
        out = {}
        for key, scorer in self.scorers.items():
            r = np.asarray(scorer(images, prompts, metadata), np.float32)
            if r.shape != (len(prompts),):
                raise ValueError(f"multi: component {key!r} returned shape {r.shape}, "
                                 f"expected ({len(prompts)},)")
            out[key] = r
        return out

    def __call__(self, images, prompts, metadata=None) -> np.ndarray:
        """The weighted sum, float32 (B,)."""
        comps = self.components(images, prompts, metadata)
        total = sum(self.weights[k] * r.astype(np.float64) for k, r in comps.items())
        return np.asarray(total, np.float32)
