"""kl-EMA and evaluation-EMA updates (awm_jax.rl.ema)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.rl import ema


def _tree(v):
    return {"a": jnp.full((3,), v, jnp.float32), "b": {"c": jnp.full((2, 2), 2 * v, jnp.float32)}}


@pytest.mark.parametrize("step,want", [(0, 0.0), (1, 0.001), (150, 0.15), (300, 0.3), (5000, 0.3)])
def test_kl_decay_schedule(step, want):
    assert float(ema.kl_ema_decay(step)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("step", [0, 1, 5, 89, 90, 1000])
def test_eval_decay_schedule(step):
    want = min((1 + step) / (10 + step), 0.99)
    assert float(ema.eval_ema_decay(step)) == pytest.approx(want, rel=1e-6)


def test_kl_update_matches_formula_and_first_step_copies():
    e, p = _tree(1.0), _tree(3.0)
    out = ema.kl_ema_update(e, p, 0)  # d = 0: copy
    np.testing.assert_allclose(out["a"], 3.0)
    out = ema.kl_ema_update(e, p, 200)  # d = 0.2
    np.testing.assert_allclose(out["a"], 0.2 * 1.0 + 0.8 * 3.0, rtol=1e-6)
    np.testing.assert_allclose(out["b"]["c"], 0.2 * 2.0 + 0.8 * 6.0, rtol=1e-6)


def test_eval_update_sequence_matches_reference_loop():
    """Running the update over steps 1..n equals a plain python loop of ema += (1 - d)(p - ema)."""
    rng = np.random.default_rng(0)
    ps = [rng.normal(size=(4,)).astype(np.float32) for _ in range(12)]
    e_ref = ps[0].copy()
    e = ema.init_ema({"w": jnp.asarray(ps[0])})
    for s, p in enumerate(ps, start=1):
        d = min((1 + s) / (10 + s), 0.99)
        e_ref = e_ref + (1 - d) * (p - e_ref)
        e = ema.eval_ema_update(e, {"w": jnp.asarray(p)}, s)
    np.testing.assert_allclose(e["w"], e_ref, rtol=1e-5, atol=1e-6)


def test_jittable_with_traced_step_and_dtype_kept():
    e = {"w": jnp.ones((2,), jnp.bfloat16)}
    p = {"w": jnp.zeros((2,), jnp.bfloat16)}
    out = jax.jit(ema.kl_ema_update)(e, p, jnp.int32(300))
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["w"], np.float32), 0.3, rtol=1e-2)


def test_init_is_a_copy():
    p = _tree(1.0)
    e = ema.init_ema(p)
    assert e["a"] is not p["a"]
    np.testing.assert_array_equal(e["a"], p["a"])
