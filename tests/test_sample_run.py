"""``python -m awm_jax.sample --run / --lora`` and converted Flax folders: the images equal the base model
with the LoRA merged by hand, --which / --step pick their item, errors name the workdir, step, item or
folder."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from awm_jax import config_lib, sample
from awm_jax.checkpoint import Checkpointer
from awm_jax.convert import to_flax
from awm_jax.export import export_peft_lora
from awm_jax.models.family import get_family
from awm_jax.models.lora import LoRAParam
from awm_jax.rl import train_step as ts
from awm_jax.train import checkpoint_items
from tests.tiny_pipeline import build_tiny_sd3_pipeline

PROMPTS = ["a red cat", "two blue dogs"]
STEPS = 2


def _key(path):
    return ".".join(str(getattr(p, "key", p)) for p in path)


def _noisy(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.3, x.shape).astype(np.float32), tree)


def _config(pipe, eval_ema=True, full=False):
    cfg = config_lib.load_config("configs/sd35m_geneval.py")
    cfg.model.path = str(pipe)
    cfg.model.resolution, cfg.model.max_sequence_length, cfg.model.dtype = 16, 16, "float32"
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    cfg.lora.full_finetune = full
    cfg.ema.eval_ema = eval_ema
    return cfg


def _save_run(wd, cfg, states):
    config_lib.save_config(cfg, str(wd))
    ck = Checkpointer(str(wd / "checkpoints"), async_save=False)
    for step, state in states.items():
        ck.save(step, checkpoint_items(state, jax.random.key(0), {"step": step, "data_position": step}, cfg))
    ck.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pipeline, its Flax-converted copy, and a LoRA run with steps 1 and 2 (trainable + eval_ema)."""
    root = tmp_path_factory.mktemp("sample_run")
    pipe_dir = build_tiny_sd3_pipeline(root / "pipe")
    flax_dir = root / "pipe_flax"
    shutil.copytree(pipe_dir, flax_dir)
    for sub, model in (("transformer", "sd3"), ("vae", "vae")):
        shutil.rmtree(flax_dir / sub)
        to_flax(pipe_dir, flax_dir / sub, model)
    cfg = _config(pipe_dir)
    pipe = get_family("sd35").load_pipeline(cfg)
    _, _, state = ts.create_train_state(pipe.transformer, cfg)
    s1 = state.replace(trainable=_noisy(state.trainable, 1), eval_ema=_noisy(state.eval_ema, 2))
    s2 = state.replace(trainable=_noisy(state.trainable, 3), eval_ema=_noisy(state.eval_ema, 4))
    _save_run(root / "run", cfg, {1: s1, 2: s2})
    base = {_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(pipe.transformer, nnx.Param))}
    noise = sample.initial_noise(pipe, len(PROMPTS), 0)
    return dict(root=root, pipe=pipe, pipe_dir=pipe_dir, flax_dir=flax_dir, run=root / "run", cfg=cfg,
                base=base, lora={(1, "trainable"): s1.trainable, (1, "eval_ema"): s1.eval_ema,
                                 (2, "trainable"): s2.trainable, (2, "eval_ema"): s2.eval_ema}, noise=noise)


def _hand_merged(world, lora_state):
    """Latents of the base pipeline whose kernels get ``a @ b * alpha / r`` added here, by hand."""
    flat = {_key(p): np.asarray(v) for p, v in nnx.to_flat_state(lora_state)}
    weights = dict(world["base"])
    scale = 8.0 / 4
    for k, a in flat.items():
        if k.endswith(".lora_a"):
            mod = k[: -len(".lora_a")]
            weights[f"{mod}.kernel"] = weights[f"{mod}.kernel"] + a @ flat[f"{mod}.lora_b"] * scale
    pipe = world["pipe"]
    model = nnx.clone(pipe.transformer)
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v[...] = weights[_key(p)]
    assert not jax.tree.leaves(nnx.state(model, LoRAParam))
    pipe.transformer, orig = model, pipe.transformer
    pipe._velocity.clear()
    try:
        return np.asarray(pipe.sample_latents(PROMPTS, latents=world["noise"], num_steps=STEPS))
    finally:
        pipe.transformer = orig
        pipe._velocity.clear()


def _cli_latents(argv):
    args = sample.parse_args([*argv, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", "unused.png"])
    pipe, options = sample.load_pipeline(args)
    options["num_steps"] = STEPS
    return np.asarray(pipe.sample_latents(PROMPTS, latents=sample.initial_noise(pipe, 2, 0), **options))


@pytest.fixture(scope="module")
def base_latents(world):
    return np.asarray(world["pipe"].sample_latents(PROMPTS, latents=world["noise"], num_steps=STEPS))


@pytest.fixture(scope="module")
def run_latents(world):
    return _cli_latents(["--run", str(world["run"])])


def test_run_equals_lora_merged_by_hand(world, run_latents, base_latents):
    ref = _hand_merged(world, world["lora"][(2, "trainable")])  # default: the newest step, trainable
    assert np.abs(base_latents - ref).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(run_latents, ref, atol=2e-4, rtol=0)


@pytest.mark.parametrize("which,step", [("eval_ema", None), ("trainable", 1)])
def test_which_and_step_pick_the_item(world, which, step):
    argv = ["--run", str(world["run"]), "--which", which] + (["--step", str(step)] if step else [])
    args = sample.parse_args([*argv, "--prompt", "x", "--out", "x.png"])
    pipe, options = sample.load_pipeline(args)
    assert options["num_steps"] == world["cfg"].eval.num_steps  # the run's evaluation steps
    got = {_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(pipe.transformer, LoRAParam))}
    want = {_key(p): np.asarray(v) for p, v in nnx.to_flat_state(world["lora"][(step or 2, which)])}
    assert got.keys() == want.keys() and len(want) > 4
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_exported_lora_equals_the_run(world, run_latents):
    peft = export_peft_lora(world["run"], world["root"] / "peft")
    got = _cli_latents(["--model", str(world["pipe_dir"]), "--lora", str(peft),
                        "--max-sequence-length", "16"])
    np.testing.assert_allclose(got, run_latents, atol=2e-4, rtol=0)


def test_flax_folder_samples_the_image_of_the_diffusers_folder(world, base_latents, tmp_path):
    """--model of a pipeline folder whose transformer/ and vae/ were converted with to-flax."""
    argv = ["--model", str(world["flax_dir"]), "--steps", str(STEPS), "--max-sequence-length", "16",
            "--out", str(tmp_path / "img.png")]
    assert sample.main([*argv, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]) == 0
    want = np.asarray(world["pipe"].decode(base_latents))  # the diffusers folder's pipeline
    for i in range(2):
        got = np.asarray(Image.open(tmp_path / f"img_{i}.png")).astype(int)
        assert got.shape == (16, 16, 3) and np.abs(got - want[i]).max() <= 1


def test_full_finetune_run(world, tmp_path, capsys):
    cfg = _config(world["pipe_dir"], eval_ema=False, full=True)
    _, _, state = ts.create_train_state(world["pipe"].transformer, cfg)
    state = state.replace(trainable=_noisy(state.trainable, 5))
    _save_run(tmp_path / "full", cfg, {3: state})
    args = sample.parse_args(["--run", str(tmp_path / "full"), "--prompt", "x", "--out", "x.png"])
    pipe, _ = sample.load_pipeline(args)
    want = {_key(p): np.asarray(v) for p, v in nnx.to_flat_state(state.trainable)}
    got = {_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(pipe.transformer, nnx.Param))}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    err = tmp_path / "err"
    assert sample.main(["--run", str(tmp_path / "full"), "--which", "eval_ema", "--prompt", "x",
                        "--out", str(err / "x.png")]) == 2
    msg = capsys.readouterr().err
    assert f"--run {tmp_path / 'full'}: checkpoint step 3 keeps no 'eval_ema' item" in msg, msg
    assert "it has ['trainable'" in msg and not err.exists()


def test_errors_name_the_workdir_step_and_item(world, tmp_path, capsys):
    run = str(world["run"])

    def fails(argv, *needles, status=2):
        try:
            rc = sample.main([*argv, "--prompt", "x", "--out", str(tmp_path / "x.png")])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == status, err
        for n in needles:
            assert n in err, (n, err)

    fails(["--run", run, "--step", "9"], run, "no checkpoint at step 9 (saved steps: [1, 2])")
    fails(["--run", str(tmp_path)], str(tmp_path), "not a trainer workdir")
    fails(["--model", str(world["pipe_dir"]), "--step", "1"], "--step", "needs --run")
    fails(["--run", run, "--lora", str(tmp_path)], "--lora")
    fails([], "give --model DIR")
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "checkpoints").mkdir()
    cfg = json.loads((world["run"] / "config.json").read_text())
    cfg["model"]["path"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(cfg))
    fails(["--run", str(moved)], f"--run {moved}: model.path {tmp_path / 'gone'}: no such folder",
          "give --model DIR")
    flax_alone = world["flax_dir"] / "transformer"
    fails(["--model", str(flax_alone)], "is an awm-jax Flax 'sd3' folder alone", "as transformer/")
    fails(["--model", str(world["pipe_dir"]), "--lora", str(tmp_path)], f"--lora {tmp_path}",
          "neither a peft LoRA folder")


def test_run_with_model_override(world, tmp_path, run_latents):
    """A run whose model.path moved: --model gives the (Flax-converted) pipeline folder instead."""
    moved = tmp_path / "moved"
    shutil.copytree(world["run"], moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["model"]["path"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "img.png"
    argv = ["--run", str(moved), "--model", str(world["flax_dir"]), "--steps", str(STEPS), "--out", str(out)]
    assert sample.main([*argv, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]) == 0
    want = np.asarray(world["pipe"].decode(run_latents))
    for i in range(2):
        got = np.asarray(Image.open(tmp_path / f"img_{i}.png")).astype(int)
        assert np.abs(got - want[i]).max() <= 1
