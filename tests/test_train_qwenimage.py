"""The trainer's Qwen-Image path (``model.kind = "qwenimage"``) end to end on a tiny random pipeline
(``tests/tiny_qwenimage_pipeline.py``): the shipped ``configs/qwenimage_*.py`` overridden down to tiny sizes
(JPEG compressibility as the cheap real reward), AWM and the Flow-GRPO baseline for 2 steps each through
``awm_jax.train.run``; the AWM run's LoRA exported by name from its workdir loads in diffusers."""

import json
import os

import numpy as np
import pytest

from awm_jax import config_lib, train
from awm_jax.export import lora_from_workdir
from tests.tiny_qwenimage_pipeline import build_tiny_qwenimage_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ['a sign that says "hello"', "a red bus", "a photo of a cat", "a painting of a clock"]


@pytest.fixture(scope="module")
def tiny_qwen_pipe(tmp_path_factory):
    return build_tiny_qwenimage_pipeline(tmp_path_factory.mktemp("qwen") / "pipe", seed=1)


def _tiny_config(name, pipe, tmp_path):
    c = config_lib.load_config(os.path.join(ROOT, "configs", name))
    assert c.model.kind == "qwenimage" and c.sample.guidance_scale == 4.0 and c.lora.rank == 64
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    c.model.path = str(pipe)
    c.data.train_prompts = c.data.eval_prompts = str(prompts)
    config_lib.apply_overrides(c, [
        ("model.dtype", "float32"), ("model.resolution", "32"), ("model.max_sequence_length", "160"),
        ("max_steps", "2"), ("data.group_size", "4"), ("data.prompts_per_step", "2"),
        ("data.train_format", "text"), ("data.eval_format", "text"),
        ("lora.rank", "2"), ("lora.alpha", "4.0"), ("sample.num_steps", "3"), ("sample.batch_size", "2"),
        ("sample.guidance_scale", "1.0"), ("eval.guidance_scale", "2.0"),
        ("awm.train_timesteps", "2"), ("train.micro_batch_size", "2"), ("train.steps_per_epoch", "1"),
        ("reward.name", "jpeg_compressibility"),
        ("eval.every", "2"), ("eval.num_steps", "2"), ("eval.num_prompts", "2"), ("eval.grid_images", "2"),
        ("checkpoint.every", "2"), ("checkpoint.async_save", "false"), ("log.progress", "false"),
        ("log.tensorboard", "false"), ("advantages.correct_threshold", "1e9"),
    ])
    config_lib.validate(c)
    return c


@pytest.mark.parametrize("name", ["qwenimage_ocr.py", "qwenimage_pickscore_flow_grpo.py"])
def test_two_steps(tiny_qwen_pipe, tmp_path, name):
    cfg = _tiny_config(name, tiny_qwen_pipe, tmp_path)
    work = tmp_path / "run"
    assert train.run(cfg, str(work))["step"] == 2
    m = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert [r["step"] for r in m] == [1, 2]
    for r in m:
        assert np.isfinite(r["loss"]) and not r["skipped"], r
        assert np.isfinite(r["reward_mean"]) and r["reward_mean"] < 0.0
    params, info = lora_from_workdir(work)
    assert info["model"] == "qwenimage" and info["step"] == 2
    b = {k: v for k, v in params.items() if k.endswith("lora_b")}
    assert max(float(np.abs(v).max()) for v in b.values()) > 0.0  # the LoRA moved
    assert any(k.startswith("transformer_blocks.1.txt_mlp.net.2") for k in b)
    if cfg.algorithm == "awm":
        from diffusers import QwenImagePipeline

        from awm_jax.export import export_peft_lora

        dst = export_peft_lora(work, tmp_path / "peft")
        pipe = QwenImagePipeline.from_pretrained(tiny_qwen_pipe)
        pipe.load_lora_weights(str(dst))
        got = {k: v for k, v in pipe.transformer.named_parameters() if "lora_B" in k}
        assert len(got) == len(b)
        key = next(k for k in got if k.startswith("transformer_blocks.0.attn.to_q.lora_B"))
        want = params["transformer_blocks.0.attn.to_q.lora_b"].T
        np.testing.assert_array_equal(got[key].detach().numpy(), want)


def test_pipeline_loader_takes_model_attention(tiny_qwen_pipe, tmp_path):
    """``load_qwenimage_pipeline`` builds the transformer with ``model.attention`` (it once dropped the key,
    so a TPU run would have trained with XLA attention whatever the config said)."""
    from awm_jax.pipelines.qwenimage import load_qwenimage_pipeline

    c = _tiny_config("qwenimage_ocr.py", tiny_qwen_pipe, tmp_path)
    c.model.attention = "auto"
    assert load_qwenimage_pipeline(c).transformer.attention == "auto"
