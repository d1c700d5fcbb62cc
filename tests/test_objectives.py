"""The clean-sample objectives (awm_jax.rl.objectives): values and gradients against hand-written NumPy
derivations, NFT's flow-matching limit, elbo_grpo = elbo_reinforce on the first on-policy step, and one
trainer run per new objective."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from awm_jax import config_lib, train
from awm_jax.models.mmdit import SD3Config, SD3Transformer2DModel
from awm_jax.rl import objectives as obj
from awm_jax.rl import train_step as ts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, B, SHAPE = 2, 3, (2, 2, 2)
D = int(np.prod(SHAPE))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(B, *SHAPE))
    noise = rng.normal(size=(K, B, *SHAPE))
    times = rng.uniform(0.2, 0.9, size=(K, B))
    adv = np.array([0.7, -0.4, 0.1])
    v = rng.normal(size=(K, B, *SHAPE))
    v_old = v + 0.3 * rng.normal(size=v.shape)
    v_ref = rng.normal(size=v.shape)
    return dict(x0=x0, noise=noise, times=times, adv=adv, v=v, v_old=v_old, v_ref=v_ref)


def _batch(d):
    return {k: jnp.asarray(d[k], jnp.float32) for k in ("x0", "noise", "times", "adv")}


def _value_and_grad(fn, d, outputs, **hyper):
    """Loss and d loss / d v of an objective (v is the only differentiated output)."""
    outs = {k: jnp.asarray(d[k], jnp.float32) for k in outputs}

    def f(v):
        return fn({**outs, "v": v}, _batch(d), **hyper)[0]

    val, g = jax.value_and_grad(f)(jnp.asarray(d["v"], jnp.float32))
    return float(val), np.asarray(g, np.float64)


def _bcast(a):  # (K, B) -> (K, B, 1, 1, 1)
    return a.reshape(a.shape + (1,) * len(SHAPE))


def _np_elbo(d, v):
    """Independent NumPy ELBO per (k, b): -(1 - t) / t * mean (v - (eps - x0))^2, and its d/dv."""
    u = d["noise"] - d["x0"][None]
    w = (1 - d["times"]) / d["times"]
    lp = -w * ((v - u) ** 2).reshape(K, B, -1).mean(-1)
    dlp = -_bcast(w) * 2 * (v - u) / D
    return lp, dlp


def test_elbo_reinforce_matches_numpy(data):
    d, beta = data, 0.05
    val, g = _value_and_grad(obj.elbo_reinforce_loss, d, ["v_ref"], beta=beta)
    lp, dlp = _np_elbo(d, d["v"])
    a = d["adv"]
    kl = ((d["v"] - d["v_ref"]) ** 2).reshape(K, B, -1).mean(-1)
    want = -np.mean(a * lp.mean(0)) + beta * kl.mean()
    want_g = -(a[None, :, None, None, None] * dlp) / (B * K) + beta * 2 * (d["v"] - d["v_ref"]) / (K * B * D)
    np.testing.assert_allclose(val, want, rtol=1e-5)
    np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-7)


def test_elbo_grpo_matches_numpy_off_policy(data):
    d, c = data, 0.02
    val, g = _value_and_grad(obj.elbo_grpo_loss, d, ["v_old"], clip_range=c)
    lp, dlp = _np_elbo(d, d["v"])
    lp_old, _ = _np_elbo(d, d["v_old"])
    r = np.exp(lp.mean(0) - lp_old.mean(0))
    a = d["adv"]
    unclipped, clipped = -a * r, -a * np.clip(r, 1 - c, 1 + c)
    assert np.any(np.abs(r - 1) > c) and np.any(np.abs(r - 1) < c)  # both branches exercised
    np.testing.assert_allclose(val, np.mean(np.maximum(unclipped, clipped)), rtol=1e-5)
    # the gradient flows through the unclipped branch where it is the max, else nothing (clip saturated)
    active = (unclipped > clipped) | (np.abs(r - 1) < c)
    coef = np.where(active, -a * r, 0.0) / B
    want_g = coef[None, :, None, None, None] * dlp / K  # d lp_b / d v_kb = dlp_kb / K
    np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-7)


def test_elbo_grpo_on_policy_ratio_one_and_reinforce_gradient(data):
    d = dict(data, v_old=data["v"])
    loss, aux = obj.elbo_grpo_loss({k: jnp.asarray(d[k], jnp.float32) for k in ("v", "v_old")}, _batch(d))
    assert float(aux["ratio_min"]) == 1.0 and float(aux["ratio_max"]) == 1.0
    _, g = _value_and_grad(obj.elbo_grpo_loss, d, ["v_old"])
    _, g_rf = _value_and_grad(obj.elbo_reinforce_loss, d, [])
    np.testing.assert_allclose(g, g_rf, rtol=1e-5, atol=1e-8)
    assert np.abs(g).max() > 1e-3


def _np_nft(d, v, v_old, b, r, scale, adaptive=True):
    """Independent NumPy DiffusionNFT loss and d/dv, in x0 space: e = x_t - t v_imp - x0 = t (u - v_imp)."""
    u = d["noise"] - d["x0"][None]
    t = _bcast(d["times"])
    rr = r[None, :, None, None, None]
    e_pos = t * (u - ((1 - b) * v_old + b * v))
    e_neg = t * (u - ((1 + b) * v_old - b * v))
    w_pos = np.maximum(np.abs(e_pos).reshape(K, B, -1).mean(-1), 1e-5) if adaptive else np.ones((K, B))
    w_neg = np.maximum(np.abs(e_neg).reshape(K, B, -1).mean(-1), 1e-5) if adaptive else np.ones((K, B))
    l_pos = (e_pos ** 2).reshape(K, B, -1).mean(-1) / w_pos
    l_neg = (e_neg ** 2).reshape(K, B, -1).mean(-1) / w_neg
    loss = scale / b * np.mean(r[None] * l_pos + (1 - r[None]) * l_neg)
    grad = scale / (K * B * D) * 2 * t * (-rr * e_pos / _bcast(w_pos) + (1 - rr) * e_neg / _bcast(w_neg))
    return loss, grad


@pytest.mark.parametrize("adaptive", [True, False])
def test_nft_matches_numpy(data, adaptive):
    d, b, amax, scale = data, 0.7, 1.0, 5.0
    val, g = _value_and_grad(obj.nft_loss, d, ["v_old"], nft_beta=b, advantage_max=amax, loss_scale=scale,
                             adaptive_weighting=adaptive)
    r = 0.5 + 0.5 * np.clip(d["adv"] / amax, -1, 1)
    want, want_g = _np_nft(d, d["v"], d["v_old"], b, r, scale, adaptive)
    np.testing.assert_allclose(val, want, rtol=1e-5)
    np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-7)


def test_nft_optimality_probability():
    r = np.asarray(obj.nft_optimality(jnp.array([-2.0, -0.5, 0.0, 0.5, 3.0]), 1.0))
    np.testing.assert_allclose(r, [0.0, 0.25, 0.5, 0.75, 1.0])


def test_nft_reduces_to_flow_matching(data):
    """r = 1 (A = A_max): with v_old = v the gradient is loss_scale x the flow-matching gradient at any beta;
    with v_old != v it tends, as beta -> 0, to the flow-matching gradient at v_old."""
    d = dict(data, adv=np.ones(B))
    u = d["noise"] - d["x0"][None]
    t2 = _bcast(d["times"]) ** 2
    fm_grad = lambda v: 2 * t2 * (v - u) / (K * B * D)  # noqa: E731  d/dv of mean t^2 mean_CHW (v - u)^2
    same = dict(d, v_old=d["v"])
    for b in (1e-3, 0.5):
        _, g = _value_and_grad(obj.nft_loss, same, ["v_old"], nft_beta=b, adaptive_weighting=False)
        np.testing.assert_allclose(g, fm_grad(d["v"]), rtol=1e-4, atol=1e-8)
    _, g = _value_and_grad(obj.nft_loss, d, ["v_old"], nft_beta=1e-4, adaptive_weighting=False)
    np.testing.assert_allclose(g, fm_grad(d["v_old"]), rtol=2e-3, atol=1e-6)
    assert np.abs(fm_grad(d["v"]) - fm_grad(d["v_old"])).max() > 1e-2  # the two limits differ


def test_nft_rejects_nonpositive_beta(data):
    with pytest.raises(ValueError, match="nft.beta"):
        _value_and_grad(obj.nft_loss, data, ["v_old"], nft_beta=0.0)


# ------------------------------------------------------------------------------ through the train step

N = 4
MCFG = SD3Config(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)


def _cfg(name):
    c = config_lib.load_config(os.path.join(ROOT, "configs", f"toy_{name}.py"))
    c.model.dtype = "float32"
    c.lora.rank, c.lora.alpha = 2, 4.0
    c.awm.train_timesteps = 2
    c.sample.num_steps = 4
    c.train.micro_batch_size = N
    return c


@pytest.fixture(scope="module")
def tiny():
    model = SD3Transformer2DModel(MCFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    batch = {"x0": rng.normal(size=(N, 4, 8, 8)), "prompt_embeds": rng.normal(size=(N, 3, 16)),
             "pooled": rng.normal(size=(N, 8)), "advantages": np.array([0.5, -0.5, 1.0, -1.0])}
    return model, {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}


def test_train_step_elbo_grpo_first_step_equals_reinforce(tiny):
    model, batch = tiny
    out = {}
    for name in ("elbo_grpo", "elbo_reinforce"):
        cfg = _cfg(name)
        g, base, state = ts.create_train_state(model, cfg)
        out[name] = ts.make_grad_fn(g, cfg, None)(state, base, batch, jax.random.key(3))
    (g_grpo, a_grpo), (g_rf, _) = out["elbo_grpo"], out["elbo_reinforce"]
    # two separate forward passes (policy, old = kl-EMA copy): 1 up to float32 rounding of the ELBO difference
    assert abs(float(a_grpo["ratio_min"]) - 1.0) < 1e-6 and abs(float(a_grpo["ratio_max"]) - 1.0) < 1e-6
    norm = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_rf))
    assert norm > 0
    for x, y in zip(jax.tree.leaves(g_grpo), jax.tree.leaves(g_rf)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6 * norm)


@pytest.mark.parametrize("name", ["elbo_reinforce", "elbo_grpo"])
def test_train_step_elbo_steps(tiny, name):
    model, batch = tiny
    cfg = _cfg(name)
    g, base, state = ts.create_train_state(model, cfg)
    s1, m = ts.make_train_step(g, cfg, None)(state, base, batch, jax.random.key(0))
    assert bool(m["finite"]) and int(s1.step) == 1 and float(m["grad_norm"]) > 0


def test_train_step_nft_uses_old_policy(tiny):
    model, batch = tiny
    cfg = _cfg("nft")
    g, base, state = ts.create_train_state(model, cfg)
    assert state.kl_ema is not None  # the old policy
    step = ts.make_train_step(g, cfg, None)
    s1, m1 = step(state, base, batch, jax.random.key(0))
    assert bool(m1["finite"]) and float(m1["old_deviate"]) == 0.0  # old = policy at step 0
    s2, m2 = step(s1, base, batch, jax.random.key(1))
    assert bool(m2["finite"]) and float(m2["old_deviate"]) > 0.0  # the old policy now lags
    assert float(m2["kl_ema_decay"]) == pytest.approx(0.002)


def test_toy_config_trains(tmp_path):
    """``python -m awm_jax.train --config configs/toy_nft.py`` in-process: one tiny step of the real toy
    world (random init) on the 8-device test mesh, rollouts from the old policy.  (~45 s on 2 cores, so
    only nft, the objective with the most machinery of its own; elbo_* go through the train step above.)"""
    name = "nft"
    c = config_lib.load_config(os.path.join(ROOT, "configs", f"toy_{name}.py"))
    assert c.algorithm == name
    config_lib.apply_overrides(c, [
        ("model.path", ""), ("max_steps", "1"), ("data.group_size", "4"), ("data.prompts_per_step", "2"),
        ("sample.batch_size", "1"), ("sample.num_steps", "3"), ("train.micro_batch_size", "1"),
        ("awm.train_timesteps", "2"), ("eval.every", "0"), ("log.progress", "false"),
        ("checkpoint.async_save", "false")])
    train.run(c, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1]
    assert all(np.isfinite(r["loss"]) and not r["skipped"] for r in rows)
    assert rows[0]["positive_loss"] > 0 and "old_deviate" in rows[0]


def test_objective_configs():
    """The shipped configs carry the authors' NFT defaults (docs/objectives.md) and the toy ones differ from
    configs/toy.py only in objective keys (same rollouts)."""
    n = config_lib.load_config(os.path.join(ROOT, "configs", "sd35m_geneval_nft.py"))
    assert (n.algorithm, n.nft.beta, n.awm.beta, n.awm.ema_beta) == ("nft", 1.0, 1e-4, 0.0)
    assert (n.sample.guidance_scale, n.sample.num_steps, n.awm.train_timesteps) == (1.0, 10, 9)
    assert n.sample.sampler == "dpm2"  # NVlabs/DiffusionNFT config/nft.py:66
    assert (n.ema.kl_decay_rate, n.ema.kl_decay_max, n.advantages.clip) == (0.001, 0.5, 5.0)
    e = config_lib.load_config(os.path.join(ROOT, "configs", "sd35m_geneval_elbo_exact_grpo.py"))
    assert (e.algorithm, e.awm.weighting, e.awm.clip_range) == ("elbo_exact_grpo", "elbo", 0.2)
    # the old config file is a deprecated alias of the renamed one
    old = config_lib.load_config(os.path.join(ROOT, "configs", "sd35m_geneval_elbo_grpo.py"))
    assert old.to_dict() == e.to_dict()
    base = config_lib.load_config(os.path.join(ROOT, "configs", "toy.py"))
    # configs/toy.py is the README demo (lr 3e-3, strict reward); the comparison sets AWM back to these
    config_lib.apply_overrides(base, [("optim.lr", "1e-3"), ("reward.toy_geneval.strict", "false")])
    base = base.to_dict()
    for name, algo in (("nft", "nft"), ("elbo_exact_reinforce", "elbo_exact_reinforce"),
                       ("elbo_exact_grpo", "elbo_exact_grpo"), ("elbo_reinforce", "elbo_exact_reinforce"),
                       ("elbo_grpo", "elbo_exact_grpo")):
        c = config_lib.load_config(os.path.join(ROOT, "configs", f"toy_{name}.py")).to_dict()
        diff = {f"{k}.{j}" for k in c if isinstance(c[k], dict) for j in c[k] if c[k][j] != base[k][j]}
        diff -= {"sample.sampler"} if name == "nft" else set()  # nft: the authors' DPM2 (same steps)
        assert not any(k.startswith(("sample.", "data.", "optim.")) for k in diff), (name, diff)
        assert c["algorithm"] == algo
