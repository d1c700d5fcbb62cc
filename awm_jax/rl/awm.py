"""Advantage Weighted Matching loss (policy = p(x0 | c), likelihood surrogate = flow-matching ELBO).

The model enters only through velocity closures ``velocity_fn(x_t, t) -> v`` with ``x_t`` (M, C, H, W) and
``t`` (M,); B2's train step builds them from one graphdef with different LoRA states (policy, zeroed LoRA
= reference, kl-EMA adapter).  With ``fold_times=True`` (default) each closure is called once on the K
times folded into the batch, time-major (row ``k * B + b``), so the closure must tile its per-sample
context K times (:func:`repeat_over_times`); with ``fold_times=False`` it is called K times on B rows.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

WEIGHTINGS = ("uniform", "t", "t2", "ghuber", "elbo")
LOSS_TYPES = ("per_time", "mean_over_times")


def repeat_over_times(tree, num_times: int):
    """Tile every leaf ``(B, ...) -> (K * B, ...)`` time-major, matching the folded AWM batch."""
    return jax.tree.map(lambda a: jnp.concatenate([a] * int(num_times), axis=0), tree)


def flow_matching_mse(v_pred, eps, x0):
    """``mean_{C,H,W} (v_pred - (eps - x0))^2`` per sample, float32 with a two-level reduction."""
    diff = v_pred.astype(jnp.float32) - (eps.astype(jnp.float32) - x0.astype(jnp.float32))
    sq = jnp.square(diff).reshape(diff.shape[0], -1, diff.shape[-1])
    return jnp.mean(jnp.mean(sq, axis=-1), axis=-1)


def awm_log_prob(v_pred, eps, x0, t, weighting: str = "uniform", ghuber_power: float = 0.25):
    """Per-sample AWM log-likelihood surrogate ``-> (B,)`` float32.

    ``mse = mean_CHW (v_pred - (eps - x0))^2``; ``uniform``: ``-mse``; ``t``: ``-mse t``;
    ``t2``: ``-mse t^2``; ``ghuber``: ``-((mse + 1e-10)^p - 1e-10^p) t / p``; ``elbo``: ``-mse (1 - t) / t``
    (the variational bound's weight of a velocity error, ``t`` floored at 1e-3; docs/objectives.md).
    """
    mse = flow_matching_mse(v_pred, eps, x0)
    t = jnp.asarray(t, jnp.float32)
    if weighting == "uniform":
        return -mse
    if weighting == "t":
        return -mse * t
    if weighting == "t2":
        return -mse * t * t
    if weighting == "elbo":
        return -mse * (1.0 - t) / jnp.maximum(t, 1e-3)
    if weighting == "ghuber":
        p = float(ghuber_power)
        if p <= 0:
            raise ValueError(f"ghuber_power must be > 0, got {ghuber_power}")
        return -((mse + 1e-10) ** p - 1e-10**p) * t / p
    raise ValueError(f"AWM weighting {weighting!r} unknown; expected one of {WEIGHTINGS}")


def _ratio(logp, logp_old):
    return jnp.exp(logp - jax.lax.stop_gradient(logp_old))


def policy_loss(logp, logp_old, advantages, clip_range: float):
    """Clipped surrogate ``mean max(-A r, -A clip(r, 1 - c, 1 + c))``, ``r = exp(logp - sg(logp_old))``.

    ``logp``/``logp_old`` (..., B) and ``advantages`` (B,) (broadcast over leading axes).
    """
    r = _ratio(logp, logp_old)
    a = jnp.asarray(advantages, jnp.float32)
    return jnp.mean(jnp.maximum(-a * r, -a * jnp.clip(r, 1.0 - clip_range, 1.0 + clip_range)))


def policy_loss_mean_over_times(logp, logp_old, advantages, clip_range: float):
    """The "mean over times first" loss type: ratio of the means over the K times, ``logp`` (K, B)."""
    return policy_loss(jnp.mean(logp, axis=0), jnp.mean(logp_old, axis=0), advantages, clip_range)


def kl_sigma(t):
    """``0.7 sqrt(t / (1 - min(t, 0.99)))`` used by the ELBO weighting of the velocity-space KL."""
    t = jnp.asarray(t, jnp.float32)
    return 0.7 * jnp.sqrt(t / (1.0 - jnp.minimum(t, 0.99)))


def velocity_kl(v, v_other, t, elbo: bool = False):
    """Per-sample ``mean_CHW (v - v_other)^2`` (divided by ``2 sigma(t)^2`` when ``elbo``) ``-> (B,)``."""
    d = flow_matching_mse(v, v_other, jnp.zeros_like(v_other, jnp.float32))
    if elbo:
        d = d / (2.0 * kl_sigma(t) ** 2)
    return d


def noised_latents(x0, times, noise):
    """``x_t = (1 - t) x0 + t eps`` for all K times ``-> (K, B, *x0.shape[1:])`` float32 (any latent rank)."""
    t = times.astype(jnp.float32).reshape(times.shape + (1,) * (x0.ndim - 1))
    return (1.0 - t) * x0.astype(jnp.float32)[None] + t * noise.astype(jnp.float32)


def _call(velocity_fn, xt, times, fold_times: bool):
    k, b = times.shape
    if fold_times:
        v = velocity_fn(xt.reshape(k * b, *xt.shape[2:]), times.reshape(k * b))
        return v.astype(jnp.float32).reshape(xt.shape)
    return jnp.stack([velocity_fn(xt[i], times[i]).astype(jnp.float32) for i in range(k)])


def awm_loss(velocity_fn_policy: Callable, x0, advantages, times, noise, *,
             velocity_fn_ref: Callable | None = None, velocity_fn_ema: Callable | None = None,
             logp_old=None, weighting: str = "ghuber", ghuber_power: float = 0.25,
             clip_range: float = 1.0, beta: float = 0.0, ema_beta: float = 0.0, kl_elbo: bool = False,
             loss_type: str = "per_time", fold_times: bool = True):
    """Total AWM loss ``L_pg + beta KL_ref + ema_beta KL_ema`` ``-> (loss, aux)``.

    ``x0`` (B, C, H, W) sampler outputs, ``advantages`` (B,) (already clipped/rescaled), ``times`` (K, B),
    ``noise`` (K, B, C, H, W) (the same for every forward pass).  ``logp_old`` (K, B) for off-policy
    training; ``None`` = on-policy (``stopgrad(logp)``: ratio 1, gradient ``-mean(A grad logp)``).
    Reference / EMA passes are wrapped in ``stop_gradient``; a KL term is computed only when its closure
    is given and its weight is non-zero.  ``aux``: policy_loss, kl, kl_ema, logp_mean, ratio_mean,
    ratio_min, ratio_max, clip_frac, loss (all scalars).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"AWM loss_type {loss_type!r} unknown; expected one of {LOSS_TYPES}")
    if times.ndim != 2 or noise.shape != (*times.shape, *x0.shape[1:]):
        raise ValueError(f"AWM shapes: times {times.shape} must be (K, B) and noise {noise.shape} "
                         f"(K, B, *x0.shape[1:]) with x0 {x0.shape}")
    xt = noised_latents(x0, times, noise)
    v = _call(velocity_fn_policy, xt, times, fold_times)
    k, b = times.shape
    x0k = jnp.broadcast_to(x0.astype(jnp.float32)[None], xt.shape)
    flat = lambda a: a.reshape(k * b, *a.shape[2:])  # noqa: E731
    logp = awm_log_prob(flat(v), flat(noise), flat(x0k), times.reshape(-1), weighting, ghuber_power)
    logp = logp.reshape(k, b)
    old = jax.lax.stop_gradient(logp) if logp_old is None else jnp.asarray(logp_old, jnp.float32)
    if old.shape != logp.shape:
        raise ValueError(f"logp_old shape {old.shape} must be (K, B) = {logp.shape}")
    if loss_type == "per_time":
        pg = policy_loss(logp, old, advantages, clip_range)
        r = _ratio(logp, old)
    else:
        pg = policy_loss_mean_over_times(logp, old, advantages, clip_range)
        r = _ratio(jnp.mean(logp, 0), jnp.mean(old, 0))
    zero = jnp.zeros((), jnp.float32)
    kl = kl_ema = zero
    if velocity_fn_ref is not None and beta != 0:
        v_ref = jax.lax.stop_gradient(_call(velocity_fn_ref, xt, times, fold_times))
        kl = jnp.mean(velocity_kl(flat(v), flat(v_ref), times.reshape(-1), kl_elbo))
    if velocity_fn_ema is not None and ema_beta != 0:
        v_ema = jax.lax.stop_gradient(_call(velocity_fn_ema, xt, times, fold_times))
        kl_ema = jnp.mean(velocity_kl(flat(v), flat(v_ema), times.reshape(-1), kl_elbo))
    loss = pg + beta * kl + ema_beta * kl_ema
    rs = jax.lax.stop_gradient(r)
    aux = {
        "policy_loss": pg, "kl": kl, "kl_ema": kl_ema, "logp_mean": jnp.mean(jax.lax.stop_gradient(logp)),
        "ratio_mean": jnp.mean(rs), "ratio_min": jnp.min(rs), "ratio_max": jnp.max(rs),
        "clip_frac": jnp.mean((jnp.abs(rs - 1.0) > clip_range).astype(jnp.float32)), "loss": loss,
    }
    return loss, aux
