"""The jitted AWM / Flow-GRPO train step, train state and rollouts (awm_jax.rl.train_step), tiny MMDiT."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from awm_jax import config_lib, parallel
from awm_jax.models.lora import LoRAParam
from awm_jax.models.mmdit import SD3Config, SD3Transformer2DModel
from awm_jax.rl import train_step as ts

N = 8  # rollouts per step
MCFG = SD3Config(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32,
                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)


def _config(**over):
    c = config_lib.load_config("configs/toy.py")
    c.model.dtype = "float32"
    c.lora.rank, c.lora.alpha = 2, 4.0
    c.awm.train_timesteps = 2
    c.awm.beta = 0.0
    c.awm.ema_beta = 0.0
    c.optim.lr = 1e-2
    c.sample.num_steps = 4
    c.train.micro_batch_size = N
    for k, v in over.items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        with node.unlocked():
            node[last] = v
    return c


def _model():
    return SD3Transformer2DModel(MCFG, rngs=nnx.Rngs(0))


def _batch(seed=0, adv=None):
    rng = np.random.default_rng(seed)
    return {
        "x0": jnp.asarray(rng.normal(size=(N, 4, 8, 8)), jnp.float32),
        "prompt_embeds": jnp.asarray(rng.normal(size=(N, 3, 16)), jnp.float32),
        "pooled": jnp.asarray(rng.normal(size=(N, 8)), jnp.float32),
        "advantages": jnp.asarray(np.ones(N) if adv is None else adv, jnp.float32),
    }


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _assert_tree_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def setup():
    cfg = _config()
    g, base, state = ts.create_train_state(_model(), cfg)
    return cfg, g, base, state


@pytest.fixture(scope="module")
def step1(setup):
    """One jitted single-device step shared by several tests (it must never re-trace)."""
    cfg, g, _, _ = setup
    return ts.make_train_step(g, cfg, None, max_traces=1)


@pytest.fixture(scope="module")
def ref_grads(setup):
    """Single-device accumulated gradients of one big micro-batch (beta > 0: the reference pass too)."""
    cfg, g, base, state = setup
    cfg = _config(**{"awm.beta": 0.01})
    batch = _batch(adv=np.linspace(-1, 1, N))
    return cfg, batch, ts.make_grad_fn(g, cfg, None)(state, base, batch, jax.random.key(5))


def test_state_is_lora_only_fp32_with_ema_copies(setup):
    cfg, g, base, state = setup
    flat = nnx.to_flat_state(state.trainable)
    names = {p[-1] for p, _ in flat}
    assert names == {"lora_a", "lora_b"}
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state.trainable))
    assert all(np.all(np.asarray(v) == 0) for p, v in flat if p[-1] == "lora_b")
    assert not any("lora" in str(p[-1]) for p, _ in nnx.to_flat_state(base))
    assert state.kl_ema is None  # ema_beta = 0 and on-policy: no kl-EMA adapter
    _assert_tree_close(state.eval_ema, state.trainable, 0, 0)
    cfg2 = _config(**{"awm.ema_beta": 1.0})
    _, _, st2 = ts.create_train_state(_model(), cfg2)
    _assert_tree_close(st2.kl_ema, st2.trainable, 0, 0)
    assert int(state.step) == 0


def test_reference_forward_equals_base_model(setup):
    cfg, g, base, state = setup
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 4, 8, 8)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)
    pooled = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
    t = jnp.asarray([0.3, 0.8])
    want = _model()(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t * 1000)
    lora = jax.tree.map(lambda a: a + 0.5, state.trainable)  # non-zero B: the adapters now matter
    fn = ts.velocity_model(g, cfg)  # the family's velocity over split state
    ref = fn(ts.zero_lora_b(lora), base, x, t, (emb, pooled))
    pol = fn(lora, base, x, t, (emb, pooled))
    np.testing.assert_allclose(np.asarray(ref), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(pol - want))) > 1e-3


def test_awm_steps_improve_logp_no_recompile_and_base_fixed(setup, step1):
    cfg, g, base, state = setup
    base_before = _copy(base)
    lora_before = _copy(state.trainable)
    step = step1
    batch = _batch(adv=np.ones(N))
    st = jax.tree.map(jnp.array, state)
    logps = []
    for _ in range(4):  # same batch and key: the policy must raise the likelihood of positive samples
        st, m = step(st, base, batch, jax.random.key(3))
        assert bool(m["finite"])
        logps.append(float(m["logp_mean"]))
    assert logps[-1] > logps[0] + 1e-4, logps
    assert float(m["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)  # on-policy: ratio exactly 1
    assert int(st.step) == 4
    _assert_tree_close(base, base_before, 0, 0)  # base untouched
    pairs = zip(jax.tree.leaves(st.trainable), jax.tree.leaves(lora_before))
    changed = [not np.allclose(a, b) for a, b in pairs]
    assert any(changed)
    # eval EMA moved towards the policy, but lags it
    d_ema = sum(float(jnp.sum(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(st.eval_ema),
                                                                    jax.tree.leaves(lora_before)))
    d_pol = sum(float(jnp.sum(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(st.trainable),
                                                                    jax.tree.leaves(lora_before)))
    assert 0 < d_ema < d_pol


def test_zero_advantages_only_weight_decay(setup, step1):
    cfg, g, base, state = setup
    lr, wd = float(cfg.optim.lr), float(cfg.optim.weight_decay)
    step = step1
    before = _copy(state.trainable)
    st, m = step(jax.tree.map(jnp.array, state), base, _batch(adv=np.zeros(N)), jax.random.key(0))
    assert float(m["grad_norm"]) == 0.0
    for a, b in zip(jax.tree.leaves(st.trainable), jax.tree.leaves(before)):
        np.testing.assert_allclose(np.asarray(a), b * (1 - lr * wd), rtol=1e-6, atol=1e-9)


def test_nan_skips_update(setup, step1):
    cfg, g, base, state = setup
    step = step1
    before = _copy(state)
    adv = np.ones(N)
    adv[3] = np.nan
    st, m = step(jax.tree.map(jnp.array, state), base, _batch(adv=adv), jax.random.key(0))
    assert not bool(m["finite"])
    assert int(st.step) == 0
    _assert_tree_close(st, before, 0, 0)


def test_accumulation_matches_one_big_batch(setup, ref_grads):
    cfg, g, base, state = setup
    cfg_big, batch, (g1, a1) = ref_grads
    # 2 micro-batches x K = 2 times scanned one by one (train.scan_times) == one folded big batch
    cfg_small = _config(**{"train.micro_batch_size": N // 2, "awm.beta": 0.01, "train.scan_times": True})
    assert ts.micro_batch_size(N, cfg_small, None) == N // 2
    assert ts.micro_batch_size(N, cfg_big, None) == N
    g2, a2 = ts.make_grad_fn(g, cfg_small, None)(state, base, batch, jax.random.key(5))
    _assert_tree_close(g2, g1, rtol=1e-4, atol=1e-7)
    for k in ("loss", "kl", "logp_mean"):
        assert float(a2[k]) == pytest.approx(float(a1[k]), rel=1e-5, abs=1e-6)
    assert float(a1["kl"]) == 0.0  # B = 0 at init: policy == reference
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g1)) > 0


def test_off_policy_uses_kl_ema_and_ratio_is_one_at_init():
    cfg = _config(**{"awm.on_policy": False, "awm.ema_beta": 1.0})
    g, base, state = ts.create_train_state(_model(), cfg)
    batch = _batch(adv=np.linspace(-1, 1, N))
    grads, aux = ts.make_grad_fn(g, cfg, None)(state, base, batch, jax.random.key(1))
    assert float(aux["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)  # kl-EMA == policy at init
    assert float(aux["kl_ema"]) == pytest.approx(0.0, abs=1e-10)
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(grads)) > 0


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1)])
def test_sharded_grads_equal_single_device(setup, ref_grads, shape):
    cfg, g, base, state = setup
    cfg, batch, (ref_g, ref_a) = ref_grads
    mesh = parallel.make_mesh(*shape)
    out_g, out_a = ts.make_grad_fn(g, cfg, mesh)(state, base, batch, jax.random.key(5))
    _assert_tree_close(out_g, ref_g, rtol=1e-4, atol=1e-7)
    for k in ("loss", "kl", "logp_mean"):
        assert float(out_a[k]) == pytest.approx(float(ref_a[k]), rel=1e-5, abs=1e-6)


def test_constrained_activations_grads_equal_single_device(setup, ref_grads):
    """``mesh.constrain_activations`` on a two-axis mesh (fsdp 4 x tensor 2: weights, heads and MLP hidden
    all sharded): the same gradients as one device (the three-axis case is an XLA miscompile, refused)."""
    _, g, base, state = setup
    _, batch, (ref_g, ref_a) = ref_grads  # ref_grads' config (awm.beta 0.01) plus the constraints:
    cfg = _config(**{"awm.beta": 0.01, "mesh.constrain_activations": True})
    out_g, out_a = ts.make_grad_fn(g, cfg, parallel.make_mesh(1, 4, 2))(state, base, batch, jax.random.key(5))
    _assert_tree_close(out_g, ref_g, rtol=1e-4, atol=1e-7)
    assert float(out_a["logp_mean"]) == pytest.approx(float(ref_a["logp_mean"]), rel=1e-5, abs=1e-6)


def test_sharded_train_step_and_rollout_run_on_mesh(setup):
    cfg, g, base, state = setup
    mesh = parallel.make_mesh(2, 2, 2)
    roll = ts.make_rollout_fn(g, cfg, mesh)
    batch = _batch()
    out = roll(state.trainable, base, batch["prompt_embeds"], batch["pooled"], jax.random.key(0))
    assert out["x0"].shape == (N, 4, 8, 8) and bool(jnp.all(jnp.isfinite(out["x0"])))
    batch["x0"] = out["x0"]
    step = ts.make_train_step(g, cfg, mesh, max_traces=1)
    st = jax.tree.map(jnp.array, state)
    for i in range(2):
        st, m = step(st, base, batch, jax.random.key(i))
        assert bool(m["finite"])
    assert int(st.step) == 2
    leaf = jax.tree.leaves(st.trainable)[0]
    assert leaf.sharding.mesh.shape == mesh.shape


def test_flow_grpo_step_ratio_is_one_on_policy():
    cfg = config_lib.load_config("configs/toy_flow_grpo.py")
    cfg.model.dtype = "float32"
    cfg.lora.rank, cfg.lora.alpha = 2, 4.0
    cfg.sample.num_steps = 3
    cfg.train.micro_batch_size = N
    cfg.flow_grpo.beta = 0.04
    g, base, state = ts.create_train_state(_model(), cfg)
    assert state.kl_ema is None
    state = state.replace(trainable=jax.tree.map(lambda a: a + 0.01, state.trainable))  # KL to ref > 0
    batch = _batch(adv=np.linspace(-1, 1, N))
    traj = ts.make_rollout_fn(g, cfg, None)(state.trainable, base, batch["prompt_embeds"], batch["pooled"],
                                            jax.random.key(2))
    assert traj["latents"].shape == (N, 4, 4, 8, 8) and traj["log_probs"].shape == (N, 3)
    batch.update({k: traj[k] for k in ("latents", "log_probs", "timesteps", "next_timesteps")})
    del batch["x0"]
    st, m = ts.make_train_step(g, cfg, None)(state, base, batch, jax.random.key(0))
    assert bool(m["finite"]) and int(st.step) == 1
    assert float(m["ratio_mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(m["kl"]) > 0


def test_full_finetune_trains_all_params_and_keeps_reference():
    cfg = _config(**{"lora.full_finetune": True, "awm.beta": 0.01})
    g, base, state = ts.create_train_state(_model(), cfg)
    n_all = sum(x.size for x in jax.tree.leaves(nnx.state(_model(), nnx.Param)))
    assert sum(x.size for x in jax.tree.leaves(state.trainable)) == n_all
    base_before = _copy(base)
    batch = _batch(adv=np.linspace(-1, 1, N))
    st, m = ts.make_train_step(g, cfg, None)(state, base, batch, jax.random.key(0))
    assert bool(m["finite"])
    _assert_tree_close(base, base_before, 0, 0)
    pairs = zip(jax.tree.leaves(st.trainable), jax.tree.leaves(base))
    diff = [float(jnp.max(jnp.abs(a - b))) for a, b in pairs]
    assert max(diff) > 0


def test_bad_inputs_raise(setup):
    cfg, g, base, state = setup
    step = ts.make_train_step(g, cfg, None)
    batch = _batch()
    del batch["x0"]
    with pytest.raises(KeyError, match="x0"):
        step(state, base, batch, jax.random.key(0))
    bad = copy.deepcopy(cfg)
    bad.algorithm = "ppo"
    with pytest.raises(ValueError, match="algorithm"):
        ts.make_train_step(g, bad, None)
    with pytest.raises(ValueError, match="batch shards"):
        ts.micro_batch_size(6, cfg, parallel.make_mesh(8, 1, 1))
    assert isinstance(jax.tree.leaves(nnx.state(_model(), LoRAParam)), list)


def _moved_state(config_file: str, **over):
    """``(cfg, graphdef, base, state)`` of ``config_file`` at the tiny sizes, fp32, lr 1e-2, with the LoRA
    state moved off its initial value (so it differs from the kl-EMA / rollout policy)."""
    cfg = config_lib.load_config(config_file)
    cfg.model.dtype = "float32"
    cfg.lora.rank, cfg.lora.alpha = 2, 4.0
    cfg.train.micro_batch_size = N
    cfg.optim.lr = 1e-2
    for k, v in over.items():
        section, key = k.split(".")
        cfg[section][key] = v
    g, base, state = ts.create_train_state(_model(), cfg)
    return cfg, g, base, state.replace(trainable=jax.tree.map(lambda a: a + 0.01, state.trainable))


def test_flow_grpo_second_step_of_an_epoch_is_off_policy():
    """train.steps_per_epoch = 2: the second part's old log-probs are the rollout's, so after the first
    optimizer step its ratio moves away from 1 and the 1e-4 clip binds (first part: ratio exactly 1)."""
    from awm_jax import train

    cfg, g, base, state = _moved_state("configs/toy_flow_grpo.py", **{"sample.num_steps": 3})
    batch = _batch(adv=np.linspace(-1, 1, N))
    traj = ts.make_rollout_fn(g, cfg, None)(state.trainable, base, batch["prompt_embeds"], batch["pooled"],
                                            jax.random.key(2))
    batch.update({k: traj[k] for k in ("latents", "log_probs", "timesteps", "next_timesteps")})
    del batch["x0"]
    step = ts.make_train_step(g, cfg, None)
    p1, p2 = train.epoch_parts(batch, 2, jax.random.key(3))
    state, m1 = step(state, base, p1, jax.random.key(0))
    state, m2 = step(state, base, p2, jax.random.key(1))
    assert float(m1["ratio_mean"]) == pytest.approx(1.0, abs=1e-5) and float(m1["clip_frac"]) == 0.0
    assert float(m2["clip_frac"]) > 0.0  # ratios outside [1 - 1e-4, 1 + 1e-4]: the clip binds


def test_drift_stats_against_numpy():
    """lora_norm / lora_b_norm (one jitted reduction) and the advantage statistics, re-derived in NumPy."""
    from awm_jax.rl.epoch import drift_stats

    rng = np.random.default_rng(0)
    tree = {"blk": {"lora_a": rng.normal(size=(3, 2)), "lora_b": rng.normal(size=(2, 4))},
            "out": {"lora_a": rng.normal(size=(5, 2)), "lora_b": rng.normal(size=(2, 1))}}
    state = ts.TrainState(step=jnp.zeros((), jnp.int32), trainable=jax.tree.map(jnp.asarray, tree),
                          opt_state=None)
    adv = np.array([0.5, -1.0, 0.0, 2.0, 0.0])
    d = drift_stats(state, adv)
    leaves = [v for blk in tree.values() for v in blk.values()]
    b = [blk["lora_b"] for blk in tree.values()]
    assert d["lora_norm"] == pytest.approx(np.sqrt(sum((x ** 2).sum() for x in leaves)), rel=1e-6)
    assert d["lora_b_norm"] == pytest.approx(np.sqrt(sum((x ** 2).sum() for x in b)), rel=1e-6)
    assert (d["adv_abs_mean"], d["adv_pos_frac"], d["adv_zero_frac"]) == pytest.approx((0.7, 0.4, 0.4))


def test_old_policy_fixed_within_an_epoch():
    """elbo_grpo with train.steps_per_epoch = 2: the old policy (kl-EMA adapter, which sampled the epoch's
    rollouts) is the same for both parts and moves once, after the last, with the decay of epoch 3 applied to
    the twice-updated adapter (re-derived: kl <- d kl + (1 - d) theta, d = min(rate x epoch, max))."""
    from awm_jax.rl import ema as ema_lib
    from awm_jax.rl.epoch import epoch_parts

    cfg, g, base, state = _moved_state("configs/toy_elbo_grpo.py", **{"awm.train_timesteps": 2})
    kl0 = _copy(state.kl_ema)
    step = ts.make_train_step(g, cfg, None)
    p1, p2 = epoch_parts(_batch(adv=np.linspace(-1, 1, N)), 2, jax.random.key(3), epoch=3)
    assert not bool(p1["epoch_end"]) and bool(p2["epoch_end"]) and int(p2["epoch"]) == 3
    state, m1 = step(state, base, p1, jax.random.key(0))
    _assert_tree_close(_copy(state.kl_ema), kl0, rtol=0, atol=0)  # unchanged after the first part
    assert float(m1["ratio_mean"]) != pytest.approx(1.0, abs=1e-7)  # old policy != the trained adapter
    state, _ = step(state, base, p2, jax.random.key(1))
    d = min(float(cfg.ema.kl_decay_rate) * 3, float(cfg.ema.kl_decay_max))
    want = jax.tree.map(lambda k, p: d * k + (1 - d) * np.asarray(p), kl0, _copy(state.trainable))
    _assert_tree_close(_copy(state.kl_ema), want, rtol=1e-5, atol=1e-7)
    assert int(state.step) == 2 and d == pytest.approx(ema_lib.kl_ema_decay(3, cfg.ema.kl_decay_rate,
                                                                             cfg.ema.kl_decay_max))
