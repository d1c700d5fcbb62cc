"""Deprecated aliases of public names that moved or were renamed (CHANGELOG.md, "Deprecated").

A module that lost a public name keeps it through a module ``__getattr__`` made by :func:`aliases`: the old
name still works, resolves lazily to its replacement (no import of the new home until used, so the
package's import layering is unchanged) and warns once per use with a ``DeprecationWarning`` naming the
replacement. Names whose replacement has another signature get a small wrapper here.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

# old module -> {old name: "new.module:new_name"}
MOVED: dict[str, dict[str, str]] = {
    "awm_jax.sampling": {"sd3_grid": "awm_jax.sampling.schedules:shifted_grid",
                         "sample_final": "awm_jax.deprecation:sample_final"},
    "awm_jax.sampling.schedules": {"sd3_grid": "awm_jax.sampling.schedules:shifted_grid"},
    "awm_jax.sampling.samplers": {"sample_final": "awm_jax.deprecation:sample_final"},
    "awm_jax.models.mmdit": {"GELU": "awm_jax.models.blocks:GELU"},
    "awm_jax.convert.lora_export": {n: f"awm_jax.export:{n}" for n in
                                    ("export_peft_lora", "is_workdir", "load_lora", "lora_from_workdir")},
    "awm_jax.convert.vae": {n: f"awm_jax.convert.keymap:{n}" for n in ("Identity", "Rule", "Transpose")},
    "awm_jax.toy.reward": {"strict_correct": "awm_jax.deprecation:toy_strict_correct",
                           "partial_score": "awm_jax.deprecation:toy_partial_score"},
}


def _resolve(target: str) -> Any:
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def aliases(module: str) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``module`` serving its :data:`MOVED` names with a ``DeprecationWarning``."""
    table = MOVED[module]

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target = table[name]
        new = target.replace(":", ".")
        if target.startswith("awm_jax.deprecation:"):
            new = (_resolve(target).__doc__ or "").split("\n")[0].strip() or new
        warnings.warn(f"{module}.{name} is deprecated: use {new}", DeprecationWarning, stacklevel=2)
        return _resolve(target)

    return __getattr__


def sample_final(sampler: str, velocity_fn, key, x_init, *, num_steps: int, shift: float = 3.0,
                 noise_level: float = 0.0, t_window=(0.3, 0.9), context: Any = None):
    """awm_jax.sampling.sample(sampler, ..., shifted_grid(num_steps, shift), ...)["x0"]"""
    sample, shifted_grid = _resolve("awm_jax.sampling:sample"), _resolve("awm_jax.sampling:shifted_grid")
    return sample(sampler, velocity_fn, key, x_init, shifted_grid(num_steps, shift), noise_level=noise_level,
                  t_window=t_window, context=context)["x0"]


def toy_strict_correct(dets: dict, meta: dict, margin: float | None = None) -> tuple[bool, str]:
    """awm_jax.toy.reward.score_detections(dets, meta, margin)[0, 2]"""
    score = _resolve("awm_jax.toy.reward:score_detections")  # a plug-in: resolved by name, not imported
    ok, _, why = score(dets, meta, *(() if margin is None else (margin,)))
    return ok, why


def toy_partial_score(dets: dict, meta: dict, margin: float | None = None) -> float:
    """awm_jax.toy.reward.score_detections(dets, meta, margin)[1]"""
    score = _resolve("awm_jax.toy.reward:score_detections")
    return score(dets, meta, *(() if margin is None else (margin,)))[1]
