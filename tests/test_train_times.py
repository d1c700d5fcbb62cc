"""Per-sample stratified training times (awm.timestep_draw), checked against a hand-derived expectation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.rl.timesteps import sample_train_timesteps
from awm_jax.sampling.schedules import shifted_grid

K, B, R = 3, 8, 4000  # times per sample, samples, Monte-Carlo draws


def _grad(times, a, theta):
    """d/dtheta of the quadratic surrogate mean_{k,i} a_i (theta - t_ki)^2 for one (K, B) draw."""
    return np.mean(2.0 * a[None, :] * (theta - times), axis=(-2, -1))


@pytest.fixture(scope="module")
def draws():
    grid = np.asarray(shifted_grid(14, 3.0), np.float64)
    keys = jax.random.split(jax.random.key(0), R)
    out = {}
    for d in ("sample", "step"):
        f = jax.jit(jax.vmap(lambda k, d=d: sample_train_timesteps(
            k, "discrete_wo_init", K, B, grid=grid, timestep_fraction=0.9, draw=d)))
        out[d] = np.asarray(f(keys), np.float64)  # (R, K, B)
    return grid, out


def test_per_sample_tuples_are_stratified(draws):
    grid, out = draws
    # the reference strata: linspace(1, int(14 * 0.9), K + 1) truncated -> [1, 4), [4, 8), [8, 12)
    lo, hi = [1, 4, 8], [4, 8, 12]
    t = out["sample"]
    for k in range(K):
        allowed = grid[lo[k]:hi[k]]
        assert np.all(np.min(np.abs(t[:, k, :, None] - allowed[None, None]), -1) < 1e-6)
    # each sample its own tuple; "step" one tuple for all
    assert np.mean(np.ptp(t, axis=-1) > 0) > 0.9
    assert np.all(np.ptp(out["step"], axis=-1) == 0)


def test_same_mean_gradient_lower_variance(draws):
    grid, out = draws
    a = np.linspace(0.5, 1.5, B)
    theta = 0.3
    # hand-derived expectation: index uniform within each stratum
    et = np.array([grid[1:4].mean(), grid[4:8].mean(), grid[8:12].mean()])
    expected = np.mean(2.0 * a) * theta - np.mean(2.0 * a) * et.mean()
    g = {d: _grad(out[d], a, theta) for d in out}
    for d, gd in g.items():
        se = gd.std() / np.sqrt(R)
        assert abs(gd.mean() - expected) < 4 * se + 1e-9, (d, gd.mean(), expected, se)
    ratio = g["sample"].var() / g["step"].var()
    assert ratio < 0.3, ratio  # independent tuples per sample: about 1/B of the shared draw's variance


def test_bad_draw_names_the_key():
    with pytest.raises(ValueError, match="awm.timestep_draw"):
        sample_train_timesteps(jax.random.key(0), "uniform", 2, 2, draw="group")
    assert sample_train_timesteps(jax.random.key(0), "uniform", 2, 3).dtype == jnp.float32


def test_eval_ema_interval_matches_flow_grpo_wrapper():
    """The eval EMA with decay 0.9 every 8 steps equals flow_grpo's EMAModuleWrapper rule re-derived in
    NumPy: after optimizer step s (steps completed), if (s + 1) % 8 == 0, ema += (1 - d_s) (theta - ema),
    d_s = min((1 + s) / (10 + s), 0.9)."""
    from awm_jax.rl import ema as ema_lib

    rng = np.random.default_rng(0)
    thetas = rng.normal(size=(40, 3)).astype(np.float32)
    ref = thetas[0].astype(np.float64).copy()
    ours = jnp.asarray(thetas[0])
    for s in range(1, 40):
        if (s + 1) % 8 == 0:
            ref += (1 - min((1 + s) / (10 + s), 0.9)) * (thetas[s] - ref)
        ours = ema_lib.eval_ema_update(ours, jnp.asarray(thetas[s]), s, 0.9, 8)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ref, thetas[0])
