"""AWM log-prob surrogate, policy loss, velocity KL, training times and the composed loss vs numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from awm_jax import rl
from awm_jax.sampling import shifted_grid


@pytest.mark.parametrize("weighting", ["uniform", "t", "t2", "ghuber"])
def test_awm_log_prob_vs_fp64(weighting):
    rng = np.random.RandomState(0)
    shape = (3, 16, 64, 64)
    x0 = rng.randn(*shape).astype(np.float32)
    eps = rng.randn(*shape).astype(np.float32)
    # a good prediction (small mse, where fp32 cancellation would hurt) and a poor one
    v = (eps - x0 + rng.randn(*shape) * np.array([1e-3, 0.1, 1.0])[:, None, None, None]).astype(np.float32)
    t = np.array([0.2, 0.5, 0.9], np.float32)
    out = np.asarray(rl.awm_log_prob(v, eps, x0, t, weighting, 0.25))
    mse = ((v.astype(np.float64) - (eps.astype(np.float64) - x0)) ** 2).mean(axis=(1, 2, 3))
    t64 = t.astype(np.float64)
    ref = {"uniform": -mse, "t": -mse * t64, "t2": -mse * t64**2,
           "ghuber": -((mse + 1e-10) ** 0.25 - 1e-10**0.25) * t64 / 0.25}[weighting]
    assert out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_allclose(out, ref, rtol=2e-6)


def test_awm_log_prob_bf16_input_and_bad_weighting():
    v = jnp.ones((2, 1, 2, 2), jnp.bfloat16)
    out = rl.awm_log_prob(v, jnp.zeros((2, 1, 2, 2)), jnp.zeros((2, 1, 2, 2)), jnp.ones(2))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, -1.0)
    with pytest.raises(ValueError, match="weighting"):
        rl.awm_log_prob(v, v, v, jnp.ones(2), weighting="huber")


def _np_policy_loss(logp, old, adv, c):
    r = np.exp(logp - old)
    return np.mean(np.maximum(-adv * r, -adv * np.clip(r, 1 - c, 1 + c)))


def test_policy_loss_and_mean_over_times():
    rng = np.random.RandomState(1)
    logp, old = rng.randn(4, 5) * 0.3, rng.randn(4, 5) * 0.3
    adv = rng.randn(5)
    for c in (0.1, 1.0):
        ref = _np_policy_loss(logp, old, adv, c)
        np.testing.assert_allclose(rl.policy_loss(logp, old, adv, c), ref, rtol=1e-5)
        np.testing.assert_allclose(rl.policy_loss_mean_over_times(logp, old, adv, c),
                                   _np_policy_loss(logp.mean(0), old.mean(0), adv, c), rtol=1e-5)


def test_velocity_kl_uniform_and_elbo():
    rng = np.random.RandomState(2)
    v, w = rng.randn(3, 2, 4, 4).astype(np.float32), rng.randn(3, 2, 4, 4).astype(np.float32)
    t = np.array([0.3, 0.995, 1.0], np.float32)
    d = ((v.astype(np.float64) - w) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(rl.velocity_kl(v, w, t), d, rtol=1e-5)
    sigma = 0.7 * np.sqrt(t / (1 - np.minimum(t, 0.99)))
    np.testing.assert_allclose(rl.velocity_kl(v, w, t, elbo=True), d / (2 * sigma**2), rtol=1e-5)


@pytest.mark.parametrize("n,k,frac,init", [(14, 6, 0.9, False), (14, 4, 1.0, True), (10, 3, 0.9, True),
                                           (40, 7, 0.9, False), (14, 12, 0.9, False)])
def test_discrete_strata_match_torch_arithmetic(n, k, frac, init):
    lo, hi = rl.discrete_strata(n, k, frac, with_init=init)
    b = torch.linspace(0 if init else 1, int(n * frac), steps=k + 1)
    np.testing.assert_array_equal(lo, b[:-1].long().numpy())
    np.testing.assert_array_equal(hi, b[1:].long().numpy())


def test_sample_train_timesteps():
    g = shifted_grid(14)
    key = jax.random.key(0)
    seen = set()
    for i in range(16):
        ki = jax.random.fold_in(key, i)
        t = np.asarray(rl.sample_train_timesteps(ki, "discrete_wo_init", 6, 3, grid=g, draw="step"))
        assert t.shape == (6, 3) and (t == t[:, :1]).all()  # draw="step": one time per stratum for all
        idx = [int(np.argmin(np.abs(g - x))) for x in t[:, 0]]
        lo, hi = rl.discrete_strata(14, 6, 0.9, False)
        assert all(lo[j] <= idx[j] < max(hi[j], lo[j] + 1) for j in range(6)), idx
        seen.update(idx)
    assert seen == set(range(1, 12))  # every index of [1, 12) is reachable
    t = np.asarray(rl.sample_train_timesteps(key, "discrete", 4, 2, grid=g))
    assert t.max() <= 1.0 and t.min() >= g[12]
    u = np.asarray(rl.sample_train_timesteps(key, "uniform", 4, 64))
    base = (u / (3 - 2 * u))  # invert the shift
    assert base.min() >= 0.2 - 1e-6 and base.max() <= 1 + 1e-6
    strata = np.sort(np.floor((base - 0.2) / 0.8 * 4), axis=0)  # one draw per stratum per sample
    np.testing.assert_array_equal(strata, np.repeat(np.arange(4)[:, None], 64, axis=1))
    ln = np.asarray(rl.sample_train_timesteps(key, "logit_normal", 5, 2))
    assert ln.shape == (5, 2) and ln.min() >= 0.01 and ln.max() < 1
    with pytest.raises(ValueError, match="unknown"):
        rl.sample_train_timesteps(key, "cosine", 4, 2)
    with pytest.raises(ValueError, match="grid"):
        rl.sample_train_timesteps(key, "discrete", 4, 2)


# --------------------------------------------------------------------------------- composed loss


def _lin(scale):
    return lambda x, t: scale * x + t.reshape(-1, 1, 1, 1)


def _np_awm(x0, adv, times, noise, scale, ref_scale, ema_scale, old, beta, ema_beta, clip, elbo):
    k, b = times.shape
    tb = times[..., None, None, None]
    xt = (1 - tb) * x0[None] + tb * noise
    v = scale * xt + tb
    mse = ((v - (noise - x0[None])) ** 2).mean(axis=(2, 3, 4))
    logp = -((mse + 1e-10) ** 0.25 - 1e-10**0.25) * times / 0.25
    old = logp if old is None else old
    pg = _np_policy_loss(logp, old, adv, clip)
    sig2 = (0.7 * np.sqrt(times / (1 - np.minimum(times, 0.99)))) ** 2
    w = 1 / (2 * sig2) if elbo else 1.0
    kl = (((v - (ref_scale * xt + tb)) ** 2).mean(axis=(2, 3, 4)) * w).mean()
    kle = (((v - (ema_scale * xt + tb)) ** 2).mean(axis=(2, 3, 4)) * w).mean()
    return pg + beta * kl + ema_beta * kle, pg, kl, kle


@pytest.mark.parametrize("elbo", [False, True])
def test_awm_loss_composition(elbo):
    rng = np.random.RandomState(3)
    k, b = 3, 4
    x0 = rng.randn(b, 2, 4, 4).astype(np.float32)
    noise = rng.randn(k, b, 2, 4, 4).astype(np.float32)
    times = rng.uniform(0.2, 0.95, (k, b)).astype(np.float32)
    adv = rng.randn(b).astype(np.float32)
    old = None
    kw = dict(velocity_fn_ref=_lin(0.5), velocity_fn_ema=_lin(0.9), weighting="ghuber", beta=0.3,
              ema_beta=1.0, kl_elbo=elbo, clip_range=0.2)
    loss, aux = rl.awm_loss(_lin(0.8), x0, adv, times, noise, logp_old=old, **kw)
    x64, t64 = x0.astype(np.float64), times.astype(np.float64)
    ref = _np_awm(x64, adv, t64, noise, 0.8, 0.5, 0.9, old, 0.3, 1.0, 0.2, elbo)
    np.testing.assert_allclose([loss, aux["policy_loss"], aux["kl"], aux["kl_ema"]], ref, rtol=2e-5)
    assert float(aux["ratio_mean"]) == 1.0 and float(aux["clip_frac"]) == 0.0
    # the K passes in one folded batch or K separate calls give the same result
    loss2, _ = rl.awm_loss(_lin(0.8), x0, adv, times, noise, fold_times=False, **kw)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    # off-policy: logp_old from another policy moves the ratio and clips
    _, aux_on = rl.awm_loss(_lin(0.8), x0, adv, times, noise, **kw)
    old = np.asarray(aux_on["logp_mean"]) + 0 * times
    _, a_off = rl.awm_loss(_lin(0.8), x0, adv, times, noise, logp_old=old - 0.5, **kw)
    assert float(a_off["ratio_mean"]) != 1.0
    lo, _ = rl.awm_loss(_lin(0.8), x0, adv, times, noise, logp_old=old - 0.5, **kw)
    ref = _np_awm(x64, adv, t64, noise, 0.8, 0.5, 0.9, old - 0.5, 0.3, 1.0, 0.2, elbo)
    np.testing.assert_allclose(lo, ref[0], rtol=2e-5)


def test_awm_loss_kl_terms_optional_and_errors():
    x0 = jnp.ones((2, 1, 2, 2))
    noise = jnp.zeros((3, 2, 1, 2, 2))
    times = jnp.full((3, 2), 0.5)
    loss, aux = rl.awm_loss(_lin(1.0), x0, jnp.ones(2), times, noise, beta=1.0, ema_beta=1.0)
    assert float(aux["kl"]) == 0.0 and float(aux["kl_ema"]) == 0.0
    with pytest.raises(ValueError, match="loss_type"):
        rl.awm_loss(_lin(1.0), x0, jnp.ones(2), times, noise, loss_type="sum_first")
    with pytest.raises(ValueError, match="shapes"):
        rl.awm_loss(_lin(1.0), x0, jnp.ones(2), times, noise[:, :1])
    with pytest.raises(ValueError, match="logp_old"):
        rl.awm_loss(_lin(1.0), x0, jnp.ones(2), times, noise, logp_old=jnp.zeros((2, 3)))
    # repeat_over_times is time-major
    tiled = rl.repeat_over_times({"e": jnp.arange(2)}, 3)["e"]
    np.testing.assert_array_equal(tiled, [0, 1, 0, 1, 0, 1])
