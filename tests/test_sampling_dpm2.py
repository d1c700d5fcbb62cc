"""DPM2 (DiffusionNFT's deterministic rollout solver) against a NumPy re-derivation of the authors' update
(NVlabs/DiffusionNFT flow_grpo/diffusers_patch/solver.py at 24af5554, lines 207-356)."""

import math

import jax
import numpy as np
import pytest

from awm_jax import sampling as S

M, SD = 0.7, 0.5  # Gaussian toy data x0 ~ N(M, SD^2): an analytic velocity field, linear in x


def gauss_velocity(x, t):
    tt = t.reshape(-1, *([1] * (x.ndim - 1)))
    var = (1 - tt) ** 2 * SD**2 + tt**2
    return (tt - (1 - tt) * SD**2) / var * (x - (1 - tt) * M) - M


def gauss_flow(x_from, t_from, t_to):
    r = lambda t: math.sqrt((1 - t) ** 2 * SD**2 + t**2)  # noqa: E731
    return (1 - t_to) * M + r(t_to) / r(t_from) * (x_from - (1 - t_from) * M)


def np_dpm2(v_fn, x, sigmas):
    """The authors' run_sampling(solver="dpm2", determistic=True) in float64 NumPy, step by step: DPMState
    holds the last two data predictions, ``lower_order_nums`` counts steps; step 0 and the last step are
    ddim_update(eta=0), the others multistep_dpm_solver_second_order_update."""
    sig = np.asarray(sigmas, np.float64)
    n = len(sig) - 1
    outs, lower = [None, None], 0
    with np.errstate(divide="ignore"):
        lam = np.log(1.0 - sig) - np.log(sig)  # -inf at sigma = 1, +inf at 0
    for i in range(n):
        s, t = sig[i], sig[i + 1]
        d = x - s * v_fn(x, np.full((x.shape[0],), s))
        outs = [outs[1], d]
        final = i == n - 1
        if lower < 1 or final:
            assert i == 0 or final  # order 2: the first-order DPM branch is never taken
            noise_pred = (x - (1 - s) * d) / s  # ddim_update, eta = 0: rho = 0
            x = (1 - t) * d + np.sqrt(t**2) * noise_pred
        else:
            h, h0 = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
            r0 = h0 / h
            d1 = (1.0 / r0) * (outs[1] - outs[0])
            x = (t / s) * x - (1 - t) * (np.exp(-h) - 1.0) * d - 0.5 * (1 - t) * (np.exp(-h) - 1.0) * d1
        lower = min(lower + 1, 2)
    return x


def _f64_velocity(x, t):
    return np.asarray(gauss_velocity(x, t))


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_dpm2_matches_numpy_rederivation(n):
    x = np.asarray(S.init_latents(jax.random.key(0), 4, (2, 3, 3)), np.float64)
    g = S.shifted_grid(n, 3.0).astype(np.float32).astype(np.float64)  # the authors' float32 sigmas
    ref = np_dpm2(_f64_velocity, x, g)
    out = np.asarray(S.sample_dpm2(gauss_velocity, x.astype(np.float32), g))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    # the dispatch: same result, no key or noise level used (deterministic)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a = S.sample("dpm2", gauss_velocity, k1, x.astype(np.float32), g, noise_level=0.7)["x0"]
    b = S.sample("dpm2", gauss_velocity, k2, x.astype(np.float32), g)["x0"]
    np.testing.assert_array_equal(a, out)
    np.testing.assert_array_equal(a, b)


def test_dpm2_coefficients_first_middle_last():
    g = S.shifted_grid(10, 3.0)
    c = S.dpm2_coefficients(g)
    assert all(v.shape == (10,) and v.dtype == np.float32 for v in c.values())
    s = g.astype(np.float32).astype(np.float64)
    # step 0 from sigma_0 = 1: x_1 = (1 - s_1) D_0 + s_1 x_0
    np.testing.assert_allclose([c["x_scale"][0], c["d_scale"][0], c["diff_scale"][0]],
                               [s[1], 1 - s[1], 0.0], rtol=1e-6)
    # step 1: lambda_0 = -inf -> first-order update, no correction
    assert c["diff_scale"][1] == 0.0
    h = math.log((1 - s[2]) / s[2]) - math.log((1 - s[1]) / s[1])
    np.testing.assert_allclose(c["d_scale"][1], (1 - s[2]) * (1 - math.exp(-h)), rtol=1e-6)
    # middle steps: the second-order correction (D_i - D_{i-1}) / (2 r0)
    i = 5
    lam = lambda u: math.log((1 - u) / u)  # noqa: E731
    h, h0 = lam(s[i + 1]) - lam(s[i]), lam(s[i]) - lam(s[i - 1])
    b = (1 - s[i + 1]) * (1 - math.exp(-h))
    np.testing.assert_allclose([c["x_scale"][i], c["d_scale"][i], c["diff_scale"][i]],
                               [s[i + 1] / s[i], b, 0.5 * b * h / h0], rtol=1e-5)
    assert (c["diff_scale"][2:-1] > 0).all()
    # the last step: x_N = D_{N-1}
    assert (c["x_scale"][-1], c["d_scale"][-1], c["diff_scale"][-1]) == (0.0, 1.0, 0.0)
    # a grid starting below 1 keeps the correction at step 1
    assert S.dpm2_coefficients(np.array([0.9, 0.6, 0.3, 0.0]))["diff_scale"][1] > 0
    with pytest.raises(ValueError, match="DPM2 grid"):
        S.dpm2_coefficients(np.array([1.0, 1.0, 0.0]))


def test_dpm2_exact_for_point_mass_and_second_order():
    # point-mass data: D is constant, the final x = D exactly whatever the step count
    x = S.init_latents(jax.random.key(3), 2, (1, 2, 2))
    out = S.sample_dpm2(lambda x, t: (x - 0.3) / t.reshape(-1, 1, 1, 1), x, S.shifted_grid(6))
    np.testing.assert_allclose(out, 0.3, atol=1e-6)
    # Gaussian data (exact flow known): far more accurate than Euler at the same step count, and more than
    # first order between 40 and 80 steps (measured 7x / 11x better than Euler, ratio 3.05; the first DDIM
    # step and the final x = D are first order, so the ratio is below 4)
    x = S.init_latents(jax.random.key(4), 8, (1, 2, 2))
    exact = gauss_flow(np.asarray(x, np.float64), 1.0, 0.0)
    errs = []
    for n in (40, 80):
        g = np.linspace(1.0, 0.0, n + 1)
        err = float(np.abs(np.asarray(S.sample_dpm2(gauss_velocity, x, g)) - exact).max())
        euler = float(np.abs(np.asarray(S.sample_ode(gauss_velocity, x, g)) - exact).max())
        assert err < euler / 5, (n, err, euler)
        errs.append(err)
    assert errs[0] / errs[1] > 2.5, errs
