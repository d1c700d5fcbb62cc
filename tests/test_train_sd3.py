"""The trainer's real-model path (``model.kind = "sd35"``) end to end on a tiny random SD3.5 pipeline.

A tiny diffusers SD3.5 pipeline folder (CLIP-L/G + T5 with local tokenizers, 2-layer MMDiT, 16-channel
VAE; ``tests/tiny_pipeline.py``) is written to ``tmp_path``; a shipped ``configs/sd35m_*.py`` config is
overridden down to tiny sizes (JPEG compressibility as the cheap real reward) and trained for 2 steps
through ``awm_jax.train.run`` on the 8-device CPU mesh: pipeline loading, LoRA train state, rollout,
VAE decode, reward, advantages, train step, evaluation and checkpointing all on the SD3 path.
"""

import json
import os

import jax
import numpy as np
import pytest

from awm_jax import config_lib, train
from tests.tiny_pipeline import TINY, build_tiny_sd3_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OCR_PROMPTS = [
    'a sign that says "hello"',
    'a photo of a red sign that says "world"',
    'a blue bus with the word "city" on it',
    'a painting of a clock and the text "night"',
]

GENEVAL_PROMPTS = ["a photo of a cat", "a photo of a red bus", "a photo of two dogs", "a photo of a clock"]


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe", seed=0)


def _tiny_config(name: str, pipe, tmp_path, max_steps: int = 2, fmt: str = "ocr"):
    c = config_lib.load_config(os.path.join(ROOT, "configs", name))
    assert c.model.kind == "sd35"
    prompts = tmp_path / "prompts.txt"
    if fmt == "geneval":
        prompts.write_text("".join(json.dumps({"prompt": p, "tag": "single_object", "include": []}) + "\n"
                                   for p in GENEVAL_PROMPTS))
    else:
        prompts.write_text("\n".join(OCR_PROMPTS) + "\n")
    c.model.path = str(pipe / "transformer")
    c.model.vae_path = ""
    c.model.text_encoder_paths = tuple(str(pipe / f) for f in ("text_encoder", "text_encoder_2",
                                                              "text_encoder_3"))
    c.model.resolution = TINY["sample_size"] * TINY["vae_scale_factor"]  # 16 px -> 8x8 latents
    c.model.max_sequence_length = 32
    for section, key in (("data", "train_prompts"), ("data", "eval_prompts")):
        c[section][key] = str(prompts)
    config_lib.apply_overrides(c, [
        ("model.dtype", "float32"), ("max_steps", str(max_steps)), ("data.group_size", "4"),
        ("data.prompts_per_step", "2"), ("data.train_format", fmt), ("data.eval_format", fmt),
        ("lora.rank", "2"), ("lora.alpha", "4.0"), ("sample.num_steps", "4"), ("sample.batch_size", "1"),
        ("awm.train_timesteps", "2"), ("train.micro_batch_size", "1"),
        ("reward.name", "jpeg_compressibility"),
        ("eval.every", "2"), ("eval.num_steps", "3"), ("eval.num_prompts", "2"), ("eval.grid_images", "2"),
        ("checkpoint.every", "1"), ("checkpoint.async_save", "false"), ("log.progress", "false"),
        ("log.tensorboard", "false"),
    ])
    config_lib.validate(c)
    return c


def _lora_leaves(state) -> list[np.ndarray]:
    return [np.array(x, copy=True) for x in jax.tree.leaves(state.trainable)]


@pytest.mark.parametrize("name,fmt", [("sd35m_ocr.py", "ocr"), ("sd35m_geneval_flow_grpo.py", "geneval")])
def test_sd35_two_steps(tiny_pipe, tmp_path, name, fmt):
    """AWM (sd35m_ocr) and Flow-GRPO with CFG (sd35m_geneval_flow_grpo) on the tiny pipeline: 2 finite
    steps, eval records, checkpoints, the LoRA moved."""
    cfg = _tiny_config(name, tiny_pipe, tmp_path, fmt=fmt)
    if fmt == "geneval":
        assert cfg.algorithm == "flow_grpo" and cfg.sample.guidance_scale > 1.0  # CFG: empty-prompt branch
        # 2 optimizer steps per epoch: each half (8 rollouts) must split over the 8 virtual devices
        config_lib.apply_overrides(cfg, [("sample.num_steps", "3"), ("data.prompts_per_step", "4")])
    seen = {}

    def components(config):
        comp = seen["comp"] = train.default_components(config)
        seen["lora0"] = _lora_leaves(comp.state)  # copied now: the train step donates the state buffers
        return comp

    work = tmp_path / "run"
    last = _run_with(cfg, str(work), components)
    assert last["step"] == 2
    comp = seen["comp"]
    assert tuple(comp.pipeline.latent_shape) == (TINY["latent_channels"], 8, 8)
    lora0 = seen["lora0"]
    assert lora0, "the train state has no LoRA parameters"

    m = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert [r["step"] for r in m] == [1, 2]
    # Flow-GRPO: 2 optimizer steps per epoch (the reference), and evaluation at its CFG 4.5
    assert [r["opt_steps"] for r in m] == ([2, 4] if fmt == "geneval" else [1, 2])
    assert cfg.eval.guidance_scale == (4.5 if fmt == "geneval" else 1.0)
    for r in m:
        assert np.isfinite(r["loss"]) and not r["skipped"], r
        assert np.isfinite(r["reward_mean"]) and r["reward_mean"] < 0.0  # -kB/500 of a real JPEG
        if "grad_norm" in r:
            assert np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0.0
    ev = [json.loads(line) for line in open(work / "eval.jsonl")]
    assert ev[-1]["step"] == 2 and all(np.isfinite(e["reward_mean"]) for e in ev)  # (+ a step-0 baseline)
    assert os.path.isdir(work / "checkpoints" / "2")

    # the LoRA the run ended with differs from the initial one (B starts at 0, so it must have moved)
    ckpt_leaves = _restored_lora(str(work), comp)
    assert len(ckpt_leaves) == len(lora0)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(ckpt_leaves, lora0))
    assert moved > 0.0


def _run_with(cfg, workdir, factory):
    """``train.run`` with ``factory`` as the components factory (keeps a handle on the components)."""
    import sys
    import types

    mod = types.ModuleType("_sd3_components_for_test")
    mod.components = factory
    sys.modules[mod.__name__] = mod
    try:
        cfg.components = f"{mod.__name__}:components"
        return train.run(cfg, workdir)
    finally:
        sys.modules.pop(mod.__name__, None)


def _restored_lora(workdir, comp) -> list[np.ndarray]:
    """The trainable leaves of the last checkpoint in ``workdir``."""
    from awm_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=3, async_save=False)
    try:
        step, state, _, meta = train.restore_checkpoint(ckpt, comp.state, jax.random.key(0))
        # the trainable item alone, by name and without a target (no optimizer involved)
        raw = ckpt.restore(step, ["trainable"])["trainable"]
    finally:
        ckpt.close()
    assert step == 2 and meta["step"] == 2
    assert len(jax.tree.leaves(raw)) == len(jax.tree.leaves(state.trainable))
    return _lora_leaves(state)
