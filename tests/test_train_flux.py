"""The trainer's FLUX path (``model.kind = "flux"``) end to end on a tiny random FLUX.1-dev pipeline.

A tiny diffusers FLUX pipeline folder (``tests/tiny_flux_pipeline.py``: CLIP-L + T5 with local tokenizers,
1 double + 2 single blocks, 16-channel VAE) is written to ``tmp_path``; shipped ``configs/flux_*.py`` configs
are overridden down to tiny sizes (JPEG compressibility as the cheap real reward) and trained through
``awm_jax.train.run`` on the 8-device CPU mesh: AWM for 2 steps, Flow-GRPO for 1 step and a resume to 2;
then the AWM run's LoRA is exported by name from its workdir and loaded by diffusers.
"""

import json
import os

import ml_collections
import numpy as np
import pytest

from awm_jax import config_lib, train
from awm_jax.export import lora_from_workdir
from tests.tiny_flux_pipeline import build_tiny_flux_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ['a sign that says "hello"', 'a red bus with the word "city" on it', "a photo of a cat",
           "a painting of a clock at night"]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe", seed=0)


def _tiny_config(name: str, pipe, tmp_path, max_steps: int = 2):
    c = config_lib.load_config(os.path.join(ROOT, "configs", name))
    assert c.model.kind == "flux" and c.sample.guidance_scale == 1.0 and c.model.guidance == 3.5
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    c.model.path = str(pipe / "transformer")
    c.data.train_prompts = c.data.eval_prompts = str(prompts)
    config_lib.apply_overrides(c, [
        ("model.dtype", "float32"), ("model.resolution", "32"), ("model.max_sequence_length", "16"),
        ("max_steps", str(max_steps)), ("data.group_size", "4"), ("data.prompts_per_step", "2"),
        ("data.train_format", "text"), ("data.eval_format", "text"),
        ("lora.rank", "2"), ("lora.alpha", "4.0"), ("sample.num_steps", "4"), ("sample.batch_size", "1"),
        ("awm.train_timesteps", "2"), ("train.micro_batch_size", "1"),
        ("reward.name", "jpeg_compressibility"),
        ("eval.every", "2"), ("eval.num_steps", "3"), ("eval.num_prompts", "2"), ("eval.grid_images", "2"),
        ("checkpoint.every", "1"), ("checkpoint.async_save", "false"), ("log.progress", "false"),
        ("log.tensorboard", "false"), ("advantages.correct_threshold", "1e9"),
    ])
    config_lib.validate(c)
    return c


def _metrics(work):
    return [json.loads(line) for line in open(work / "metrics.jsonl")]


def _check_records(m):
    for r in m:
        assert np.isfinite(r["loss"]) and not r["skipped"], r
        assert np.isfinite(r["reward_mean"]) and r["reward_mean"] < 0.0  # -kB/500 of a real JPEG


def test_flux_awm_two_steps_and_export(tiny_flux, tmp_path):
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from awm_jax.checkpoint import Checkpointer
    from awm_jax.convert.lora_export import PEFT_WEIGHTS
    from awm_jax.export import export_peft_lora

    cfg = _tiny_config("flux_ocr.py", tiny_flux, tmp_path)
    work = tmp_path / "awm"
    last = train.run(cfg, str(work))
    assert last["step"] == 2
    m = _metrics(work)
    assert [r["step"] for r in m] == [1, 2]
    _check_records(m)
    ev = [json.loads(line) for line in open(work / "eval.jsonl")]
    assert [e["step"] for e in ev] == [0, 2]

    # the LoRA moved (B starts at 0) and covers both block kinds; exported by name from the workdir
    params, info = lora_from_workdir(work)
    assert info["model"] == "flux" and info["step"] == 2 and info["rank"] == 2
    b = {k: v for k, v in params.items() if k.endswith("lora_b")}
    assert max(float(np.abs(v).max()) for v in b.values()) > 0.0
    assert any(k.startswith("transformer_blocks.0.ff.net.0.proj") for k in b)
    assert any(k.startswith("single_transformer_blocks.1.proj_mlp") for k in b)
    assert "proj_out.lora_b" not in b  # the velocity read-out is not adapted
    dst = export_peft_lora(work, tmp_path / "peft")
    tm = FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer")
    tm.load_lora_adapter(str(dst), prefix="transformer", weight_name=PEFT_WEIGHTS)
    n_lora = sum(1 for k, _ in tm.named_parameters() if "lora_B" in k)
    assert n_lora == len(b)
    lb = dict(tm.named_parameters())
    key = next(k for k in lb if k.startswith("transformer_blocks.0.attn.to_q.lora_B"))
    np.testing.assert_allclose(lb[key].detach().numpy(), params["transformer_blocks.0.attn.to_q.lora_b"].T,
                               rtol=0, atol=0)
    assert isinstance(lb[key], torch.nn.Parameter)
    pipe = FluxPipeline.from_pretrained(tiny_flux)  # the pipeline-level loader takes the same folder
    pipe.load_lora_weights(str(dst))
    got = dict(pipe.transformer.named_parameters())
    keys = [k for k in got if "lora_B" in k]
    assert len(keys) == len(b)
    np.testing.assert_array_equal(got[key].detach().numpy(), lb[key].detach().numpy())
    ck = Checkpointer(str(work / "checkpoints"), read_only=True)
    try:
        assert {"trainable", "opt_state", "kl_ema", "rng", "meta", "config"} <= ck.items_at(2)
    finally:
        ck.close()


def test_flux_flow_grpo_resume(tiny_flux, tmp_path):
    cfg = _tiny_config("flux_pickscore_flow_grpo.py", tiny_flux, tmp_path, max_steps=1)
    assert cfg.algorithm == "flow_grpo" and cfg.sample.noise_level == 0.9
    assert cfg.train.steps_per_epoch == 2  # the reference's 2 optimizer steps per epoch: 16 rollouts, so
    config_lib.apply_overrides(cfg, [("sample.num_steps", "3"), ("data.prompts_per_step", "4")])  # 8 a step
    work = tmp_path / "grpo"
    train.run(cfg, str(work))
    cfg2 = ml_collections.ConfigDict(cfg.to_dict())
    cfg2.max_steps = 2
    last = train.run(cfg2, str(work))  # resumes from the step-1 checkpoint
    assert last["step"] == 2
    m = _metrics(work)
    assert [r["step"] for r in m] == [1, 2]
    assert [r["opt_steps"] for r in m] == [2, 4]  # the optimizer step count survives the resume
    _check_records(m)
    assert os.path.isdir(work / "checkpoints" / "2")
    params, info = lora_from_workdir(work)
    assert info["step"] == 2 and info["algorithm"] == "flow_grpo"
    assert max(float(np.abs(v).max()) for k, v in params.items() if k.endswith("lora_b")) > 0.0
