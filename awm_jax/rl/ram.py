"""RAM, "Reinforce Adjoint Matching" (arXiv 2605.10759): regression of the velocity onto a reward-tilted
target, per (time, sample).

    target = sg[v_ref + rho A (u - v_old)],   u = eps - x0,   L = mean_{k,b} mean_CHW (v - target)^2

No separate KL term (``rho`` plays the inverse KL temperature); ``v_old`` is the old policy (the kl-EMA
adapter state, which also samples the rollouts, moved once per epoch), ``v_ref`` the base model.  With
``A = 0`` the loss is plain regression onto ``v_ref``.  The formula is read from the port in the seed-004
repository (jaemoo-choi/rethinking-diffusion-rl ``src/utils/base.py``, ``compute_loss``'s ``"ram"`` branch);
the RAM repository itself was not readable here: what is second-hand is listed in docs/objectives.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["ram_loss", "ram_target"]


def ram_target(batch, v_ref, v_old, rho: float):
    """``sg[v_ref + rho A (eps - x0 - v_old)]`` ``-> (K, B, ...)`` float32."""
    x0 = batch["x0"].astype(jnp.float32)[None]
    u = batch["noise"].astype(jnp.float32) - x0
    a = jnp.asarray(batch["adv"], jnp.float32)
    a = a.reshape((1, a.shape[0]) + (1,) * (u.ndim - 2))
    t = v_ref.astype(jnp.float32) + float(rho) * a * (u - v_old.astype(jnp.float32))
    return jax.lax.stop_gradient(t)


def ram_loss(outputs, batch, *, rho: float = 100.0):
    """``(loss, metrics)`` of RAM (module docstring); ``outputs`` needs ``v``, ``v_old`` and ``v_ref``."""
    v = outputs["v"].astype(jnp.float32)
    sg = jax.lax.stop_gradient
    v_ref, v_old = sg(outputs["v_ref"]).astype(jnp.float32), sg(outputs["v_old"]).astype(jnp.float32)
    target = ram_target(batch, v_ref, v_old, rho)
    per = jnp.mean(jnp.square(v - target).reshape(*v.shape[:2], -1), axis=-1)
    loss = jnp.mean(per)
    vs = sg(v)
    return loss, {"loss": loss, "policy_loss": loss,
                  "kl": jnp.mean(jnp.square(vs - v_ref)), "old_deviate": jnp.mean(jnp.square(vs - v_old))}
