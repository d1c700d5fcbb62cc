"""Rollout selection (Sol-RL; awm_jax.rl.selection + the preview / regenerate path of awm_jax.rl.collect)."""

import json
import os
import types
from concurrent.futures import Future

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from awm_jax import config_lib, train
from awm_jax.models.mmdit import SD3Config, SD3Transformer2DModel
from awm_jax.rl import selection
from awm_jax.rl import train_step as ts
from awm_jax.rl.collect import prepare, rollout_epoch
from awm_jax.rl.rollout import make_preview_rollout_fn
from awm_jax.timeline import Timeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MCFG = SD3Config(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
SHAPE = (4, 8, 8)


# ----------------------------------------------------------------------------------------- pure logic


def test_select_extremes_ties_and_nan():
    r = np.array([[1.0, 3.0, 3.0, 0.0, 0.0, 2.0]])
    # stable ranking on descending reward: 1, 2 (3.0), 5, 0, 3, 4 (0.0); top: the first, bottom: the last
    # (worst first)
    np.testing.assert_array_equal(selection.select_extremes(r, 2, 2), [[1, 2, 4, 3]])
    np.testing.assert_array_equal(selection.select_extremes(r, 1, 0), [[1]])
    np.testing.assert_array_equal(selection.select_extremes(r, 0, 1), [[4]])
    np.testing.assert_array_equal(selection.select_extremes(np.array([[np.nan, 1.0, 0.5]]), 1, 1), [[1, 0]])
    with pytest.raises(ValueError, match="within the 6 seeds"):
        selection.select_extremes(r, 4, 3)


def test_select_extremes_are_the_extremes():
    rng = np.random.default_rng(0)
    r = rng.integers(0, 5, size=(50, 9)).astype(np.float64)  # many ties
    top, bottom = 3, 2
    cols = selection.select_extremes(r, top, bottom)
    for row, c in zip(r, cols):
        assert len(set(c)) == top + bottom
        rest = np.setdiff1d(np.arange(9), c)
        assert row[c[:top]].min() >= row[rest].max() >= row[rest].min() >= row[c[top:]].max()
        assert list(row[c[:top]]) == sorted(row[c[:top]], reverse=True)
    np.testing.assert_array_equal(cols, selection.select_extremes(r, top, bottom))  # deterministic
    seeds, cols2 = selection.kept_seeds(r.reshape(-1), 50, 9, top, bottom)
    np.testing.assert_array_equal(cols2, cols)
    np.testing.assert_array_equal(seeds, (np.arange(50)[:, None] * 9 + cols).reshape(-1))


def test_config_problems_fpe_and_seed_noise():
    c = config_lib.load_config(os.path.join(ROOT, "configs", "toy.py"))
    assert selection.config_problems(c) == [] and selection.preview_fpe(c) == 0
    c.select.enabled = True  # defaults 12 + 12 != the toy's group of 8
    assert any("must equal 'data.group_size' = 8" in p for p in selection.config_problems(c))
    with pytest.raises(config_lib.ConfigError, match="select.top_k"):
        config_lib.validate(c)
    c.select.top_k, c.select.bottom_k, c.select.num_seeds = 4, 4, 32
    c.select.preview_sampler, c.select.preview_dtype = "sde", "int8"
    probs = selection.config_problems(c)
    assert len(probs) == 2 and "preview_sampler" in probs[0] and "preview_dtype" in probs[1]
    c.select.preview_sampler, c.select.preview_dtype = "dpm2", "bfloat16"
    config_lib.validate(c)
    assert selection.preview_fpe(c) == 16 * 32 * 6  # prompts x seeds x preview steps, no CFG
    a = selection.seed_noise(jax.random.key(0), [3, 7], SHAPE)
    b = selection.seed_noise(jax.random.key(0), [7, 9, 3], SHAPE)
    np.testing.assert_array_equal(a[0], b[2])  # a seed's noise does not depend on its batch
    np.testing.assert_array_equal(a[1], b[0])
    assert not np.allclose(a[0], a[1])
    assert selection.rank_correlation([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert selection.rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


# --------------------------------------------------------------- preview, select, regenerate (tiny model)


def _config():
    c = config_lib.load_config(os.path.join(ROOT, "configs", "toy.py"))
    c.model.dtype = "float32"
    c.lora.rank, c.lora.alpha = 2, 4.0
    c.sample.sampler, c.sample.num_steps, c.sample.noise_level = "dpm2", 3, 0.0
    c.sample.batch_size = 2  # blocks of 16 rows on the 8 test devices: one preview block, one rollout block
    c.data.group_size, c.data.prompts_per_step = 2, 2
    c.select.enabled = True
    c.select.num_seeds, c.select.top_k, c.select.bottom_k = 5, 1, 1
    c.select.preview_steps, c.select.preview_sampler = 2, "ode"
    config_lib.validate(c)
    return c


@pytest.fixture(scope="module")
def selected():
    cfg = _config()
    g, base, state = ts.create_train_state(SD3Transformer2DModel(MCFG, rngs=nnx.Rngs(0)), cfg)
    params = jax.tree.map(lambda a: a + 0.05, state.trainable)  # a policy away from the base
    roll = ts.make_rollout_fn(g, cfg, None, latent_shape=SHAPE)
    prev = make_preview_rollout_fn(g, cfg, None, latent_shape=SHAPE)
    rng = np.random.default_rng(0)
    table = {i: (rng.normal(size=(3, 16)).astype(np.float32), rng.normal(size=(8,)).astype(np.float32))
             for i in range(2)}

    def encode(prompts):
        return (np.stack([table[int(p[1:])][0] for p in prompts]),
                np.stack([table[int(p[1:])][1] for p in prompts]))

    def submit(images, prompts, metadata):
        f = Future()
        f.set_result(np.asarray(images, np.float32))
        return f

    g_size = cfg.data.group_size
    pipeline = types.SimpleNamespace(decode=lambda x0: jnp.mean(x0, axis=(1, 2, 3)), latent_shape=SHAPE)
    comp = types.SimpleNamespace(rollout=roll, preview_rollout=prev, base_state=base, pipeline=pipeline)
    sampler = types.SimpleNamespace(global_indices=lambda step: (np.repeat([0, 1], g_size),
                                                                 np.repeat([0, 1], g_size)))
    dataset = types.SimpleNamespace(take=lambda idx: ([f"p{i}" for i in idx], [{} for _ in idx]))
    embed = types.SimpleNamespace(encode=encode)
    bridge = types.SimpleNamespace(submit=submit)
    key = jax.random.key(3)
    tl, stats = Timeline(), {}
    prepared = prepare(cfg, sampler, dataset, embed, 1)
    batch, rewards, pos = rollout_epoch(comp, cfg, None, params, embed, sampler, dataset, bridge, 1, key, tl,
                                        prepared, stats=stats)
    return dict(cfg=cfg, g=g, base=base, params=params, roll=roll, prev=prev, encode=encode, key=key, tl=tl,
                stats=stats, batch=batch, rewards=rewards, pos=pos)


def test_kept_seeds_are_the_preview_extremes_and_regenerate_bit_identically(selected):
    d = selected
    key, base, params = d["key"], d["base"], d["params"]
    # every candidate previewed directly, in one batch: seed c belongs to prompt c // 5
    seeds = selection.candidate_seeds(2, 5)
    emb, pooled = d["encode"]([f"p{c // 5}" for c in seeds])
    x = selection.seed_noise(selection.seed_key(key), seeds, SHAPE)
    pr = np.asarray(jnp.mean(d["prev"](params, base, emb, pooled, key, x_init=x)["x0"], axis=(1, 2, 3)))
    kept, _ = selection.kept_seeds(pr, 2, 5, 1, 1)
    assert d["stats"]["select/preview_samples"] == 10
    assert d["stats"]["select/preview_reward_mean"] == pytest.approx(float(pr.mean()), abs=1e-5)
    assert d["stats"]["select/preview_fpe"] == 2 * 5 * 2
    # the train batch: those seeds regenerated with the full rollout (dpm2, 3 steps), bit-identical to
    # generating them directly from their seeds' noise
    emb_t, pooled_t = d["encode"](["p0", "p0", "p1", "p1"])
    xk = selection.seed_noise(selection.seed_key(key), kept, SHAPE)
    direct = d["roll"](params, base, emb_t, pooled_t, jax.random.fold_in(key, 0), x_init=xk)["x0"]
    np.testing.assert_array_equal(np.asarray(d["batch"]["x0"]), np.asarray(direct))
    np.testing.assert_allclose(d["rewards"], np.asarray(direct).mean(axis=(1, 2, 3)), rtol=1e-6, atol=1e-6)
    # best first, then worst, per prompt
    r = d["rewards"].reshape(2, 2)
    assert (r[:, 0] > r[:, 1]).all()
    assert d["tl"].lap()["time/preview"] > 0


def test_preview_rollout_rounds_the_weights(selected):
    d = selected
    cfg = d["cfg"].copy_and_resolve_references()
    cfg.select.preview_dtype = "bfloat16"
    prev16 = make_preview_rollout_fn(d["g"], cfg, None, latent_shape=SHAPE)
    emb, pooled = d["encode"](["p0", "p1"])
    x = selection.seed_noise(jax.random.key(0), [0, 1], SHAPE)
    a = np.asarray(d["prev"](d["params"], d["base"], emb, pooled, d["key"], x_init=x)["x0"])
    b = np.asarray(prev16(d["params"], d["base"], emb, pooled, d["key"], x_init=x)["x0"])
    assert np.abs(a - b).max() > 0  # rounded weights change the preview ...
    np.testing.assert_allclose(a, b, atol=0.1)  # ... a little


def test_toy_run_with_selection_trains(tmp_path):
    """``python -m awm_jax.train --config configs/toy.py`` with rollout selection, in-process: 2 tiny steps
    of the real toy world (random init), bf16 previews, on the 8-device test mesh."""
    c = config_lib.load_config(os.path.join(ROOT, "configs", "toy.py"))
    config_lib.apply_overrides(c, [
        ("model.path", ""), ("max_steps", "2"), ("data.group_size", "4"), ("data.prompts_per_step", "2"),
        ("sample.batch_size", "1"), ("sample.num_steps", "3"), ("train.micro_batch_size", "1"),
        ("awm.train_timesteps", "1"), ("eval.every", "0"), ("log.progress", "false"),
        ("checkpoint.async_save", "false"), ("select.enabled", "true"), ("select.num_seeds", "5"),
        ("select.top_k", "2"), ("select.bottom_k", "2"), ("select.preview_steps", "1"),
        ("select.preview_dtype", "bfloat16")])
    config_lib.validate(c)
    train.run(c, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and not r["skipped"] for r in rows)
    assert all(r["select/preview_samples"] == 10 and r["select/preview_fpe"] == 10 for r in rows)
    assert all(r["time/preview"] > 0 for r in rows)
