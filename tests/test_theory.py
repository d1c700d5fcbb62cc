"""Cheap, exact checks of the theory behind AWM (paper arXiv 2509.25050) and of the samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax import rl
from awm_jax import sampling as S

# --------------------------------------------- (a) Theorem 2: noisy-conditioned DSM target variance

W = np.array([0.3, 0.5, 0.2])  # 1-D Gaussian mixture data distribution
MU = np.array([-1.5, 0.2, 1.8])
SIG = np.array([0.3, 0.5, 0.25])


def kappa(s, t):
    return (1 - t) ** 2 * s**2 / (t**2 * (t**2 * (1 - s) ** 2 - s**2 * (1 - t) ** 2))


def _posterior_x0(rng, xt, t, n):
    """Exact samples of x0 | x_t for the mixture (x_t | x0 ~ N((1 - t) x0, t^2))."""
    marg_var = (1 - t) ** 2 * SIG**2 + t**2
    logw = np.log(W) - 0.5 * (xt - (1 - t) * MU) ** 2 / marg_var - 0.5 * np.log(marg_var)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    prec = 1 / SIG**2 + (1 - t) ** 2 / t**2
    mean = (MU / SIG**2 + (1 - t) * xt / t**2) / prec
    comp = rng.choice(3, size=n, p=w)
    x0 = mean[comp] + rng.randn(n) / np.sqrt(prec[comp])
    score = np.sum(w * -(xt - (1 - t) * MU) / marg_var)  # exact d/dx log p_t(x_t)
    return x0, score


@pytest.mark.parametrize("t", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("s_frac", [0.2, 0.5, 0.8])
def test_theorem2_noisy_conditioning_adds_kappa(t, s_frac):
    s = s_frac * t  # s < t: x_s is the less noisy point
    rng = np.random.RandomState(int(100 * t + 10 * s_frac))
    n = 500_000
    alpha = (1 - t) / (1 - s)  # x_t | x_s ~ N(alpha x_s, sig2)
    sig2 = t**2 - alpha**2 * s**2
    for xt in (-0.7, 1.1):
        x0, score = _posterior_x0(rng, xt, t, n)
        x0 = np.concatenate([x0, x0])
        z = rng.randn(n)
        z = np.concatenate([z, -z])  # antithetic x_s noise: removes the MC cross term, still unbiased
        # x_s | (x0, x_t): Gaussian conjugacy of x_s | x0 ~ N((1 - s) x0, s^2) and x_t | x_s
        prec = 1 / s**2 + alpha**2 / sig2
        xs = ((1 - s) * x0 / s**2 + alpha * xt / sig2) / prec + z / np.sqrt(prec)
        y0 = -(xt - (1 - t) * x0) / t**2  # clean-conditioned DSM target (score of x_t | x0)
        ys = -(xt - alpha * xs) / sig2  # noisy-conditioned target (score of x_t | x_s)
        k = kappa(s, t)
        diff = ys.var() - y0.var()
        assert abs(diff - k) < 0.03 * k, (s, t, xt, diff, k)
        # both are unbiased for the true score (within MC error)
        assert abs(y0.mean() - score) < 5 * np.sqrt(y0.var() / n)
        assert abs(ys.mean() - score) < 5 * np.sqrt(y0.var() / n) + 1e-9


def test_kappa_monotone_in_s():
    s = np.linspace(0, 0.49, 50)
    k = kappa(s, 0.5)
    assert k[0] == 0 and np.all(np.diff(k) > 0)


# ------------------------------------------ (b), (d): AWM gradients with a tiny parametric velocity


def _vel(params):
    def v(x, t):
        y = jnp.einsum("oc,bchw->bohw", params["w"], x)
        return y + params["b"][None, :, None, None] * t.reshape(-1, 1, 1, 1)

    return v


def _setup(seed=0, k=3, b=4, c=2):
    rng = np.random.RandomState(seed)
    params = {"w": jnp.asarray(rng.randn(c, c) * 0.3, jnp.float32),
              "b": jnp.asarray(rng.randn(c), jnp.float32)}
    x0 = jnp.asarray(rng.randn(b, c, 3, 3), jnp.float32)
    noise = jnp.asarray(rng.randn(k, b, c, 3, 3), jnp.float32)
    times = jnp.asarray(rng.uniform(0.2, 0.9, (k, b)), jnp.float32)
    adv = jnp.asarray(rng.randn(b), jnp.float32)
    return params, x0, noise, times, adv


@pytest.mark.parametrize("weighting", ["uniform", "ghuber"])
def test_on_policy_gradient_is_advantage_weighted_score(weighting):
    params, x0, noise, times, adv = _setup()
    k, b = times.shape

    def loss(p):
        return rl.awm_loss(_vel(p), x0, adv, times, noise, weighting=weighting, clip_range=1.0)[0]

    def logp(p):
        xt = rl.noised_latents(x0, times, noise).reshape(k * b, *x0.shape[1:])
        v = _vel(p)(xt, times.reshape(-1))
        x0k = jnp.broadcast_to(x0[None], (k, *x0.shape)).reshape(k * b, *x0.shape[1:])
        return rl.awm_log_prob(v, noise.reshape(k * b, *x0.shape[1:]), x0k, times.reshape(-1), weighting)

    g = jax.grad(loss)(params)
    jac = jax.jacrev(logp)(params)
    a = jnp.tile(adv, k)
    for name in params:
        expected = -jnp.tensordot(a, jac[name], axes=(0, 0)) / (k * b)  # -mean(A grad logp)
        np.testing.assert_allclose(g[name], expected, rtol=1e-5, atol=1e-7)
        assert np.abs(np.asarray(g[name])).sum() > 0


def test_zero_advantages_give_exactly_zero_policy_gradient():
    params, x0, noise, times, _ = _setup(1)
    for loss_type in ("per_time", "mean_over_times"):
        def loss(p, loss_type=loss_type):
            return rl.awm_loss(_vel(p), x0, jnp.zeros(x0.shape[0]), times, noise, loss_type=loss_type)[0]

        g = jax.grad(loss)(params)
        for leaf in jax.tree.leaves(g):
            assert np.all(np.asarray(leaf) == 0.0)


# ----------------------------------------- (c) SDE marginals == ODE marginals on a Gaussian toy

M, SD = 0.6, 0.4  # x0 ~ N(M, SD^2): exact velocity E[eps - x0 | x_t]


def gauss_velocity(x, t):
    tt = t.reshape(-1, 1, 1, 1)
    var = (1 - tt) ** 2 * SD**2 + tt**2
    return (tt - (1 - tt) * SD**2) / var * (x - (1 - tt) * M) - M


def test_sde_marginals_match_ode_and_closed_form():
    n = 50_000
    g = S.shifted_grid(100, 1.0, diffusers_exact=False)  # uniform grid 1 -> 0
    x = S.init_latents(jax.random.key(0), n, (1, 1, 1))
    traj = S.sample_sde(gauss_velocity, jax.random.key(1), x, g, 0.7)
    ode = np.asarray(S.sample_ode(gauss_velocity, x, g)).ravel()
    lat = np.asarray(traj["latents"]).reshape(n, -1)
    for i in (25, 50, 75, 100):  # marginals at intermediate times and at the end
        t = g[i]
        mean_t, var_t = (1 - t) * M, (1 - t) ** 2 * SD**2 + t**2
        xi = lat[:, i]
        se_mean, se_var = np.sqrt(var_t / n), var_t * np.sqrt(2 / n)
        assert abs(xi.mean() - mean_t) < 5 * se_mean + 0.01 * np.sqrt(var_t), (i, xi.mean(), mean_t)
        assert abs(xi.var() - var_t) < 5 * se_var + 0.03 * var_t, (i, xi.var(), var_t)
    # the ODE (deterministic map of the same noise) has the same end marginal
    assert abs(ode.mean() - lat[:, -1].mean()) < 0.01
    assert abs(ode.var() / lat[:, -1].var() - 1) < 0.05
    assert abs(ode.var() - SD**2) < 0.03 * SD**2
    # the SDE really is stochastic: the end point is not the ODE map of the initial noise
    assert np.abs(ode - lat[:, -1]).mean() > 0.05


def test_sa_solver_stochastic_marginals_on_gaussian_toy():
    # with tau > 0 the SA-Solver output keeps the law of E[x0 | x_t] at t = grid[-2] (here ~N(M, v))
    n = 100_000
    g = S.awm_sa_solver_grid(S.shifted_grid(120, 3.0))  # enough steps for this sharp toy (14 steps: ~20% off)
    x = S.init_latents(jax.random.key(2), n, (1, 1, 1))
    outs = [np.asarray(S.sample_sa_solver(gauss_velocity, jax.random.key(3), x, g, tau)).ravel()
            for tau in (0.0, 0.8)]
    t = g[-2]
    var_t = (1 - t) ** 2 * SD**2 + t**2
    var_ref = ((1 - t) * SD**2) ** 2 / var_t
    for out in outs:
        assert abs(out.mean() - M) < 5 * np.sqrt(var_ref / n) + 0.005
        assert abs(out.var() / var_ref - 1) < 0.04, (out.var(), var_ref)
    assert np.abs(outs[0] - outs[1]).mean() > 0.05  # tau really injects noise
