"""The policy as the RL code sees it: the config's algorithm, the model family's velocity over split
state, and classifier-free guidance.

``velocity_model(graphdef, config)`` is ``fn(params, base, x, t, cond) -> v``: the graphdef merged with the
trainable state (and the frozen base state for LoRA) and called through its family's ``velocity`` in the
project's units (``t`` in [0, 1], ``cond = (prompt_embeds, pooled)``); :func:`guided` adds CFG.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from awm_jax.models.family import ModelFamily, family_for_graph
from awm_jax.rl import registry
from awm_jax.sampling.samplers import classifier_free_guidance

__all__ = ["ALGORITHMS", "X0_ALGORITHMS", "algorithm", "guided", "is_full_finetune", "model_family",
           "rolls_out_with_old", "trains_on_x0", "velocity_model"]

# the objectives (config key ``algorithm``; awm_jax.rl.registry, docs/objectives.md): all but Flow-GRPO train
# on the clean sample
ALGORITHMS = tuple(registry.OBJECTIVES)
X0_ALGORITHMS = tuple(n for n, s in registry.OBJECTIVES.items() if s.kind != "trajectory")


def algorithm(config) -> str:
    """``config.algorithm``, validated; a deprecated alias (``elbo_reinforce``, ``elbo_grpo``) gives its new
    name with a DeprecationWarning."""
    return registry.canonical(str(config.algorithm))


def trains_on_x0(config) -> bool:
    """The objective trains on the rollouts' clean samples ``x0`` (AWM batch), not on SDE trajectories."""
    return algorithm(config) in X0_ALGORITHMS


def rolls_out_with_old(config) -> bool:
    """Rollouts come from the old policy (the kl-EMA adapter state): AWM off-policy, and every objective whose
    registry entry says so (DiffusionNFT and the seed-004 objectives: their code samples with the "old"
    adapter; ``elbo_exact_grpo``: the ratio's denominator sampled; RAM)."""
    a = algorithm(config)
    return registry.get(a).rolls_out_with_old or (a == "awm" and not bool(config.awm.on_policy))


def is_full_finetune(config) -> bool:
    """``config.lora.full_finetune``: every parameter is trained (no LoRA)."""
    return bool(config.lora.full_finetune)


def model_family(graphdef, config) -> ModelFamily:
    """The family of ``config.model.kind``, checked against the model in ``graphdef``."""
    return family_for_graph(graphdef, str(config.model.kind))


def velocity_model(graphdef, config) -> Callable:
    """``fn(params, base, x, t, cond) -> v`` (float32) through the model family's velocity."""
    fam = model_family(graphdef, config)
    full = is_full_finetune(config)
    options = fam.velocity_options(config)

    def fn(params, base, x, t, cond):
        # copy: fresh Variables at this trace level (states traced by an outer jit/scan would otherwise be
        # reused, and nnx.scan over scanned layers refuses Variables of another trace level)
        states = (params,) if full else (params, base)
        model = nnx.merge(graphdef, *states, copy=True)
        return fam.velocity(model, x, jnp.asarray(t, jnp.float32), tuple(cond), **options)

    return fn


def guided(model_fn: Callable, params, base, cond, neg, scale: float,
           detach_uncond: bool = False) -> Callable:
    """2-argument velocity closure ``(x, t) -> v`` with classifier-free guidance when ``scale != 1``
    (``neg``: the empty-prompt ``(embeds (1,T,D), pooled (1,P))``, broadcast to the batch;
    ``detach_uncond``: stop the gradient through the unconditional branch)."""
    def cond_fn(x, t, c):
        return model_fn(params, base, x, t, c)

    if scale == 1.0:
        return lambda x, t: cond_fn(x, t, cond)
    if neg is None:
        raise ValueError(f"guidance_scale={scale} needs the empty-prompt embeddings: "
                         "pass negative=(embeds, pooled)")
    b = cond[0].shape[0]
    uncond = tuple(jnp.broadcast_to(u, (b, *u.shape[1:])).astype(c.dtype) for u, c in zip(neg, cond))
    cfg = classifier_free_guidance(cond_fn, scale, detach_uncond=detach_uncond)
    return lambda x, t: cfg(x, t, (tuple(cond), uncond))
