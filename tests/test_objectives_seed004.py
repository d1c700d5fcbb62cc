"""Seed 004's ELBO policy gradients (awm_jax.rl.elbo_pg) and RAM (awm_jax.rl.ram) against NumPy
re-derivations of the authors' formulas (jaemoo-choi/rethinking-diffusion-rl at c2570002:
src/utils/__init__.py compute_elbo, src/utils/base.py compute_policy_loss / compute_kl_loss / the "ram"
branch; docs/objectives.md):
values and gradients, the adaptive weight, the training-time permutation, the exact advantage, the old-policy
decay, the deprecated names, and the configs through the train step and ``awm_jax.train``."""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from awm_jax import config_lib, train
from awm_jax.models.mmdit import SD3Config, SD3Transformer2DModel
from awm_jax.rl import advantages as adv_lib
from awm_jax.rl import ema as ema_lib
from awm_jax.rl import registry
from awm_jax.rl import train_step as ts
from awm_jax.rl.elbo_pg import elbo_likelihood, elbo_pg_loss
from awm_jax.rl.policy import algorithm
from awm_jax.rl.ram import ram_loss
from awm_jax.rl.timesteps import sample_train_timesteps
from awm_jax.sampling.schedules import shifted_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, B, SHAPE = 3, 4, (2, 2, 2)
D = int(np.prod(SHAPE))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(B, *SHAPE))
    noise = rng.normal(size=(K, B, *SHAPE))
    times = rng.uniform(0.1, 1.0, size=(K, B))
    adv = np.array([0.9, -0.6, 0.2, -7.0])  # the last one beyond the GRPO clamp of 5
    u = noise - x0[None]
    v = u + 0.5 * rng.normal(size=u.shape)  # near the target: ELBOs O(1), ratios near 1
    v_old = v + 0.05 * rng.normal(size=v.shape)
    v_old[:, 0] = v[:, 0] + 1e-4 * rng.normal(size=v[:, 0].shape)  # sample 0 inside the GRPO clip range
    v_ref = v + 0.3 * rng.normal(size=v.shape)
    return dict(x0=x0, noise=noise, times=times, adv=adv, v=v, v_old=v_old, v_ref=v_ref)


def _batch(d):
    return {k: jnp.asarray(d[k], jnp.float32) for k in ("x0", "noise", "times", "adv")}


def _value_and_grad(fn, d, **hyper):
    outs = {k: jnp.asarray(d[k], jnp.float32) for k in ("v_old", "v_ref")}

    def f(v):
        return fn({**outs, "v": v}, _batch(d), **hyper)[0]

    val, g = jax.value_and_grad(f)(jnp.asarray(d["v"], jnp.float32))
    return float(val), np.asarray(g, np.float64)


def _b(a):  # (K, B) -> (K, B, 1, 1, 1)
    return a.reshape(a.shape + (1,) * len(SHAPE))


def _np_elbo(d, v, kind="adaptive", w_fixed=None):
    """The authors' compute_elbo in float64 and its d/dv with the adaptive weight held constant."""
    x0, eps, t = d["x0"][None], d["noise"], _b(d["times"])
    if kind in ("adaptive", "t"):
        err = (1 - t) * x0 + t * eps - t * v - x0
        sq = (err ** 2).reshape(K, B, -1).mean(-1)
        w = np.ones((K, B))
        if kind == "adaptive":
            w = np.maximum(np.abs(err).reshape(K, B, -1).mean(-1), 1e-5) if w_fixed is None else w_fixed
        return -sq / w, 2 * t * err / (D * _b(w)), w
    wt = (1 - t) / (t + 1e-3) if kind == "exact" else np.ones_like(t)
    r = eps - x0 - v
    return -(wt * r ** 2).reshape(K, B, -1).mean(-1), 2 * wt * r / D, None


def _np_policy(method, e, de, e_old, a):
    """Loss and d/dv of compute_policy_loss (means over (K, B)), NumPy."""
    a = np.broadcast_to(a[None], e.shape)
    lr = e - e_old
    r = np.exp(lr) if not method.endswith("noratio") else np.ones_like(e)
    n = e.size
    if method.startswith("epg") and method != "epg_grpo":
        return -np.mean(r * a * e), -_b(r * a) * de / n
    if method.startswith("pepg"):
        return -np.mean(r * (a - lr) * e), -_b(r * (a - lr)) * de / n
    if method.startswith("par"):
        return 0.5 * np.mean(r * (a - lr) ** 2), -_b(r * (a - lr)) * de / n
    c = 1e-3
    ac, ratio = np.clip(a, -5, 5), np.exp(lr)
    unclipped, clipped = -ac * ratio, -ac * np.clip(ratio, 1 - c, 1 + c)
    active = (unclipped > clipped) | (np.abs(ratio - 1) < c)
    return np.mean(np.maximum(unclipped, clipped)), _b(np.where(active, -ac * ratio, 0.0)) * de / n


METHODS = ("epg", "pepg", "par", "epg_noratio", "pepg_noratio", "par_noratio", "epg_grpo")


@pytest.mark.parametrize("method", METHODS)
def test_elbo_pg_loss_and_gradient_match_numpy(data, method):
    d, beta = data, 0.05  # a visible girsanov KL: beta mean_{k,b} mean_CHW (v - v_ref)^2
    val, g = _value_and_grad(elbo_pg_loss, d, method=method, beta=beta)
    e, de, _ = _np_elbo(d, d["v"])
    e_old, _, _ = _np_elbo(d, d["v_old"])
    want, want_g = _np_policy(method, e, de, e_old, d["adv"])
    want += beta * np.mean((d["v"] - d["v_ref"]) ** 2)
    want_g = want_g + beta * 2 * (d["v"] - d["v_ref"]) / (K * B * D)
    np.testing.assert_allclose(val, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(g, want_g, rtol=2e-4, atol=2e-7)
    assert np.abs(g).max() > 1e-3
    if method == "epg_grpo":  # both PPO branches exercised, and the clamp of A = -7
        r = np.exp(e - e_old)
        assert np.any(np.abs(r - 1) > 1e-3) and np.any(np.abs(r - 1) < 1e-3)


def test_pepg_gradient_against_finite_differences(data):
    """The hand-derived NumPy gradient itself checked by central differences of the NumPy loss (adaptive
    weight and stop-gradient factors held at the base point, as the authors' code differentiates)."""
    d = data
    e0, _, w0 = _np_elbo(d, d["v"])
    e_old, _, _ = _np_elbo(d, d["v_old"])
    a = np.broadcast_to(d["adv"][None], e0.shape)
    coef = np.exp(e0 - e_old) * (a - (e0 - e_old))  # sg(r (A - lr))

    def loss(v):
        return -np.mean(coef * _np_elbo(d, v, w_fixed=w0)[0])

    _, g = _value_and_grad(elbo_pg_loss, d, method="pepg")
    rng = np.random.default_rng(3)
    for _ in range(6):
        idx = tuple(rng.integers(0, s) for s in d["v"].shape)
        h = np.zeros_like(d["v"])
        h[idx] = 1e-5
        fd = (loss(d["v"] + h) - loss(d["v"] - h)) / 2e-5
        assert fd == pytest.approx(g[idx], rel=2e-3, abs=1e-8)


@pytest.mark.parametrize("kind", ["adaptive", "exact", "uniform", "t"])
def test_elbo_likelihoods(data, kind):
    d = data
    got = np.asarray(elbo_likelihood(jnp.asarray(d["v"], jnp.float32), _batch(d), kind))
    np.testing.assert_allclose(got, _np_elbo(d, d["v"], kind)[0], rtol=1e-5, atol=1e-7)


def test_adaptive_weight_is_self_normalised_and_floored(data):
    """adaptive ELBO = -t^2 mse(v, u) / (t mean|v - u|); at v = u the floor 1e-5 keeps it finite (0)."""
    d = data
    u = d["noise"] - d["x0"][None]
    t = d["times"]
    mse = ((d["v"] - u) ** 2).reshape(K, B, -1).mean(-1)
    mae = np.abs(d["v"] - u).reshape(K, B, -1).mean(-1)
    got = np.asarray(elbo_likelihood(jnp.asarray(d["v"], jnp.float32), _batch(d)))
    np.testing.assert_allclose(got, -t * mse / mae, rtol=1e-5)
    g = jax.grad(lambda v: jnp.sum(elbo_likelihood(v, _batch(d))))(jnp.asarray(u, jnp.float32))
    assert np.all(np.isfinite(np.asarray(g)))
    assert float(jnp.max(jnp.abs(elbo_likelihood(jnp.asarray(u, jnp.float32), _batch(d))))) < 1e-4


def test_ram_matches_numpy_and_a0_regresses_onto_ref(data):
    d, rho = data, 100.0
    u = d["noise"] - d["x0"][None]
    target = d["v_ref"] + rho * d["adv"][None, :, None, None, None] * (u - d["v_old"])
    val, g = _value_and_grad(ram_loss, d, rho=rho)
    np.testing.assert_allclose(val, np.mean((d["v"] - target) ** 2), rtol=1e-5)
    np.testing.assert_allclose(g, 2 * (d["v"] - target) / (K * B * D), rtol=1e-4, atol=1e-6)
    z = dict(d, adv=np.zeros(B))
    val0, g0 = _value_and_grad(ram_loss, z, rho=rho)
    np.testing.assert_allclose(val0, np.mean((d["v"] - d["v_ref"]) ** 2), rtol=1e-5)
    np.testing.assert_allclose(g0, 2 * (d["v"] - d["v_ref"]) / (K * B * D), rtol=1e-4, atol=1e-7)
    z_old = dict(z, v_old=d["v_old"] + 3.0)  # with A = 0 the old policy does not enter
    np.testing.assert_allclose(_value_and_grad(ram_loss, z_old, rho=rho)[1], g0, rtol=1e-6)


def test_permutation_times():
    """Per sample a random permutation of the S grid times (grid without its final 0), the first
    int(S * fraction): distinct, from the grid, orders differing between samples; count enforced."""
    grid = shifted_grid(10, 3.0)
    n = 64
    t = np.asarray(sample_train_timesteps(jax.random.key(0), "permutation", 9, n, grid=grid,
                                          timestep_fraction=0.99))
    assert t.shape == (9, n)
    pts = grid[:10].astype(np.float32)
    assert np.all(np.isin(t, pts)) and 1.0 in t
    assert all(len(np.unique(t[:, b])) == 9 for b in range(n))
    assert len({tuple(t[:, b]) for b in range(n)}) == n  # per-sample orders
    left_out = [pts[~np.isin(pts, t[:, b])][0] for b in range(n)]
    assert len(set(left_out)) == 10  # every grid time is the one left out for some sample
    step = np.asarray(sample_train_timesteps(jax.random.key(1), "permutation", 9, 5, grid=grid,
                                             timestep_fraction=0.99, draw="step"))
    assert np.all(step == step[:, :1])
    with pytest.raises(ValueError, match=r"int\(10 \* 0.99\) = 9"):
        sample_train_timesteps(jax.random.key(0), "permutation", 6, 4, grid=grid, timestep_fraction=0.99)


def _cfg(name):
    return config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py"))


def test_exact_advantage_and_no_clip():
    r = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    g = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    want = 0.1 * (r - np.array([0.5] * 4 + [0.5] * 4))
    np.testing.assert_allclose(adv_lib.exact_advantages(r, g, 0.1), want)
    c = _cfg("toy_pepg")
    np.testing.assert_allclose(adv_lib.step_advantages(r * 100, g, c), want * 100, rtol=1e-6)  # no clip
    c.algorithm = "epg_grpo"
    c.advantages.mode = "standard"  # grpo: std-normalised, clamped inside the loss only
    a = adv_lib.step_advantages(r * 100, g, c)
    np.testing.assert_allclose(a, (100 * r - 50) / (50 + 1e-4), rtol=1e-5)
    awm = _cfg("toy")  # AWM keeps its clip / advantage_max
    assert np.abs(adv_lib.step_advantages(r, g, awm)).max() <= float(awm.awm.advantage_max)


def test_old_policy_decay_is_the_authors_decay_type_1():
    """src/utils/__init__.py return_decay(step, 1) = min(0.001 step, 0.5), applied after each epoch with the
    optimizer steps completed: old <- d old + (1 - d) theta."""
    c = _cfg("toy_pepg")
    rate, cap = float(c.ema.kl_decay_rate), float(c.ema.kl_decay_max)
    for step in (0, 1, 2, 250, 499, 500, 501, 1000):
        want = min(step * 0.001, 0.5)
        assert float(ema_lib.kl_ema_decay(step, rate, cap)) == pytest.approx(want, abs=1e-7)
    old, theta = {"a": jnp.ones(3)}, {"a": jnp.zeros(3)}
    np.testing.assert_allclose(np.asarray(ema_lib.kl_ema_update(old, theta, 300, rate, cap)["a"]), 0.3,
                               rtol=1e-6)


def test_registry_and_deprecated_names():
    assert registry.get("pepg").rolls_out_with_old and not registry.get("pepg").clip_advantages
    assert registry.get("ram").needs_ref and registry.get("ram").needs_old
    c = _cfg("toy_elbo_grpo")
    c.algorithm = "elbo_grpo"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert algorithm(c) == "elbo_exact_grpo"
    assert any(issubclass(x.category, DeprecationWarning) and "elbo_exact_grpo" in str(x.message) for x in w)
    with pytest.raises(ValueError, match="config key algorithm"):
        registry.canonical("pepgg")


def test_shipped_configs():
    g = _cfg("sd35m_geneval_pepg")
    assert (g.algorithm, g.elbo.likelihood, g.advantages.mode, g.advantages.exact_scale) == (
        "pepg", "adaptive", "exact", 0.1)
    assert (g.awm.beta, g.awm.ema_beta, g.optim.max_grad_norm, g.optim.lr) == (1e-4, 0.0, 5.0, 3e-4)
    assert (g.ema.kl_decay_rate, g.ema.kl_decay_max, g.train.steps_per_epoch) == (0.001, 0.5, 1)
    assert (g.sample.num_steps, g.awm.train_timesteps, g.awm.timestep_sampler) == (10, 9, "permutation")
    assert (g.sample.sampler, g.sample.noise_level) == ("dpm2", 0.0)
    assert (g.data.prompts_per_step, g.data.group_size, g.max_steps) == (48, 24, 360)
    assert g.sample.guidance_scale == 1.0 and g.eval.num_steps == 40
    assert (g.lora.rank, g.lora.alpha) == (32, 64.0)
    for task in ("ocr", "pickscore"):
        c = _cfg(f"sd35m_{task}_pepg")
        assert c.reward.name == task and c.algorithm == "pepg" and c.data.prompts_per_step == 48
    r = _cfg("sd35m_geneval_ram")
    assert (r.algorithm, r.ram.rho, r.awm.beta, r.advantages.mode) == ("ram", 100.0, 0.0, "standard")


# ------------------------------------------------------------------------------ through the train step

N = 4
MCFG = SD3Config(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)


@pytest.fixture(scope="module")
def tiny():
    model = SD3Transformer2DModel(MCFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    batch = {"x0": rng.normal(size=(N, 4, 8, 8)), "prompt_embeds": rng.normal(size=(N, 3, 16)),
             "pooled": rng.normal(size=(N, 8)), "advantages": np.array([0.5, -0.5, 1.0, -1.0])}
    return model, {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}


def _tiny_cfg(name):
    c = _cfg(name)
    c.model.dtype = "float32"
    c.lora.rank, c.lora.alpha = 2, 4.0
    c.sample.num_steps, c.awm.train_timesteps = 4, 3  # int(4 * 0.99) = 3 permuted grid times
    c.train.micro_batch_size = N
    return c


def test_train_step_pepg_equals_epg_on_policy_and_ram_steps(tiny):
    """At the first step the old policy (kl-EMA copy) equals the policy: r = 1, lr = 0, so PEPG's gradient is
    EPG's; a RAM step is finite and moves the adapters and the old policy (PEPG's steps: the next test)."""
    model, batch = tiny
    grads = {}
    for name in ("pepg", "epg"):
        c = _tiny_cfg("toy_pepg")
        c.algorithm = name
        g, base, state = ts.create_train_state(model, c)
        grads[name] = ts.make_grad_fn(g, c, None)(state, base, batch, jax.random.key(3))
    (gp, ap), (ge, _) = grads["pepg"], grads["epg"]
    assert abs(float(ap["ratio_min"]) - 1) < 1e-5 and abs(float(ap["ratio_max"]) - 1) < 1e-5
    norm = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(ge))
    assert norm > 0
    for x, y in zip(jax.tree.leaves(gp), jax.tree.leaves(ge)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5 * norm)
    c = _tiny_cfg("toy_ram")
    g, base, state = ts.create_train_state(model, c)
    before = [np.asarray(x) for x in jax.tree.leaves(state.trainable)]
    s1, m1 = ts.make_train_step(g, c, None)(state, base, batch, jax.random.key(0))
    assert bool(m1["finite"]) and float(m1["grad_norm"]) > 0 and float(m1["old_deviate"]) == 0.0
    after = [np.asarray(x) for x in jax.tree.leaves(s1.trainable)]
    assert max(np.abs(a - b).max() for a, b in zip(after, before)) > 0
    old = [np.asarray(x) for x in jax.tree.leaves(s1.kl_ema)]  # old <- 0.001 old + 0.999 theta
    for o, a, b in zip(old, after, before):
        np.testing.assert_allclose(o, 0.001 * b + 0.999 * a, rtol=1e-5, atol=1e-7)


def test_toy_pepg_config_trains(tmp_path):
    """``python -m awm_jax.train --config configs/toy_pepg.py`` in-process: two tiny epochs of the real toy
    world (the shipped toy checkpoint: rewards differ within a prompt) on the 8-device test mesh, rollouts
    from the old policy; finite loss, advantages non-zero, LoRA moved."""
    c = _cfg("toy_pepg")
    config_lib.apply_overrides(c, [
        ("max_steps", "2"), ("data.group_size", "4"), ("data.prompts_per_step", "2"),
        ("sample.batch_size", "1"), ("sample.num_steps", "3"), ("train.micro_batch_size", "1"),
        ("awm.train_timesteps", "2"), ("eval.every", "0"), ("log.progress", "false"),
        ("checkpoint.async_save", "false")])
    train.run(c, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and not r["skipped"] for r in rows)
    assert rows[0]["adv_abs_mean"] > 0 and rows[-1]["lora_b_norm"] > 0 and "ratio_mean" in rows[0]
