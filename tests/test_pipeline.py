"""SD3 pipeline (Flax transformer + VAE, host text encoders) vs diffusers' StableDiffusion3Pipeline."""

import numpy as np
import pytest
import torch
from tiny_pipeline import build_tiny_sd3_pipeline

import awm_jax  # noqa: F401  (flax settings)

PROMPTS = ["a red cat", "two blue cars on the street"]
STEPS = 3
MAX_SEQ = 16


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline

    from awm_jax.pipelines import load_sd3

    path = build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3pipe"))
    ref = StableDiffusion3Pipeline.from_pretrained(path)
    ref.set_progress_bar_config(disable=True)
    return path, ref, load_sd3(path, max_sequence_length=MAX_SEQ)


def _rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_euler_ode_matches_diffusers(pipes, guidance):
    _, ref, ours = pipes
    assert ours.latent_shape == (16, 8, 8) and ours.shift == 3.0
    noise = np.random.RandomState(0).randn(len(PROMPTS), *ours.latent_shape).astype(np.float32)
    kw = dict(num_inference_steps=STEPS, guidance_scale=guidance, max_sequence_length=MAX_SEQ,
              height=ours.height, width=ours.width)
    with torch.no_grad():
        want_lat = ref(PROMPTS, latents=torch.from_numpy(noise), output_type="latent", **kw).images.numpy()
        want_img = ref(PROMPTS, latents=torch.from_numpy(noise), output_type="np", **kw).images
    got_lat = ours.sample_latents(PROMPTS, num_steps=STEPS, guidance_scale=guidance, latents=noise)
    assert got_lat.shape == want_lat.shape
    assert _rel(got_lat, want_lat) <= 1e-5
    got_img = np.asarray(ours.decode(got_lat))
    want_u8 = (want_img * 255).round().astype(np.uint8)
    assert got_img.shape == want_u8.shape == (2, 16, 16, 3)
    diff = np.abs(got_img.astype(int) - want_u8.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # a different initial noise gives different images (the comparison is not vacuous)
    other = ours.sample_latents(PROMPTS, num_steps=STEPS, guidance_scale=guidance, latents=noise + 1.0)
    assert float(np.abs(np.asarray(other) - np.asarray(got_lat)).max()) > 1e-2


def test_sample_cli(pipes, tmp_path):
    from PIL import Image

    from awm_jax import sample

    path, _, _ = pipes
    out = tmp_path / "img.png"
    rc = sample.main(["--model", str(path), "--prompt", "a red cat", "--prompt", "a dog", "--steps", "2",
                      "--seed", "3", "--max-sequence-length", str(MAX_SEQ), "--out", str(out)])
    assert rc == 0
    files = sorted(tmp_path.glob("img*.png"))
    assert [f.name for f in files] == ["img_0.png", "img_1.png"]
    imgs = [np.asarray(Image.open(f)) for f in files]
    assert imgs[0].shape == (16, 16, 3) and imgs[0].dtype == np.uint8
    assert not np.array_equal(imgs[0], imgs[1])
    with pytest.raises(SystemExit):
        sample.main(["--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(out)])


def test_load_sd3_errors(tmp_path):
    from awm_jax.pipelines import load_sd3

    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_sd3(tmp_path)


def test_load_sd3_pipeline_from_trainer_config(pipes):

    from awm_jax import config_lib
    from awm_jax.pipelines import load_sd3_pipeline

    path, _, ours = pipes
    c = config_lib.load_config("configs/sd35m_geneval.py")  # every declared key, then this test's values
    c.model.update(dict(kind="sd35", path=str(path / "transformer"), vae_path=str(path / "vae"),
                        text_encoder_paths=tuple(str(path / s) for s in ("text_encoder", "text_encoder_2",
                                                                          "text_encoder_3")),
                        max_sequence_length=MAX_SEQ, resolution=32, dtype="float32", param_dtype="float32"))
    pipe = load_sd3_pipeline(c)
    assert pipe.latent_shape == (16, 16, 16) and (pipe.height, pipe.width) == (32, 32)
    emb, pooled = pipe.text_encoder.encode(["a red cat"])
    assert emb.shape == (1, 77 + MAX_SEQ, 48) and pooled.shape == (1, 40)
    np.testing.assert_array_equal(emb, ours.text_encoder.encode(["a red cat"])[0])
    k = ours.transformer.context_embedder.kernel.get_value()
    np.testing.assert_array_equal(np.asarray(pipe.transformer.context_embedder.kernel.get_value()), k)
    c.model.text_encoder_paths = ("/elsewhere/text_encoder", "", "")
    with pytest.raises(ValueError, match="/elsewhere/text_encoder"):
        load_sd3_pipeline(c)
    c.model.text_encoder_paths = ("", "", "")
    c.model.resolution = 30
    with pytest.raises(ValueError, match="height=30"):
        load_sd3_pipeline(c)
