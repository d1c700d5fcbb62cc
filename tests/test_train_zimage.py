"""The trainer's Z-Image path (``model.kind = "zimage"``) end to end on a tiny random Z-Image pipeline.

``tests/tiny_zimage_pipeline.py`` writes the pipeline folder; the shipped ``configs/zimage_*.py`` are
overridden down to tiny sizes (JPEG compressibility as the cheap real reward) and trained through
``awm_jax.train.run`` on the 8-device CPU mesh: AWM and Flow-GRPO for 2 steps each. The AWM run's LoRA is
exported (peft folder) and loaded by ``ZImagePipeline.load_lora_weights``, and merged into full diffusers
weights; both reproduce the Flax LoRA model's output.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from awm_jax import config_lib, train
from awm_jax.export import lora_from_workdir
from tests.test_zimage_model import exact_timestep_embedding
from tests.tiny_zimage_pipeline import build_tiny_zimage_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ['a sign that says "hello"', 'a red bus with the word "city" on it', "a photo of a cat",
           "a painting of a clock at night"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_zimage_pipeline(tmp_path_factory.mktemp("zimage") / "pipe", seed=0)


def _tiny_config(name, pipe, tmp_path):
    c = config_lib.load_config(os.path.join(ROOT, "configs", name))
    assert c.model.kind == "zimage" and c.lora.rank == 64 and c.sample.guidance_scale == 5.0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    c.model.path = str(pipe / "transformer")
    c.data.train_prompts = c.data.eval_prompts = str(prompts)
    config_lib.apply_overrides(c, [
        ("model.dtype", "float32"), ("model.resolution", "32"), ("model.max_sequence_length", "24"),
        ("max_steps", "2"), ("data.group_size", "4"), ("data.prompts_per_step", "2"),
        ("data.train_format", "text"), ("data.eval_format", "text"), ("train.steps_per_epoch", "1"),
        ("lora.rank", "2"), ("lora.alpha", "4.0"), ("sample.num_steps", "3"), ("sample.batch_size", "2"),
        ("sample.guidance_scale", "1.5"), ("eval.guidance_scale", "1.0"),
        ("awm.train_timesteps", "2"), ("train.micro_batch_size", "2"),
        ("reward.name", "jpeg_compressibility"),
        ("eval.every", "2"), ("eval.num_steps", "2"), ("eval.num_prompts", "2"), ("eval.grid_images", "2"),
        ("checkpoint.every", "2"), ("checkpoint.async_save", "false"), ("log.progress", "false"),
        ("log.tensorboard", "false"), ("advantages.correct_threshold", "1e9"),
    ])
    config_lib.validate(c)
    return c


def _check_run(work, algorithm):
    m = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert [r["step"] for r in m] == [1, 2]
    for r in m:
        assert np.isfinite(r["loss"]) and not r["skipped"] and np.isfinite(r["reward_mean"]), r
    params, info = lora_from_workdir(work)
    assert info["model"] == "zimage" and info["step"] == 2 and info["algorithm"] == algorithm
    b = {k: v for k, v in params.items() if k.endswith("lora_b")}
    assert max(float(np.abs(v).max()) for v in b.values()) > 0.0  # B starts at 0: the LoRA moved
    for stack in ("noise_refiner.0", "context_refiner.0", "layers.1"):
        assert f"{stack}.feed_forward.w2.lora_b" in b and f"{stack}.attention.to_out.0.lora_b" in b
    return params, info


def _inputs(seed=0):
    rs = np.random.RandomState(seed)
    x = rs.randn(2, 16, 1, 4, 6).astype(np.float32)
    caps = [rs.randn(n, 24).astype(np.float32) for n in (5, 30)]
    return x, np.array([0.3, 0.7], np.float32), caps


def _torch_out(tm, inputs):
    from diffusers.models.transformers import transformer_z_image as tz

    x, t, caps = inputs
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(tz.TimestepEmbedder, "timestep_embedding", staticmethod(exact_timestep_embedding))
        out = tm.eval()([torch.from_numpy(a) for a in x], torch.from_numpy(t),
                        [torch.from_numpy(c) for c in caps], return_dict=False)[0]
    return np.stack([o.numpy() for o in out])


def _flax_lora_out(pipe, params, info, inputs):
    """The Flax LoRA model (base weights + adapters as LoRAParam variables, not merged)."""
    from awm_jax.models import load_transformer
    from awm_jax.models.lora import LoRAConfig, LoRAParam
    from awm_jax.models.zimage import ZIMAGE_LORA_TARGETS

    m = load_transformer(pipe, lora=LoRAConfig(rank=int(info["rank"]), alpha=float(info["alpha"]),
                                               target_modules=ZIMAGE_LORA_TARGETS))
    flat = []
    for path, v in nnx.to_flat_state(nnx.state(m, LoRAParam)):
        flat.append((path, v.replace(value=jnp.asarray(params[".".join(map(str, path))]))))
    assert len(flat) == len(params)
    nnx.update(m, nnx.from_flat_state(flat))
    x, t, caps = inputs
    return np.asarray(nnx.jit(lambda m, x, t, c: m(x, t, c))(m, x, t, caps))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_zimage_awm_two_steps_export_and_merge(tiny, tmp_path):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    from awm_jax.export import export_peft_lora
    from tools.convert_weights import main

    work = tmp_path / "awm"
    assert train.run(_tiny_config("zimage_ocr.py", tiny, tmp_path), str(work))["step"] == 2
    params, info = _check_run(work, "awm")
    inputs = _inputs()
    want = _flax_lora_out(tiny, params, info, inputs)
    base = _torch_out(ZImageTransformer2DModel.from_pretrained(tiny / "transformer"), inputs)
    assert _rel(want, base) > 1e-6  # the adapters change the output
    # peft folder -> ZImagePipeline.load_lora_weights reproduces the Flax LoRA model
    dst = export_peft_lora(work, tmp_path / "peft")
    pipe = ZImagePipeline.from_pretrained(tiny)
    pipe.load_lora_weights(str(dst))
    assert sum(1 for k, _ in pipe.transformer.named_parameters() if "lora_B" in k) == len(params) // 2
    err = _rel(_torch_out(pipe.transformer, inputs), want)
    print(f"peft LoRA in diffusers vs Flax LoRA model: rel max err {err:.2e}")
    assert err <= 1e-5
    # merged full weights (tools/convert_weights.py to-diffusers --merge-lora WORKDIR)
    assert main(["to-diffusers", "--model", "zimage", "--src", str(tiny), "--dst", str(tmp_path / "merged"),
                 "--merge-lora", str(work)]) == 0
    err = _rel(_torch_out(ZImageTransformer2DModel.from_pretrained(tmp_path / "merged"), inputs), want)
    print(f"merged weights in diffusers vs Flax LoRA model: rel max err {err:.2e}")
    assert err <= 1e-5


def test_zimage_flow_grpo_two_steps(tiny, tmp_path):
    cfg = _tiny_config("zimage_pickscore_flow_grpo.py", tiny, tmp_path)
    assert cfg.algorithm == "flow_grpo" and cfg.sample.noise_level == 0.7
    config_lib.apply_overrides(cfg, [("sample.num_steps", "2"), ("eval.every", "0")])  # eval: the AWM test
    work = tmp_path / "grpo"
    assert train.run(cfg, str(work))["step"] == 2
    _check_run(work, "flow_grpo")


def test_pipeline_loader_takes_model_attention(tiny, tmp_path):
    """``load_zimage_pipeline`` builds the transformer with ``model.attention`` (it once dropped the key)."""
    from awm_jax.pipelines.zimage import load_zimage_pipeline

    c = _tiny_config("zimage_ocr.py", tiny, tmp_path)
    c.model.attention = "auto"
    assert load_zimage_pipeline(c).transformer.attention == "auto"
