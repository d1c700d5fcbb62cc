"""Exponential moving averages of the trainable (LoRA) weights, as pure pytree functions.

Two EMAs exist in the public AWM code, both updated once per optimizer step *after* the step counter is
incremented (``step`` below = number of optimizer steps completed, 1 after the first update):

- the **kl-EMA adapter** (a second LoRA adapter regularising the policy, ``KL_ema`` term and, off-policy,
  the sampling policy): ``theta_ema <- d theta_ema + (1 - d) theta`` with
  ``d = min(decay_max, decay_rate * step)`` (defaults 0.3, 0.001), so the first updates copy ``theta``;
- the **evaluation EMA** (``EMAModuleWrapper`` of flow_grpo): decay ``min((1 + s) / (10 + s), decay_max)``
  (``decay_max`` 0.99 in the configs), ``ema <- ema + (1 - decay) (theta - ema)``.

Both are initialised as exact copies of the initial trainable weights (:func:`init_ema`).  All functions
accept traced ``step`` values, so they run inside the jitted train step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_ema(params):
    """An EMA initialised as a copy of ``params`` (new buffers, so it can be donated independently)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), params)


def kl_ema_decay(step, decay_rate: float = 0.001, decay_max: float = 0.3):
    """kl-EMA decay ``min(decay_max, decay_rate * step)`` (float32, ``step`` may be traced)."""
    s = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay_max), jnp.float32(decay_rate) * s)


def eval_ema_decay(step, decay_max: float = 0.99):
    """Evaluation-EMA decay ``min((1 + s) / (10 + s), decay_max)`` (float32, ``step`` may be traced)."""
    s = jnp.asarray(step, jnp.float32)
    return jnp.minimum((1.0 + s) / (10.0 + s), jnp.float32(decay_max))


def ema_update(ema, params, decay):
    """``ema <- decay * ema + (1 - decay) * params`` leaf by leaf, in each leaf's dtype (decay in fp32)."""
    d = jnp.asarray(decay, jnp.float32)

    def one(e, p):
        ef = e.astype(jnp.float32)
        return (d * ef + (1.0 - d) * p.astype(jnp.float32)).astype(e.dtype)

    return jax.tree.map(one, ema, params)


def kl_ema_update(ema, params, step, decay_rate: float = 0.001, decay_max: float = 0.3):
    """One kl-EMA adapter update after optimizer step ``step`` (1-based: steps completed)."""
    return ema_update(ema, params, kl_ema_decay(step, decay_rate, decay_max))


def eval_ema_update(ema, params, step, decay_max: float = 0.99, every: int = 1):
    """One evaluation-EMA update after optimizer step ``step`` (1-based: steps completed); with ``every``
    > 1 only when ``(step + 1) % every == 0`` (flow_grpo's ``update_step_interval``; else unchanged)."""
    new = ema_update(ema, params, eval_ema_decay(step, decay_max))
    if int(every) <= 1:
        return new
    due = (jnp.asarray(step, jnp.int32) + 1) % int(every) == 0
    return jax.tree.map(lambda a, b: jnp.where(due, a, b), new, ema)
