"""Toy pipeline contract, checkpoint round trip and the pretraining smoke run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy_tiny import tiny_toy_config

from awm_jax.toy import evaluate, pretrain, shapes, world


def test_toy_vae_is_exact_and_unit_scale():
    imgs, _ = shapes.sample_batch(np.random.default_rng(0), shapes.prompt_split("train"), 256)
    z = world.encode_images(imgs)
    assert z.shape == (256, 48, 8, 8)
    assert abs(float(z.mean())) < 0.1 and 0.85 < float(z.std()) < 1.15
    assert np.array_equal(np.asarray(jax.jit(world.decode)(z)), imgs)
    # channel c of latent pixel (i, j) is image pixel (4 i + dy, 4 j + dx, rgb)
    z = np.asarray(z)
    dy, dx, c = 2, 3, 1
    want = (imgs[5, 4 * 1 + dy, 4 * 6 + dx, c] / 255.0 - world.LATENT_SHIFT) / world.LATENT_SCALE
    assert np.isclose(z[5, (dy * 4 + dx) * 3 + c, 1, 6], want, atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny toy model pretrained for 12 steps (the pretraining smoke run), shared by the tests."""
    out = tmp_path_factory.mktemp("toy") / "ck"
    res = pretrain.pretrain(
        str(out), steps=12, batch=8, lr=3e-3, warmup=1, config=tiny_toy_config(), eval_per_tag=0, log_every=4
    )
    return out, res


def test_pretrain_smoke(trained):
    out, res = trained
    losses = res["losses"]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.85 * losses[0]  # it learns
    assert {"config.json", "model.safetensors", "eval.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "eval.json").read_text())["steps"] == 12


def test_default_random_pipeline():
    pipe = world.load_toy_pipeline(None, seed=0)
    assert pipe.latent_shape == (48, 8, 8) and pipe.config == world.default_config()
    emb, pooled = pipe.text_encoder.encode(["a photo of a red circle", "a photo of two squares"])
    assert emb.dtype == np.float32 and emb.shape == (2, 12, pipe.config["transformer"]["joint_attention_dim"])
    assert pooled.shape == (2, pipe.config["transformer"]["pooled_projection_dim"])
    assert pipe.transformer.config.num_layers == 4 and pipe.transformer.config.dual_attention_layers == (0,)


def test_pipeline_contract_and_eval(trained):
    pipe = world.load_toy_pipeline(trained[0])
    c, h, w = pipe.latent_shape
    assert (c, h, w) == (48, 8, 8)
    emb, pooled = pipe.text_encoder.encode(["a photo of a red circle", "a photo of two squares"])
    assert emb.dtype == np.float32 and emb.shape == (2, 12, 16) and pooled.shape == (2, 12)
    x = jax.random.normal(jax.random.key(0), (2, c, h, w))
    v = pipe.transformer(
        hidden_states=x,
        encoder_hidden_states=emb,
        pooled_projections=pooled,
        timestep=jnp.array([500.0, 10.0]),
    )
    assert v.shape == (2, c, h, w) and bool(jnp.all(jnp.isfinite(v)))
    imgs = jax.jit(pipe.decode)(x)
    assert imgs.dtype == jnp.uint8 and imgs.shape == (2, 32, 32, 3)
    ev = evaluate.evaluate_pipeline(pipe, "heldout", per_prompt=1, steps=2, batch=16)
    acc = ev["accuracy"]
    assert set(acc) == set(shapes.TAGS) | {"overall"} and all(0.0 <= v <= 1.0 for v in acc.values())
    assert ev["n_images"] == len(shapes.prompt_split("heldout"))
    imgs = evaluate.generate(pipe, ["a photo of a circle"] * 3, seed=1, steps=2, batch=16)
    assert imgs.shape == (3, 32, 32, 3) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(
        imgs, evaluate.generate(pipe, ["a photo of a circle"] * 3, seed=1, steps=2, batch=16)
    )
    assert not np.array_equal(
        imgs, evaluate.generate(pipe, ["a photo of a circle"] * 3, seed=2, steps=2, batch=16)
    )


def test_renoise_accuracy(trained):
    pipe = world.load_toy_pipeline(trained[0])
    # from t = 0 the scenes are untouched (a zero-length grid): decode(encode(render)) is exact, all correct
    assert evaluate.renoise_accuracy(pipe, 0.0, "heldout@2", steps=2) == 1.0
    assert 0.0 <= evaluate.renoise_accuracy(pipe, 1.0, "heldout@2", steps=2) <= 1.0


def test_checkpoint_round_trip_and_errors(trained, tmp_path):
    pipe = world.load_toy_pipeline(trained[0])
    world.save_toy_checkpoint(
        tmp_path / "ck", pipe.transformer, pipe.text_model, pipe.config, dtype=np.float32
    )
    again = world.load_toy_pipeline(tmp_path / "ck", seed=9)
    for mod_a, mod_b in ((pipe.transformer, again.transformer), (pipe.text_model, again.text_model)):
        la, lb = jax.tree.leaves(nnx.state(mod_a, nnx.Param)), jax.tree.leaves(nnx.state(mod_b, nnx.Param))
        assert len(la) == len(lb)
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(FileNotFoundError, match="config.json"):
        world.load_toy_pipeline(tmp_path / "nope")
    # a checkpoint from another config -> error naming the file and the parameter
    cfg2 = tiny_toy_config()
    cfg2["transformer"]["num_layers"] = 3
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg2))
    with pytest.raises(KeyError, match="model.safetensors.*missing parameter"):
        world.load_toy_pipeline(tmp_path / "ck")
    cfg3 = tiny_toy_config()
    cfg3["text"]["dim"] = 8
    cfg3["transformer"]["joint_attention_dim"] = 8
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg3))
    with pytest.raises(ValueError, match="has shape"):
        world.load_toy_pipeline(tmp_path / "ck")
