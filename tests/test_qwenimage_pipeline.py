"""The Qwen-Image pipeline (host text encoder + Flax transformer + Flax VAE) against diffusers'
``QwenImagePipeline`` on a tiny random pipeline: the same noise and steps give the same latents and images,
with and without true CFG; the scheduler grid; ``python -m awm_jax.sample --model DIR``."""

import numpy as np
import pytest
import torch

from awm_jax.models.flux import pack_latents
from awm_jax.pipelines.qwenimage import load_qwenimage
from tests.flux_oracle import oracle
from tests.test_qwenimage_text import tiny_qwen  # noqa: F401  (module fixture)

PROMPTS = ["a red cat on a table", "two blue dogs"]


@pytest.fixture(scope="module")
def pipes(tiny_qwen):  # noqa: F811
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(tiny_qwen), load_qwenimage(tiny_qwen, height=32, width=48,
                                                                        max_sequence_length=160)


@pytest.mark.parametrize("cfg", [1.0, 3.0], ids=["no_cfg", "true_cfg"])
def test_sampling_matches_diffusers(pipes, cfg):
    ref_pipe, pipe = pipes
    assert pipe.latent_shape == (4, 4, 6)
    x0 = np.random.RandomState(0).randn(2, 4, 4, 6).astype(np.float32)
    neg = " " if cfg > 1 else None
    out = pipe.sample_latents(PROMPTS, num_steps=3, true_cfg_scale=cfg, negative_prompt=neg, latents=x0)
    with oracle():
        ref = ref_pipe(prompt=PROMPTS, negative_prompt=neg, true_cfg_scale=cfg, height=32, width=48,
                       num_inference_steps=3, latents=torch.from_numpy(np.asarray(pack_latents(x0))),
                       output_type="latent", max_sequence_length=160).images.numpy()
    got = np.asarray(pack_latents(out))
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"[true_cfg_scale={cfg}] final latents rel max err {err:.2e}")
    assert err <= 1e-4
    moved = float(np.abs(got - np.asarray(pack_latents(x0))).max())
    assert moved > 1e-2
    if cfg > 1:  # decode like the pipeline: denormalise, VAE, postprocess
        with oracle():
            img = ref_pipe(prompt=PROMPTS, negative_prompt=neg, true_cfg_scale=cfg, height=32, width=48,
                           num_inference_steps=3, latents=torch.from_numpy(np.asarray(pack_latents(x0))),
                           output_type="np", max_sequence_length=160).images
        mine = np.asarray(pipe.decode(out)).astype(np.float32) / 255.0
        assert mine.shape == img.shape == (2, 32, 48, 3)
        assert np.abs(mine - img).max() <= 1.5 / 255


def test_grid_is_the_scheduler_s(pipes):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    ref_pipe, pipe = pipes
    sched = ref_pipe.scheduler
    mu = calculate_shift(6, 256, 8192, 0.5, 0.9)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5), mu=mu)
    np.testing.assert_array_equal(pipe.time_grid(5), sched.sigmas.numpy().astype(np.float64))
    assert abs(pipe.time_grid(5)[-2] - 0.02) < 1e-6  # shift_terminal


def test_sample_cli(pipes, tiny_qwen, tmp_path):  # noqa: F811
    from PIL import Image

    from awm_jax import sample

    out = tmp_path / "img.png"
    rc = sample.main(["--model", str(tiny_qwen), "--prompt", "a red cat", "--prompt", "a dog", "--steps", "2",
                      "--seed", "3", "--max-sequence-length", "160", "--height", "32", "--width", "16",
                      "--negative-prompt", " ", "--guidance-scale", "2", "--out", str(out)])
    assert rc == 0
    imgs = [np.asarray(Image.open(f)) for f in sorted(tmp_path.glob("img*.png"))]
    assert len(imgs) == 2 and imgs[0].shape == (32, 16, 3) and not np.array_equal(imgs[0], imgs[1])
