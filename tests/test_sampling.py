"""Grids vs diffusers, single steps vs numpy re-derivations, SA-Solver accuracy/order, jitted samplers."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax import sampling as S

# ------------------------------------------------------------------------------------------- grids


@pytest.mark.parametrize("n", [1, 10, 14, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_shifted_grid_matches_diffusers(n, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(n)
    g = S.shifted_grid(n, shift)
    assert g.shape == (n + 1,)
    np.testing.assert_allclose(g, sch.sigmas.numpy(), atol=2e-7)
    np.testing.assert_allclose(1000 * g[:-1], sch.timesteps.numpy(), rtol=1e-6, atol=1e-4)


def test_shifted_grid_uniform_base_formula():
    g = S.shifted_grid(14, 3.0, diffusers_exact=False)
    base = np.linspace(1, 0, 15)
    np.testing.assert_allclose(g, 3 * base / (1 + 2 * base), rtol=1e-12)


@pytest.mark.parametrize("n,seq_len", [(28, 4096), (10, 1024), (4, 256)])
def test_flux_grid_matches_diffusers(n, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(seq_len)
    assert S.calculate_shift(seq_len) == pytest.approx(mu, abs=1e-12)
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                          base_image_seq_len=256, max_image_seq_len=4096)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    np.testing.assert_allclose(S.flux_grid(n, seq_len), sch.sigmas.numpy(), atol=2e-7)
    assert S.flux_image_seq_len((16, 128, 128)) == 4096


def test_awm_grid_tweaks_and_errors():
    g0 = S.shifted_grid(14)
    g = S.awm_sa_solver_grid(g0)
    assert g[0] == 0.999 and g[-2] == pytest.approx(g0[-3] / 2) and g[-1] == 0
    np.testing.assert_array_equal(g[1:-2], g0[1:-2])
    with pytest.raises(ValueError, match="num_steps"):
        S.shifted_grid(0)
    with pytest.raises(ValueError, match="decreasing"):
        S.check_grid([0.2, 0.5, 0.0])
    with pytest.raises(ValueError, match="exactly one"):
        S.flux_grid(4)

# ------------------------------------------------------------------------------------------- steps


def _rand(seed, shape=(3, 2, 4, 4)):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def test_euler_step():
    x, v = _rand(0), _rand(1)
    t, tn = np.array([0.9, 0.5, 0.2], np.float32), np.array([0.8, 0.4, 0.0], np.float32)
    out = S.euler_step(jnp.asarray(x), jnp.asarray(v), t, tn)
    np.testing.assert_allclose(out, x + (tn - t)[:, None, None, None] * v, rtol=1e-6, atol=1e-6)


def _np_sde(x, v, t, tn, z, a, t1):
    x, v, z = (np.float64(q) for q in (x, v, z))
    tp = np.where(t == 1, t1, t)
    std = a * np.sqrt(t / (1 - tp))
    dt = tn - t
    b = lambda q: q[:, None, None, None]  # noqa: E731
    mean = x * (1 + b(std**2 * dt / (2 * t))) + v * b((1 + std**2 * (1 - t) / (2 * t)) * dt)
    s = b(std * np.sqrt(-dt))
    xn = mean + s * z
    lp = (-((xn - mean) ** 2) / (2 * s**2) - np.log(s) - np.log(np.sqrt(2 * np.pi))).mean(axis=(1, 2, 3))
    return xn, lp, mean, std


def test_flow_grpo_sde_step_matches_numpy_and_recompute():
    x, v, z = _rand(0), _rand(1), _rand(2)
    t = np.array([1.0, 0.6, 0.1], np.float32)
    tn = np.array([0.9, 0.5, 0.0], np.float32)
    xn, lp, mean, std = S.flow_grpo_sde_step(x, v, t, tn, z, 0.7, 0.9)
    rx, rlp, rmean, rstd = _np_sde(x, v, t.astype(np.float64), tn.astype(np.float64), z, 0.7, 0.9)
    chex.assert_shape(lp, (3,))
    assert lp.dtype == jnp.float32
    np.testing.assert_allclose(xn, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, rmean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, rstd, rtol=1e-6)
    np.testing.assert_allclose(lp, rlp, rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(std)).all()  # t == 1 uses t1
    lp2, mean2, std2 = S.flow_grpo_sde_log_prob(x, v, t, tn, xn, 0.7, 0.9)
    np.testing.assert_allclose(lp2, lp, rtol=1e-6, atol=1e-6)
    # log-prob gradient flows through the mean only (x_next constant)
    g = jax.grad(lambda vv: S.flow_grpo_sde_log_prob(x, vv, t, tn, xn, 0.7, 0.9)[0].sum())(jnp.asarray(v))
    assert np.abs(np.asarray(g)).sum() > 0


def test_cps_step_matches_numpy():
    x, v, z = _rand(3), _rand(4), _rand(5)
    t = np.array([0.95, 0.6, 0.3], np.float32)
    tn = np.array([0.9, 0.5, 0.1], np.float32)
    a = 0.8
    xn, lp, mean, std = S.cps_step(x, v, t, tn, z, a)
    b = lambda q: np.float64(q)[:, None, None, None]  # noqa: E731
    s = tn * np.sin(a * np.pi / 2)
    rmean = (1 - b(tn)) * (x - b(t) * v) + np.sqrt(b(tn) ** 2 - b(s) ** 2) * (x + (1 - b(t)) * v)
    rxn = rmean + b(s) * z
    np.testing.assert_allclose(mean, rmean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xn, rxn, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lp, -((rxn - rmean) ** 2).mean(axis=(1, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(S.cps_log_prob(x, v, t, tn, xn, a)[0], lp, atol=1e-7)


def test_sa_solver_first_step_is_ddim_and_noise_window():
    g = S.awm_sa_solver_grid(S.shifted_grid(14))
    co = S.sa_solver_coefficients(g, 0.0)
    t0, t1 = g[0], g[1]
    lam = lambda t: math.log((1 - t) / t)  # noqa: E731
    h = lam(t1) - lam(t0)
    # tau = 0, order 1: x1 = (t1 / t0) x + (1 - t1)(1 - e^{-h}) D  (DDIM / DPM-Solver++(1))
    np.testing.assert_allclose(co["x_scale"][0], t1 / t0, rtol=1e-6)
    np.testing.assert_allclose(co["p0"][0], (1 - t1) * -math.expm1(-h), rtol=1e-5)
    assert co["p1"][0] == 0 and co["use_corrector"][0] == 0 and (co["use_corrector"][1:] == 1).all()
    assert (co["noise_scale"] == 0).all()
    # second-order weights sum to the order-1 weight (they integrate the constant exactly)
    lam_g = np.log((1 - g[:-1]) / g[:-1])
    h_all = lam_g[2:] - lam_g[1:-1]
    assert np.allclose(co["p0"][1:] + co["p1"][1:], (1 - g[2:-1]) * -np.expm1(-h_all), rtol=1e-5)
    cn = S.sa_solver_coefficients(g, 0.4)
    inside = (cn["t"] >= 0.3) & (cn["t"] <= 0.9)
    assert inside.any() and (~inside).any()
    assert (cn["noise_scale"][inside] > 0).all() and (cn["noise_scale"][~inside] == 0).all()


# ---------------------------------------------------------------------------- Gaussian toy velocity

M, SD = 0.7, 0.5  # data x0 ~ N(M, SD^2) per coordinate


def gauss_velocity(x, t):
    tt = t.reshape(-1, *([1] * (x.ndim - 1)))
    var = (1 - tt) ** 2 * SD**2 + tt**2
    return (tt - (1 - tt) * SD**2) / var * (x - (1 - tt) * M) - M


def gauss_flow(x_from, t_from, t_to):
    """Exact probability-flow ODE map between two times for the Gaussian toy."""
    r = lambda t: math.sqrt((1 - t) ** 2 * SD**2 + t**2)  # noqa: E731
    return (1 - t_to) * M + r(t_to) / r(t_from) * (x_from - (1 - t_from) * M)


def gauss_x0_pred(x, t):
    var = (1 - t) ** 2 * SD**2 + t**2
    return M + (1 - t) * SD**2 / var * (x - (1 - t) * M)


def _sa_error(n_steps):
    g = np.concatenate([np.linspace(0.95, 0.05, n_steps), [0.0]])
    x = jax.random.normal(jax.random.key(1), (4, 1, 2, 2))
    out = S.sample_sa_solver(gauss_velocity, jax.random.key(2), x, g, 0.0)
    # the solver returns D(x_{N-1}, t_{N-1}) of its predicted x_{N-1}: compare with the exact one
    ref = gauss_x0_pred(gauss_flow(np.asarray(x, np.float64), g[0], g[-2]), g[-2])
    return float(np.abs(np.asarray(out) - ref).max())


def test_sa_solver_deterministic_linear_field_exact_and_order():
    # point-mass data: the data prediction is constant, SA-Solver is exact for any step count
    x = jax.random.normal(jax.random.key(0), (2, 1, 2, 2))
    g = S.awm_sa_solver_grid(S.shifted_grid(14))
    out = S.sample_sa_solver(lambda x, t: (x - 0.3) / t.reshape(-1, 1, 1, 1), jax.random.key(3), x, g, 0.0)
    np.testing.assert_allclose(out, 0.3, atol=2e-5)
    e20, e40 = _sa_error(20), _sa_error(40)
    assert e40 < 5e-3
    # at least second order: halving the step divides the error by >= 4 (measured ~7)
    assert e20 / e40 > 4.0, (e20, e40)


def test_ode_sampler_accuracy_on_gaussian():
    x = jax.random.normal(jax.random.key(0), (8, 1, 2, 2))
    ref = gauss_flow(np.asarray(x, np.float64), 1.0, 0.0)
    outs = [S.sample_ode(gauss_velocity, x, np.linspace(1.0, 0.0, n + 1)) for n in (100, 200)]
    errs = [float(np.abs(np.asarray(o) - ref).max()) for o in outs]
    assert errs[1] < 1e-2
    assert 1.7 < errs[0] / errs[1] < 2.3, errs  # Euler is first order


# ------------------------------------------------------------------------------------ jitted samplers


def _ctx_velocity(x, t, ctx):
    return ctx["w"] * x + ctx["b"] * t.reshape(-1, 1, 1, 1)


def test_samplers_deterministic_shapes_and_no_retrace():
    key = jax.random.key(0)
    x = S.init_latents(jax.random.key(5), 3, (2, 4, 4))
    g = S.shifted_grid(6)
    ctx = {"w": jnp.float32(-0.3), "b": jnp.float32(0.1)}
    traces = chex.assert_max_traces(_ctx_velocity, n=5)  # one compile per kind (SA-Solver traces it twice)
    for seed in range(2):
        ctx2 = {"w": ctx["w"] + seed, "b": ctx["b"]}
        k = jax.random.fold_in(key, seed)
        S.sample_ode(traces, x, g, context=ctx2)
        S.sample_sde(traces, k, x, g, 0.7, context=ctx2)
        S.sample_cps(traces, k, x, g, 0.7, context=ctx2)
        S.sample_sa_solver(traces, k, x, S.awm_sa_solver_grid(g), 0.4, context=ctx2)
    out1 = S.sample_sde(traces, key, x, g, 0.7, context=ctx)
    out2 = S.sample_sde(traces, key, x, g, 0.7, context=ctx)
    for k in out1:
        np.testing.assert_array_equal(out1[k], out2[k])
    chex.assert_shape(out1["latents"], (3, 7, 2, 4, 4))
    chex.assert_shape([out1["log_probs"], out1["stds"], out1["timesteps"]], (3, 6))
    chex.assert_shape(out1["means"], (3, 6, 2, 4, 4))
    np.testing.assert_array_equal(out1["final"], out1["latents"][:, -1])
    # the stored log-probs are reproduced by recomputation from the stored (x_t, x_next)
    i = 2
    v = _ctx_velocity(out1["latents"][:, i], out1["timesteps"][:, i], ctx)
    lp, _, _ = S.flow_grpo_sde_log_prob(out1["latents"][:, i], v, out1["timesteps"][:, i],
                                        out1["next_timesteps"][:, i], out1["latents"][:, i + 1], 0.7, g[1])
    np.testing.assert_allclose(lp, out1["log_probs"][:, i], rtol=1e-5, atol=1e-5)
    sa1 = S.sample_sa_solver(traces, key, x, S.awm_sa_solver_grid(g), 0.4, context=ctx)
    sa2 = S.sample_sa_solver(traces, jax.random.key(9), x, S.awm_sa_solver_grid(g), 0.4, context=ctx)
    sa3 = S.sample_sa_solver(traces, jax.random.key(9), x, S.awm_sa_solver_grid(g), 0.0, context=ctx)
    sa4 = S.sample_sa_solver(traces, jax.random.key(1), x, S.awm_sa_solver_grid(g), 0.0, context=ctx)
    assert not np.allclose(sa1, sa2)
    np.testing.assert_array_equal(sa3, sa4)  # tau = 0: the key does not matter


def test_classifier_free_guidance():
    def model(x, t, cond):
        return x * cond[:, None, None, None] + t.reshape(-1, 1, 1, 1)

    x = jnp.ones((2, 1, 2, 2))
    t = jnp.full((2,), 0.5)
    cond, uncond = jnp.array([2.0, 3.0]), jnp.array([1.0, 1.0])
    v = S.classifier_free_guidance(model, 4.5)(x, t, (cond, uncond))
    vu, vc = model(x, t, uncond), model(x, t, cond)
    np.testing.assert_allclose(v, vu + 4.5 * (vc - vu), rtol=1e-6)
    np.testing.assert_allclose(S.classifier_free_guidance(model, 1.0)(x, t, (cond, uncond)), vc)
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda g: S.sample_ode(lambda x, t: x, x, g))(jnp.linspace(1, 0, 3))


def test_sample_dispatch():
    x = S.init_latents(jax.random.key(0), 2, (1, 2, 2))
    key = jax.random.key(1)
    g = S.shifted_grid(4)
    out = S.sample("ode", gauss_velocity, key, x, g)["x0"]
    np.testing.assert_array_equal(out, S.sample_ode(gauss_velocity, x, g))
    sa = S.sample("sa_solver", gauss_velocity, key, x, g, noise_level=0.4)["x0"]
    ref = S.sample_sa_solver(gauss_velocity, key, x, S.awm_sa_solver_grid(g), 0.4)
    np.testing.assert_array_equal(sa, ref)
    em = S.sample("euler_maruyama", gauss_velocity, key, x, g, noise_level=0.7)
    traj = S.sample_sde(gauss_velocity, key, x, g, 0.7)
    np.testing.assert_array_equal(em["x0"], traj["final"])
    assert set(em) == {"x0"}
    full = S.sample("sde", gauss_velocity, key, x, g, noise_level=0.7, trajectory=True)
    np.testing.assert_array_equal(full["log_probs"], traj["log_probs"])
    with pytest.raises(ValueError, match="unknown"):
        S.sample("ddim", gauss_velocity, key, x, g)
