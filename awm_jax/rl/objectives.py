"""The objective family trained on clean rollout samples: DiffusionNFT and the exact-weight ELBO objectives.

Every objective is one pure function ``(outputs, batch, **hyper) -> (loss, metrics)`` on the model's
velocities at the noised points of the batch (the train step computes them; docs/objectives.md has the
formulas and the defaults of the authors' code with their sources):

- ``batch``: ``x0 (B, ...)`` clean samples, ``noise (K, B, ...)`` fresh N(0, I) noise, ``times (K, B)`` in
  (0, 1) (t = 1 is noise), ``adv (B,)`` advantages already clipped to ``[-advantage_max, advantage_max]``;
  ``x_t = (1 - t) x0 + t eps``, flow-matching target ``u = eps - x0``.
- ``outputs``: ``v (K, B, ...)`` the trained policy's velocity at ``x_t`` (differentiated); ``v_old`` the old
  (sampling) policy's, ``v_ref`` the reference (base) model's, ``v_ema`` the kl-EMA adapter's (all three
  constants; present when the objective or its KL terms need them).

Shared KL terms (as AWM, ``awm_jax.rl.awm.velocity_kl``):
``KL = beta mean_{k,b} d(v, v_ref) + ema_beta mean_{k,b} d(v, v_ema)``, ``d = mean_CHW (v - v')^2``
(divided by ``2 sigma(t)^2`` with ``kl_elbo``).  AWM and Flow-GRPO keep their own loss functions
(``awm_jax.rl.awm.awm_loss``, ``awm_jax.rl.grpo.flow_grpo_step_loss``); :data:`OBJECTIVES` names every
objective's loss (the registry ``awm_jax.rl.registry`` is the source).  The seed-004 ELBO policy gradients
(epg, pepg, par, epg_grpo) live in ``awm_jax.rl.elbo_pg``, RAM in ``awm_jax.rl.ram``.

``elbo_exact_reinforce`` / ``elbo_exact_grpo`` (formerly shipped as ``elbo_reinforce`` / ``elbo_grpo``, names
kept as deprecated aliases) use the ``(1 - t) / t`` ("exact") weight of a velocity error and a ratio of the
means over the K times: they are NOT the seed-004 paper's objectives (docs/objectives.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from awm_jax.rl import registry
from awm_jax.rl.awm import awm_log_prob, flow_matching_mse, velocity_kl

# objective -> the function that computes its loss (the two older ones take velocity closures)
OBJECTIVES = {"awm": "awm_jax.rl.awm.awm_loss", "flow_grpo": "awm_jax.rl.grpo.flow_grpo_step_loss",
              **{n: s.loss.replace(":", ".") for n, s in registry.OBJECTIVES.items() if s.kind == "x0"}}
# objectives whose loss needs the old (sampling) policy's velocity: the kl-EMA adapter state plays it
NEEDS_OLD = tuple(n for n, s in registry.OBJECTIVES.items() if s.needs_old)


def _flat(a):
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _x0k(batch):
    x0 = batch["x0"].astype(jnp.float32)
    return jnp.broadcast_to(x0[None], batch["noise"].shape)


def kl_terms(outputs, batch, *, beta: float = 0.0, ema_beta: float = 0.0, kl_elbo: bool = False):
    """``(beta KL_ref + ema_beta KL_ema, KL_ref, KL_ema)``: mean over (K, B) of the velocity-space distance of
    ``v`` to the constant ``v_ref`` / ``v_ema`` (a term is 0 when its weight is 0 or its output is absent)."""
    t = batch["times"].reshape(-1)
    v = _flat(outputs["v"])
    zero = jnp.zeros((), jnp.float32)
    kl = kl_ema = zero
    if beta != 0 and outputs.get("v_ref") is not None:
        kl = jnp.mean(velocity_kl(v, _flat(jax.lax.stop_gradient(outputs["v_ref"])), t, kl_elbo))
    if ema_beta != 0 and outputs.get("v_ema") is not None:
        kl_ema = jnp.mean(velocity_kl(v, _flat(jax.lax.stop_gradient(outputs["v_ema"])), t, kl_elbo))
    return beta * kl + ema_beta * kl_ema, kl, kl_ema


def elbo_log_likelihood(v, batch, *, weighting: str = "elbo", ghuber_power: float = 0.25):
    """Per-(time, sample) ELBO surrogate ``-> (K, B)``: ``-w(t) mean_CHW (v - (eps - x0))^2``.

    ``weighting = "elbo"``: ``w(t) = (1 - t) / t``, the variational bound's weight of a velocity error under
    ``x_t = (1 - t) x0 + t eps`` (log-SNR ``lambda = 2 log((1 - t) / t)``, ``-dlambda/dt = 2 / (t (1 - t))``,
    ``eps`` error ``= (1 - t)`` x velocity error); constants (1/2, dimension, t-density) dropped.  The AWM
    weightings (``uniform``, ``t``, ``t2``, ``ghuber``) are accepted as well.
    """
    k, b = batch["times"].shape
    lp = awm_log_prob(_flat(v), _flat(batch["noise"]), _flat(_x0k(batch)), batch["times"].reshape(-1),
                      weighting, ghuber_power)
    return lp.reshape(k, b)


def elbo_exact_reinforce_loss(outputs, batch, *, weighting: str = "elbo", ghuber_power: float = 0.25,
                              beta: float = 0.0, ema_beta: float = 0.0, kl_elbo: bool = False):
    """REINFORCE on the exact-weight ELBO: ``L = -mean_b A_b ELBO_b + KL``,
    ``ELBO_b = mean_k elbo_log_likelihood_kb``.

    Gradient ``-mean_b A_b grad ELBO_b``: the score-function estimator with the ELBO standing in for
    ``log p(x0 | c)`` (fresh noise and times on the clean rollout sample, as AWM).
    """
    logp = jnp.mean(elbo_log_likelihood(outputs["v"], batch, weighting=weighting,
                                        ghuber_power=ghuber_power), axis=0)
    adv = jnp.asarray(batch["adv"], jnp.float32)
    pg = -jnp.mean(adv * logp)
    kl_total, kl, kl_ema = kl_terms(outputs, batch, beta=beta, ema_beta=ema_beta, kl_elbo=kl_elbo)
    loss = pg + kl_total
    return loss, {"loss": loss, "policy_loss": pg, "kl": kl, "kl_ema": kl_ema,
                  "logp_mean": jnp.mean(jax.lax.stop_gradient(logp))}


def elbo_exact_grpo_loss(outputs, batch, *, clip_range: float = 0.2, weighting: str = "elbo",
                         ghuber_power: float = 0.25, beta: float = 0.0, ema_beta: float = 0.0,
                         kl_elbo: bool = False):
    """PPO-clipped ratio of exact-weight ELBOs (mean over the K times):
    ``L = mean_b max(-A_b r_b, -A_b clip(r_b, 1 - c, 1 + c)) + KL``,
    ``r_b = exp(ELBO_b(v) - sg(ELBO_b(v_old)))`` with both ELBOs (mean over the K times) on the *same*
    noise and times.  When ``v_old == v`` (first on-policy step) ``r = 1`` and the gradient is
    :func:`elbo_exact_reinforce_loss`'s.
    """
    lp = jnp.mean(elbo_log_likelihood(outputs["v"], batch, weighting=weighting, ghuber_power=ghuber_power), 0)
    lp_old = jnp.mean(elbo_log_likelihood(jax.lax.stop_gradient(outputs["v_old"]), batch, weighting=weighting,
                                          ghuber_power=ghuber_power), 0)
    r = jnp.exp(lp - lp_old)
    adv = jnp.asarray(batch["adv"], jnp.float32)
    pg = jnp.mean(jnp.maximum(-adv * r, -adv * jnp.clip(r, 1.0 - clip_range, 1.0 + clip_range)))
    kl_total, kl, kl_ema = kl_terms(outputs, batch, beta=beta, ema_beta=ema_beta, kl_elbo=kl_elbo)
    loss = pg + kl_total
    rs = jax.lax.stop_gradient(r)
    return loss, {"loss": loss, "policy_loss": pg, "kl": kl, "kl_ema": kl_ema,
                  "logp_mean": jnp.mean(jax.lax.stop_gradient(lp)), "ratio_mean": jnp.mean(rs),
                  "ratio_min": jnp.min(rs), "ratio_max": jnp.max(rs),
                  "clip_frac": jnp.mean((jnp.abs(rs - 1.0) > clip_range).astype(jnp.float32))}


# deprecated names (the objectives were renamed when the seed-004 ones were added; docs/objectives.md)
elbo_reinforce_loss = elbo_exact_reinforce_loss
elbo_grpo_loss = elbo_exact_grpo_loss


def nft_optimality(adv, advantage_max: float = 1.0):
    """DiffusionNFT's optimality probability ``r = 0.5 + 0.5 clip(A / A_max, -1, 1)`` ``-> (B,)``."""
    a = jnp.asarray(adv, jnp.float32) / float(advantage_max)
    return 0.5 + 0.5 * jnp.clip(a, -1.0, 1.0)


def nft_loss(outputs, batch, *, nft_beta: float = 1.0, advantage_max: float = 1.0, loss_scale: float = 1.0,
             adaptive_weighting: bool = True, beta: float = 0.0, ema_beta: float = 0.0,
             kl_elbo: bool = False):
    """DiffusionNFT (negative-aware fine-tuning) on the forward process of the clean sample.

    Implicit policies from the constant old velocity and the trained one at the same ``x_t``:
    ``v+ = (1 - b) v_old + b v``, ``v- = (1 + b) v_old - b v`` (``b = nft_beta``); their clean-sample
    predictions ``x0± = x_t - t v±``; ``r = nft_optimality(A)``.  Per (time, sample)
    ``l± = mean_CHW (x0± - x0)^2 / w±`` with the adaptive weight ``w± = sg(max(mean_CHW |x0± - x0|, 1e-5))``
    (``w = 1`` without ``adaptive_weighting``), and

        ``L = loss_scale / b * mean_{k,b} [r l+ + (1 - r) l-] + KL``

    (the authors scale by ``A_max = adv_clip_max`` = 5: ``loss_scale``).  With ``r = 1`` and ``v_old = v``
    the gradient is ``loss_scale`` x that of the (weighted) flow-matching loss ``mean t^2 |v - u|^2 / w``.
    """
    b = float(nft_beta)
    if b <= 0:
        raise ValueError(f"config key nft.beta = {nft_beta} must be > 0")
    v = outputs["v"].astype(jnp.float32)
    v_old = jax.lax.stop_gradient(outputs["v_old"].astype(jnp.float32))
    x0 = _x0k(batch)
    t = batch["times"].astype(jnp.float32).reshape(batch["times"].shape + (1,) * (x0.ndim - 2))
    xt = (1.0 - t) * x0 + t * batch["noise"].astype(jnp.float32)
    r = nft_optimality(batch["adv"], advantage_max)[None]  # (1, B)

    def term(v_imp):
        err = xt - t * v_imp - x0
        sq = flow_matching_mse(_flat(err), jnp.zeros_like(_flat(err)), jnp.zeros_like(_flat(err)))
        sq = sq.reshape(err.shape[:2])
        if not adaptive_weighting:
            return sq
        w = jnp.mean(jnp.abs(err).reshape(*err.shape[:2], -1), axis=-1)
        return sq / jax.lax.stop_gradient(jnp.maximum(w, 1e-5))

    pos = term((1.0 - b) * v_old + b * v)
    neg = term((1.0 + b) * v_old - b * v)
    pg = float(loss_scale) / b * jnp.mean(r * pos + (1.0 - r) * neg)
    kl_total, kl, kl_ema = kl_terms(outputs, batch, beta=beta, ema_beta=ema_beta, kl_elbo=kl_elbo)
    loss = pg + kl_total
    return loss, {"loss": loss, "policy_loss": pg, "kl": kl, "kl_ema": kl_ema,
                  "old_deviate": jnp.mean(jnp.square(jax.lax.stop_gradient(v) - v_old)),
                  "positive_loss": jnp.mean(jax.lax.stop_gradient(pos)),
                  "negative_loss": jnp.mean(jax.lax.stop_gradient(neg))}
