"""Flow-GRPO loss: PPO on the per-step Gaussian log-probs of the SDE (or CPS) sampler.

Velocity closures ``velocity_fn(x, t) -> v`` with ``x`` (B, C, H, W), ``t`` (B,).  With CFG in training,
build the closure as in sampling, e.g. ``lambda x, t: classifier_free_guidance(model, 4.5)(x, t, ctx)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from awm_jax.sampling.steps import cps_log_prob, flow_grpo_sde_log_prob


def num_train_steps(num_steps: int, timestep_fraction: float = 0.99) -> int:
    """Flow-GRPO trains the first ``int(num_steps * timestep_fraction)`` sampling steps."""
    n = int(num_steps * timestep_fraction)
    if n < 1:
        raise ValueError(f"int(num_steps * timestep_fraction) = {n}: no step to train "
                         f"(num_steps={num_steps}, timestep_fraction={timestep_fraction})")
    return n


def grpo_kl(mean, mean_ref, std_t):
    """Per-sample ``mean_CHW (mean - mean_ref)^2 / (2 std_t^2)`` (std_t without sqrt(-dt)) ``-> (B,)``."""
    d = jnp.square(mean.astype(jnp.float32) - mean_ref.astype(jnp.float32))
    d = jnp.mean(d.reshape(d.shape[0], -1), axis=-1)
    return d / (2.0 * jnp.broadcast_to(jnp.asarray(std_t, jnp.float32), d.shape) ** 2)


def _log_prob(kind, x, v, t, t_next, x_next, noise_level, t1):
    if kind == "sde":
        return flow_grpo_sde_log_prob(x, v, t, t_next, x_next, noise_level, t1)
    if kind == "cps":
        return cps_log_prob(x, v, t, t_next, x_next, noise_level)
    raise ValueError(f"Flow-GRPO step kind {kind!r} unknown; expected 'sde' or 'cps'")


def flow_grpo_step_loss(velocity_fn_policy: Callable, latents, next_latents, t, t_next, advantages,
                        log_prob_old, *, noise_level: float, t1: float, clip_range: float = 1e-4,
                        beta: float = 0.0, velocity_fn_ref: Callable | None = None, mask=None,
                        kind: str = "sde"):
    """Loss of one sampling step ``-> (loss, aux)``.

    ``latents`` / ``next_latents`` (B, C, H, W) the stored (x_t, x_next); ``t``, ``t_next`` (B,);
    ``advantages`` (B,) clipped; ``log_prob_old`` (B,) from sampling; ``mask`` (B,) optional (Flow-GRPO's
    zero-advantage mask, masked samples count 0 in the mean).  ``ratio = exp(lp - lp_old)``,
    ``L = mean max(-A r, -A clip(r, 1 -c, 1 + c)) + beta KL``.  ``aux``: policy_loss, kl, clip_frac,
    approx_kl, ratio_mean, loss.
    """
    v = velocity_fn_policy(latents, t).astype(jnp.float32)
    lp, mean, std_t = _log_prob(kind, latents, v, t, t_next, next_latents, noise_level, t1)
    a = jnp.asarray(advantages, jnp.float32)
    w = jnp.ones_like(a) if mask is None else jnp.asarray(mask, jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1.0)
    r = jnp.exp(lp - jax.lax.stop_gradient(jnp.asarray(log_prob_old, jnp.float32)))
    per = jnp.maximum(-a * r, -a * jnp.clip(r, 1.0 - clip_range, 1.0 + clip_range))
    pg = jnp.sum(w * per) / denom
    kl = jnp.zeros((), jnp.float32)
    if velocity_fn_ref is not None and beta != 0:
        v_ref = jax.lax.stop_gradient(velocity_fn_ref(latents, t).astype(jnp.float32))
        _, mean_ref, _ = _log_prob(kind, latents, v_ref, t, t_next, next_latents, noise_level, t1)
        kl = jnp.sum(w * grpo_kl(mean, mean_ref, std_t)) / denom
    loss = pg + beta * kl
    rs = jax.lax.stop_gradient(r)
    d = jax.lax.stop_gradient(lp - log_prob_old)
    aux = {
        "policy_loss": pg, "kl": kl, "loss": loss, "ratio_mean": jnp.sum(w * rs) / denom,
        "clip_frac": jnp.sum(w * (jnp.abs(rs - 1.0) > clip_range)) / denom,
        "approx_kl": 0.5 * jnp.sum(w * d * d) / denom,
    }
    return loss, aux


def flow_grpo_loss(velocity_fn_policy: Callable, trajectory: dict, advantages, *, noise_level: float,
                   t1: float, num_train_steps_: int, clip_range: float = 1e-4, beta: float = 0.0,
                   velocity_fn_ref: Callable | None = None, mask=None, kind: str = "sde"):
    """Mean of :func:`flow_grpo_step_loss` over the first ``num_train_steps_`` steps of a trajectory.

    ``trajectory`` is the batch-major dict of :func:`awm_jax.sampling.sample_sde` (``latents`` (B, N+1, ...),
    ``log_probs``, ``timesteps``, ``next_timesteps`` (B, N)).  The public code does one backward pass per
    step; this helper sums them in one graph (fine for small models; B2 may loop over steps instead).
    """
    tot, auxs = 0.0, []
    for i in range(int(num_train_steps_)):
        loss, aux = flow_grpo_step_loss(
            velocity_fn_policy, trajectory["latents"][:, i], trajectory["latents"][:, i + 1],
            trajectory["timesteps"][:, i], trajectory["next_timesteps"][:, i], advantages,
            trajectory["log_probs"][:, i], noise_level=noise_level, t1=t1, clip_range=clip_range, beta=beta,
            velocity_fn_ref=velocity_fn_ref, mask=mask, kind=kind)
        tot = tot + loss
        auxs.append(aux)
    n = len(auxs)
    return tot / n, {k: sum(a[k] for a in auxs) / n for k in auxs[0]}
