"""Flow-GRPO loss: on-policy ratio, PPO clip, KL formula, mask, trajectory helper, CFG in training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax import rl
from awm_jax import sampling as S


def _lin(a):
    return lambda x, t: a * x + t.reshape(-1, 1, 1, 1)


def _batch(seed=0, b=4):
    rng = np.random.RandomState(seed)
    x = rng.randn(b, 2, 4, 4).astype(np.float32)
    z = rng.randn(b, 2, 4, 4).astype(np.float32)
    t = np.full((b,), 0.8, np.float32)
    tn = np.full((b,), 0.6, np.float32)
    v = np.asarray(_lin(0.5)(jnp.asarray(x), jnp.asarray(t)))
    xn, lp, mean, std = S.flow_grpo_sde_step(x, v, t, tn, z, 0.7, 0.9)
    return x, np.asarray(xn), t, tn, np.asarray(lp), rng.randn(b).astype(np.float32)


def test_on_policy_ratio_one_and_loss():
    x, xn, t, tn, lp, adv = _batch()
    loss, aux = rl.flow_grpo_step_loss(_lin(0.5), x, xn, t, tn, adv, lp, noise_level=0.7, t1=0.9)
    np.testing.assert_allclose(aux["ratio_mean"], 1.0, atol=1e-5)
    np.testing.assert_allclose(loss, -adv.mean(), rtol=1e-4, atol=1e-5)
    assert float(aux["kl"]) == 0.0


def test_clip_and_mask_vs_numpy():
    x, xn, t, tn, lp, adv = _batch(1)
    old = lp + np.array([0.5, -0.5, 1e-5, 0.0], np.float32)
    mask = np.array([1, 1, 1, 0], bool)
    c = 1e-4
    loss, aux = rl.flow_grpo_step_loss(_lin(0.5), x, xn, t, tn, adv, old, noise_level=0.7, t1=0.9,
                                       clip_range=c, mask=mask)
    r = np.exp(lp - old)
    per = np.maximum(-adv * r, -adv * np.clip(r, 1 - c, 1 + c))
    np.testing.assert_allclose(loss, per[mask].mean(), rtol=1e-4)
    np.testing.assert_allclose(aux["clip_frac"], 2 / 3)


def test_kl_formula():
    x, xn, t, tn, lp, adv = _batch(2)
    beta = 0.04
    loss, aux = rl.flow_grpo_step_loss(_lin(0.5), x, xn, t, tn, adv, lp, noise_level=0.7, t1=0.9, beta=beta,
                                       velocity_fn_ref=_lin(0.2))
    _, m1, std = S.flow_grpo_sde_log_prob(x, _lin(0.5)(x, t), t, tn, xn, 0.7, 0.9)
    _, m2, _ = S.flow_grpo_sde_log_prob(x, _lin(0.2)(x, t), t, tn, xn, 0.7, 0.9)
    std = np.asarray(std, np.float64)
    kl = (((np.asarray(m1, np.float64) - np.asarray(m2)) ** 2).mean(axis=(1, 2, 3)) / (2 * std**2)).mean()
    np.testing.assert_allclose(aux["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(loss, aux["policy_loss"] + beta * kl, rtol=1e-5)
    # std_t is 0.7 sqrt(t / (1 - t)), without the sqrt(-dt) factor
    np.testing.assert_allclose(std, 0.7 * np.sqrt(0.8 / 0.2), rtol=1e-6)


def test_num_train_steps():
    assert rl.num_train_steps(10, 0.99) == 9 and rl.num_train_steps(40, 1.0) == 40
    with pytest.raises(ValueError, match="no step"):
        rl.num_train_steps(1, 0.5)
    with pytest.raises(ValueError, match="kind"):
        rl.flow_grpo_step_loss(_lin(0.5), *_batch()[:4], jnp.ones(4), jnp.zeros(4), noise_level=0.7, t1=0.9,
                               kind="ddim")


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_trajectory_loss_with_cfg_is_on_policy_and_differentiable(kind):
    def model(x, t, cond, a):
        return a * x * cond[:, None, None, None] + t.reshape(-1, 1, 1, 1)

    cond, uncond = jnp.array([1.0, 2.0, 0.5]), jnp.zeros(3)
    cfg = S.classifier_free_guidance(lambda x, t, c: model(x, t, c, 0.5), 4.5)
    g = S.shifted_grid(5)
    x = S.init_latents(jax.random.key(0), 3, (1, 4, 4))
    sampler = S.sample_sde if kind == "sde" else S.sample_cps
    traj = sampler(cfg, jax.random.key(1), x, g, 0.7, context=(cond, uncond))
    adv = jnp.array([1.0, -1.0, 0.5])
    n = rl.num_train_steps(5, 0.99)

    def loss_fn(a):
        pol = S.classifier_free_guidance(lambda x, t, c: model(x, t, c, a), 4.5)
        return rl.flow_grpo_loss(lambda x, t: pol(x, t, (cond, uncond)), traj, adv, noise_level=0.7,
                                 t1=float(g[1]), num_train_steps_=n, clip_range=1e-4, kind=kind)

    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(0.5)
    np.testing.assert_allclose(aux["ratio_mean"], 1.0, atol=1e-4)  # recomputed == sampled log-probs
    np.testing.assert_allclose(loss, -adv.mean(), rtol=1e-3)
    assert np.isfinite(grad) and grad != 0
