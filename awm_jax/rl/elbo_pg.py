"""ELBO policy gradients as "Rethinking the Design Space of RL for Diffusion Models" runs them (seed 004:
EPG, PEPG, PAR, their ``_noratio`` forms and the clipped-ratio GRPO), per (time, sample).

Authors' code: github jaemoo-choi/rethinking-diffusion-rl at c2570002365231487b1392c7aef3a13a069edf79
(``src/utils/__init__.py`` ``compute_elbo``, ``src/utils/base.py`` ``compute_policy_loss`` /
``compute_kl_loss`` / ``compute_loss``); file:line citations and every deviation in docs/objectives.md.

Batch and outputs as ``awm_jax.rl.objectives``: ``x0 (B, ...)``, ``noise (K, B, ...)``, ``times (K, B)``
(t = 1 is noise), ``adv (B,)``; ``v`` (differentiated), ``v_old`` (the old / sampling policy), ``v_ref``
(the base model), all ``(K, B, ...)`` at the same ``x_t = (1 - t) x0 + t eps``.

With ``E`` the current ELBO per (time, sample), ``E_old`` the old policy's (constant), ``lr = sg(E) - E_old``
and ``r = exp(lr)`` (a constant), the policy losses are means over (time, sample) of

- ``epg``: ``-r A E``;  ``pepg`` (the paper's method): ``-r (A - lr) E``;
  ``par``: ``0.5 r (A - (E - E_old))^2``;  ``*_noratio``: the same with ``r = 1``;
- ``epg_grpo`` (the authors' ``method = "grpo"``): ``max(-A' rho, -A' clip(rho, 1 - c, 1 + c))`` with the
  differentiated ratio ``rho = exp(E - E_old)`` and ``A' = clip(A, -adv_clamp, adv_clamp)``.

The KL term is the shared velocity-space one (``awm.beta * mean (v - v_ref)^2``: the authors' "girsanov").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from awm_jax.rl.objectives import kl_terms

__all__ = ["LIKELIHOODS", "METHODS", "elbo_likelihood", "elbo_pg_loss", "elbo_policy_loss"]

LIKELIHOODS = ("adaptive", "exact", "uniform", "t")
METHODS = ("epg", "pepg", "par", "epg_noratio", "pepg_noratio", "par_noratio", "epg_grpo")


def _mean_chw(x):
    return jnp.mean(x.reshape(*x.shape[:2], -1), axis=-1)


def elbo_likelihood(v, batch, likelihood: str = "adaptive"):
    """The authors' ELBO per (time, sample) ``-> (K, B)`` float32 (``compute_elbo``, guidance scale 1).

    ``adaptive``: ``x0_hat = x_t - t v``,
    ``-mean_CHW (x0_hat - x0)^2 / sg(max(mean_CHW |x0_hat - x0|, 1e-5))``;
    ``t``: ``-mean_CHW (x0_hat - x0)^2``; ``uniform``: ``-mean_CHW (v - (eps - x0))^2``;
    ``exact``: ``-mean_CHW (1 - t) / (t + 1e-3) (v - (eps - x0))^2``.
    """
    x0 = jnp.broadcast_to(batch["x0"].astype(jnp.float32)[None], batch["noise"].shape)
    noise = batch["noise"].astype(jnp.float32)
    t = batch["times"].astype(jnp.float32).reshape(batch["times"].shape + (1,) * (x0.ndim - 2))
    v = v.astype(jnp.float32)
    if likelihood in ("adaptive", "t"):
        xt = (1.0 - t) * x0 + t * noise
        err = xt - t * v - x0
        sq = _mean_chw(jnp.square(err))
        if likelihood == "t":
            return -sq
        w = jax.lax.stop_gradient(jnp.maximum(_mean_chw(jnp.abs(err)), 1e-5))
        return -sq / w
    if likelihood == "uniform":
        return -_mean_chw(jnp.square(noise - x0 - v))
    if likelihood == "exact":
        return -_mean_chw((1.0 - t) / (t + 1e-3) * jnp.square(noise - x0 - v))
    raise ValueError(f"config key elbo.likelihood = {likelihood!r}: expected one of {LIKELIHOODS}")


def elbo_policy_loss(elbo, elbo_old, adv, method: str, *, clip_range: float = 1e-3, adv_clamp: float = 5.0):
    """``(policy loss, ratio r (constant), clip fraction)`` of ``method`` on ``(K, B)`` ELBOs (module
    docstring); ``adv (B,)`` broadcasts over the K times."""
    elbo_old = jax.lax.stop_gradient(elbo_old)
    a = jnp.asarray(adv, jnp.float32)[None, :]
    lr = jax.lax.stop_gradient(elbo) - elbo_old
    r = jnp.exp(lr)
    zero = jnp.zeros((), jnp.float32)
    if method == "epg":
        return -jnp.mean(r * a * elbo), r, zero
    if method == "epg_noratio":
        return -jnp.mean(a * elbo), r, zero
    if method == "pepg":
        return -jnp.mean(r * (a - lr) * elbo), r, zero
    if method == "pepg_noratio":
        return -jnp.mean((a - lr) * elbo), r, zero
    if method == "par":
        return 0.5 * jnp.mean(r * jnp.square(a - (elbo - elbo_old))), r, zero
    if method == "par_noratio":
        return 0.5 * jnp.mean(jnp.square(a - (elbo - elbo_old))), r, zero
    if method == "epg_grpo":
        ratio = jnp.exp(elbo - elbo_old)
        ac = jnp.clip(a, -adv_clamp, adv_clamp)
        loss = jnp.mean(jnp.maximum(-ac * ratio, -ac * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)))
        return loss, r, jnp.mean((jnp.abs(r - 1.0) > clip_range).astype(jnp.float32))
    raise ValueError(f"config key algorithm = {method!r}: not an ELBO policy-gradient method {METHODS}")


def elbo_pg_loss(outputs, batch, *, method: str, likelihood: str = "adaptive", clip_range: float = 1e-3,
                 adv_clamp: float = 5.0, beta: float = 0.0, ema_beta: float = 0.0, kl_elbo: bool = False):
    """``(loss, metrics)``: :func:`elbo_policy_loss` of :func:`elbo_likelihood` of ``v`` and of the old
    policy's ``v_old`` on the same ``x_t``, plus the shared KL terms (``beta mean (v - v_ref)^2``)."""
    elbo = elbo_likelihood(outputs["v"], batch, likelihood)
    elbo_old = elbo_likelihood(jax.lax.stop_gradient(outputs["v_old"]), batch, likelihood)
    pg, r, clip_frac = elbo_policy_loss(elbo, elbo_old, batch["adv"], method, clip_range=clip_range,
                                        adv_clamp=adv_clamp)
    kl_total, kl, kl_ema = kl_terms(outputs, batch, beta=beta, ema_beta=ema_beta, kl_elbo=kl_elbo)
    loss = pg + kl_total
    sg = jax.lax.stop_gradient
    dv = sg(outputs["v"]).astype(jnp.float32) - sg(outputs["v_old"]).astype(jnp.float32)
    return loss, {"loss": loss, "policy_loss": pg, "kl": kl, "kl_ema": kl_ema,
                  "elbo_mean": jnp.mean(sg(elbo)), "elbo_old_mean": jnp.mean(elbo_old),
                  "ratio_mean": jnp.mean(r), "ratio_min": jnp.min(r), "ratio_max": jnp.max(r),
                  "clip_frac": clip_frac, "old_deviate": jnp.mean(jnp.square(dv))}
