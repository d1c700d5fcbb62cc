"""Pretraining objectives of the toy world: the noisy-x_s target (the paper's Eq. 8) and the curves."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_tiny import tiny_toy_config

from awm_jax.toy import pretrain


@pytest.mark.parametrize("t,gap", [(0.5, 0.1), (0.8, 0.3), (0.3, 0.05)])
def test_noisy_target_is_unbiased_with_theorem2_variance(t, gap):
    """Given (x_t, x0) the noisy target averages to the clean velocity (x_t - x0) / t, with the extra
    variance s^2 / (t^2 (1-s)^2 - s^2 (1-t)^2) per dimension (Theorem 2 in velocity units)."""
    n = 200_000
    x0 = jnp.full((n, 1, 1, 1), 0.7)
    xt, target = pretrain.noisy_velocity_target(x0, jnp.full((n,), t), jax.random.key(3), gap)
    resid = np.asarray(target - (xt - x0) / t).ravel()
    s = t - gap
    want_var = s**2 / (t**2 * (1 - s) ** 2 - s**2 * (1 - t) ** 2)
    assert abs(resid.mean()) < 5 * np.sqrt(want_var / n)
    assert resid.var() == pytest.approx(want_var, rel=0.03)
    # x_t has the forward marginal of x0: mean (1 - t) x0, std t
    assert float(xt.mean()) == pytest.approx((1 - t) * 0.7, abs=5 * t / np.sqrt(n))
    assert float(xt.std()) == pytest.approx(t, rel=0.01)


def test_noisy_target_reduces_to_clean_when_s_is_zero():
    x0 = jax.random.normal(jax.random.key(0), (4, 3, 2, 2))
    t = jnp.array([0.05, 0.1, 0.02, 0.08])
    xt, target = pretrain.noisy_velocity_target(x0, t, jax.random.key(1), gap=0.1)
    np.testing.assert_allclose(target, (xt - x0) / t[:, None, None, None], rtol=1e-4, atol=1e-4)


def test_pretrain_noisy_objective_logs_curves(tmp_path):
    out = tmp_path / "ck"
    res = pretrain.pretrain(
        str(out),
        steps=4,
        batch=4,
        lr=3e-3,
        warmup=1,
        config=tiny_toy_config(num_layers=1, dual_attention_layers=()),
        eval_per_tag=0,
        log_every=2,
        objective="noisy_xs",
        curve_every=2,
        curve_per_tag=1,
        eval_steps=2,
    )
    assert len(res["losses"]) == 4 and all(np.isfinite(res["losses"]))
    lines = [json.loads(x) for x in (out / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in lines] == [2, 4] and lines == res["curve"]
    for p in lines:
        assert np.isfinite(p["val_loss_clean"]) and 0.0 <= p["accuracy"]["overall"] <= 1.0
    assert json.loads((out / "eval.json").read_text())["objective"] == "noisy_xs"
    with pytest.raises(ValueError, match="unknown pretraining objective 'ddpo'"):
        pretrain.pretrain(
            None, steps=1, config=tiny_toy_config(num_layers=1, dual_attention_layers=()), objective="ddpo"
        )


def test_pretrain_cli_rejects_unknown_transformer_keys():
    with pytest.raises(SystemExit, match="unknown keys \\['patch'\\]"):
        pretrain.main(["--out", "", "--steps", "1", "--transformer", '{"patch": 1}'])
    with pytest.raises(SystemExit, match="not valid JSON"):
        pretrain.main(["--out", "", "--steps", "1", "--transformer", "{patch"])
