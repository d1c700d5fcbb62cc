"""The objective registry: one entry per ``config.algorithm`` (docs/objectives.md).

Each :class:`ObjectiveSpec` says what the train step and the loop need to know about an objective, so that
neither holds per-objective special cases: which batch it trains on (``kind``), its loss function
(``"module:function"``, resolved lazily) and the keyword arguments the config gives it (``hyper``), which
extra velocities it needs (the old policy's, the reference model's), whether the old policy (the kl-EMA
adapter state) samples the rollouts, whether the AWM advantage clip applies, and whether its loss needs all K
training times of a sample at once (no ``train.scan_times``).  This module imports nothing heavy (the config
loader uses it).

Renamed objectives keep their old names as deprecated aliases (:data:`DEPRECATED`): :func:`canonical` maps
them with a ``DeprecationWarning`` and a log line.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["DEPRECATED", "OBJECTIVES", "ObjectiveSpec", "all_names", "canonical", "get"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the trainer knows about one objective (module docstring)."""

    name: str
    kind: str  # "awm" (rl.awm), "trajectory" (Flow-GRPO's SDE batch), "x0" (rl.losses.objective_loss_fn)
    loss: str = ""  # "module:function" ``(outputs, batch, **hyper) -> (loss, metrics)`` for kind "x0"
    hyper: Callable = field(default=lambda c: {})  # config -> keyword arguments of ``loss``
    needs_old: bool = False  # the loss reads v_old (the kl-EMA adapter state plays the old policy)
    needs_ref: bool = False  # the loss reads v_ref even when awm.beta = 0 (RAM's target)
    rolls_out_with_old: bool = False  # rollouts sampled by the old policy (kl-EMA adapter)
    clip_advantages: bool = True  # AWM's clip(A, -clip, clip) / clip * awm.advantage_max applies
    needs_all_times: bool = False  # the loss couples a sample's K times (train.scan_times refused)


def _kl(config) -> dict:
    w = config.awm
    return dict(beta=float(w.beta), ema_beta=float(w.ema_beta), kl_elbo=bool(w.kl_elbo))


def _nft(config) -> dict:
    return dict(nft_beta=float(config.nft.beta), advantage_max=float(config.awm.advantage_max),
                loss_scale=float(config.advantages.clip),
                adaptive_weighting=bool(config.nft.adaptive_weighting), **_kl(config))


def _elbo_exact(config) -> dict:
    return dict(weighting=str(config.awm.weighting), ghuber_power=float(config.awm.ghuber_power),
                **_kl(config))


def _elbo_exact_grpo(config) -> dict:
    return dict(clip_range=float(config.awm.clip_range), **_elbo_exact(config))


def _seed004(method: str) -> Callable:
    def hyper(config) -> dict:
        return dict(method=method, likelihood=str(config.elbo.likelihood),
                    clip_range=float(config.elbo.clip_range), adv_clamp=float(config.elbo.adv_clamp),
                    **_kl(config))

    return hyper


def _ram(config) -> dict:
    return dict(rho=float(config.ram.rho))


_OBJ = "awm_jax.rl.objectives:"
_SEED004 = "awm_jax.rl.elbo_pg:elbo_pg_loss"
_SEED004_METHODS = ("epg", "pepg", "par", "epg_noratio", "pepg_noratio", "par_noratio", "epg_grpo")

OBJECTIVES: dict[str, ObjectiveSpec] = {s.name: s for s in [
    ObjectiveSpec("awm", "awm"),
    ObjectiveSpec("flow_grpo", "trajectory", clip_advantages=False),
    ObjectiveSpec("nft", "x0", _OBJ + "nft_loss", _nft, needs_old=True, rolls_out_with_old=True),
    ObjectiveSpec("elbo_exact_reinforce", "x0", _OBJ + "elbo_exact_reinforce_loss", _elbo_exact),
    ObjectiveSpec("elbo_exact_grpo", "x0", _OBJ + "elbo_exact_grpo_loss", _elbo_exact_grpo,
                  needs_old=True, rolls_out_with_old=True, needs_all_times=True),
    *[ObjectiveSpec(m, "x0", _SEED004, _seed004(m), needs_old=True, rolls_out_with_old=True,
                    clip_advantages=False) for m in _SEED004_METHODS],
    ObjectiveSpec("ram", "x0", "awm_jax.rl.ram:ram_loss", _ram, needs_old=True, needs_ref=True,
                  rolls_out_with_old=True, clip_advantages=False),
]}

# old name -> new name (the exact-weight ELBO objectives were shipped as "ELBO policy gradients")
DEPRECATED = {"elbo_reinforce": "elbo_exact_reinforce", "elbo_grpo": "elbo_exact_grpo"}
_warned: set = set()


def all_names() -> tuple[str, ...]:
    """Every accepted ``config.algorithm`` value, deprecated aliases included."""
    return tuple(OBJECTIVES) + tuple(DEPRECATED)


def canonical(name: str) -> str:
    """``name`` with a deprecated alias mapped to its new name (DeprecationWarning + log line, once per name);
    an unknown name raises ``ValueError`` naming the config key."""
    name = str(name)
    if name in DEPRECATED:
        new = DEPRECATED[name]
        msg = (f"config key algorithm = {name!r} is deprecated: it is the exact-weight ELBO objective, now "
               f"named {new!r} (docs/objectives.md); the seed-004 objectives are epg / pepg / par / epg_grpo")
        warnings.warn(msg, DeprecationWarning, stacklevel=3)
        if name not in _warned:
            _warned.add(name)
            _log.warning(msg)
        return new
    if name not in OBJECTIVES:
        raise ValueError(f"config key algorithm = {name!r}: expected one of {all_names()}")
    return name


def get(name: str) -> ObjectiveSpec:
    """The spec of ``name`` (a deprecated alias gives its new objective's spec)."""
    return OBJECTIVES[canonical(name)]
