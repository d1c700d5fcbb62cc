"""FLUX.1 pipeline (host CLIP-L + T5, Flax transformer + VAE) vs diffusers' FluxPipeline (tiny random models),
the trainer's ``load_flux_pipeline(config)`` and the sampling CLI on a FLUX folder."""

import json

import numpy as np
import pytest
import torch
from tiny_flux_pipeline import TINY_FLUX, build_tiny_flux_pipeline

import awm_jax  # noqa: F401  (flax settings)

PROMPTS = ["a red cat", "two blue cars on the street next to a big old clock"]  # 5 and 15+ T5 tokens
LONG = " ".join(["a big red dog on the beach"] * 15)  # > 77 CLIP tokens and > MAX_SEQ T5 tokens
STEPS = 3
MAX_SEQ = 12
H, W = 32, 48  # non-square: unpacked latents (16, 4, 6), packed grid 2 x 3
# fp32 parity vs pristine diffusers: torch's float32 exp is not correctly rounded for a few timestep
# frequencies on this CPU (see _exact_timestep_embedding in test_flux_model.py), shifting the model output
# by ~1e-5 relative; 3 Euler steps measured 1.2e-5.
LATENT_TOL = 5e-5


def _build(kind, tmp_path_factory):
    from diffusers import FluxPipeline

    from awm_jax.pipelines import load_flux

    path = build_tiny_flux_pipeline(tmp_path_factory.mktemp(f"flux_{kind}"), guidance_embeds=kind == "dev")
    ref = FluxPipeline.from_pretrained(path)
    ref.set_progress_bar_config(disable=True)
    return kind, path, ref, load_flux(path, height=H, width=W, max_sequence_length=MAX_SEQ)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """(kind, folder, diffusers FluxPipeline, our pipeline) of the tiny FLUX.1-dev-like pipeline."""
    return _build("dev", tmp_path_factory)


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return _build("schnell", tmp_path_factory)


@pytest.fixture(params=["dev", "schnell"])
def pipes(request):
    return request.getfixturevalue(request.param)


def _rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def test_text_encoders_match_diffusers(dev):
    _, _, ref, ours = dev
    enc = ours.text_encoder
    prompts = [PROMPTS[0], LONG]
    assert len(ref.tokenizer_2(LONG).input_ids) > MAX_SEQ and len(ref.tokenizer(LONG).input_ids) > 77
    with torch.no_grad():
        want_e, want_p, _ = ref.encode_prompt(prompts, max_sequence_length=MAX_SEQ)
    emb, pooled = enc.encode(prompts)
    assert emb.dtype == pooled.dtype == np.float32
    assert emb.shape == (2, MAX_SEQ, TINY_FLUX["t5_width"]) and pooled.shape == (2, TINY_FLUX["clip_width"])
    np.testing.assert_allclose(emb, want_e.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(pooled, want_p.numpy(), rtol=0, atol=1e-6)
    assert np.abs(emb[0] - emb[1]).max() > 1e-3 and np.abs(pooled[0] - pooled[1]).max() > 1e-3
    # batch of one / other order: same rows (no cross-talk), then served from the LRU
    e1, p1 = enc.encode_uncached([LONG])
    np.testing.assert_allclose(e1[0], emb[1], atol=1e-6)
    np.testing.assert_allclose(p1[0], pooled[1], atol=1e-6)
    hits = enc.cache.hits
    np.testing.assert_array_equal(enc.encode([LONG, PROMPTS[0]])[0], emb[::-1])
    assert enc.cache.hits == hits + 2
    assert enc.fingerprint.startswith("FluxTextEncoders:")
    with pytest.raises(TypeError, match="single string"):
        enc.encode_uncached("a red cat")


def test_text_encoder_errors(dev, tmp_path):
    from awm_jax.text.flux import FluxTextEncoders

    _, path, _, ours = dev
    t = ours.text_encoder
    with pytest.raises(ValueError, match="max_sequence_length"):
        FluxTextEncoders(t.tokenizer, t.text_encoder, t.tokenizer_2, t.text_encoder_2,
                         max_sequence_length=513)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FluxTextEncoders.from_pipeline_dir(tmp_path / "missing")
    index = json.loads((path / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "CLIPTextModelWithProjection"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        FluxTextEncoders.from_pipeline_dir(tmp_path)


def test_euler_ode_matches_diffusers(pipes):
    from diffusers import FluxPipeline

    kind, _, ref, ours = pipes
    assert ours.latent_shape == (16, H // 8, W // 8)
    assert ours.shift == (None if kind == "dev" else 1.0)
    noise = np.random.RandomState(0).randn(len(PROMPTS), *ours.latent_shape).astype(np.float32)
    packed = FluxPipeline._pack_latents(torch.from_numpy(noise), len(PROMPTS), 16, H // 8, W // 8)
    kw = dict(num_inference_steps=STEPS, guidance_scale=3.5, max_sequence_length=MAX_SEQ, height=H, width=W)
    with torch.no_grad():
        want_lat = ref(PROMPTS, latents=packed, output_type="latent", **kw).images
        want_img = ref(PROMPTS, latents=packed, output_type="np", **kw).images
    want_lat = FluxPipeline._unpack_latents(want_lat, H, W, ref.vae_scale_factor).numpy()
    got_lat = np.asarray(ours.sample_latents(PROMPTS, num_steps=STEPS, guidance=3.5, latents=noise))
    assert got_lat.shape == want_lat.shape == (2, 16, H // 8, W // 8)
    assert _rel(got_lat, want_lat) <= LATENT_TOL
    got_img = np.asarray(ours.decode(got_lat))
    want_u8 = (want_img * 255).round().astype(np.uint8)
    assert got_img.shape == want_u8.shape == (2, H, W, 3)
    diff = np.abs(got_img.astype(int) - want_u8.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # off-by-one on < 1% of the pixel values
    # the comparison is not vacuous: other noise / (dev) other guidance change the result
    other = ours.sample_latents(PROMPTS, num_steps=STEPS, guidance=3.5, latents=noise + 1.0)
    assert float(np.abs(np.asarray(other) - got_lat).max()) > 1e-2
    g = np.asarray(ours.sample_latents(PROMPTS, num_steps=STEPS, guidance=1.0, latents=noise))
    assert (float(np.abs(g - got_lat).max()) > 1e-3) == (kind == "dev")


def test_time_grid_and_scheduler_checks(pipes, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from awm_jax.pipelines.flux import scheduler_shift

    _, path, ref, ours = pipes
    sched = FlowMatchEulerDiscreteScheduler.from_config(ref.scheduler.config)
    seq = (H // 16) * (W // 16)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5), mu=mu)
    np.testing.assert_allclose(ours.time_grid(5), sched.sigmas.numpy(), atol=1e-6)
    (tmp_path / "scheduler").mkdir()
    cfg = dict(ref.scheduler.config, use_dynamic_shifting=True, max_shift=1.5)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="max_shift"):
        scheduler_shift(tmp_path)
    cfg = dict(ref.scheduler.config, use_karras_sigmas=True)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        scheduler_shift(tmp_path)


def _trainer_config(path):
    from awm_jax import config_lib

    c = config_lib.load_config("configs/toy.py")  # every declared key, then this test's values
    c.model.update(dict(kind="flux", path=str(path / "transformer"), vae_path="",
                        text_encoder_paths=(str(path / "text_encoder"), "", ""), max_sequence_length=MAX_SEQ,
                        resolution=32, dtype="float32", param_dtype="float32"))
    return c


def test_load_flux_pipeline_from_trainer_config(dev):
    from awm_jax.models import get_family
    from awm_jax.pipelines import FluxT2IPipeline, load_flux_pipeline

    _, path, _, ours = dev
    c = _trainer_config(path)
    pipe = get_family("flux").load_pipeline(c)
    assert isinstance(pipe, FluxT2IPipeline)
    assert pipe.latent_shape == (16, 4, 4) and (pipe.height, pipe.width) == (32, 32)
    emb, pooled = pipe.text_encoder.encode(["a red cat"])
    assert emb.shape == (1, MAX_SEQ, 48) and pooled.shape == (1, 16)
    np.testing.assert_array_equal(emb, ours.text_encoder.encode(["a red cat"])[0])
    k = np.asarray(ours.transformer.x_embedder.kernel.get_value())
    np.testing.assert_array_equal(np.asarray(pipe.transformer.x_embedder.kernel.get_value()), k)
    assert np.asarray(pipe.decode(np.zeros((1, *pipe.latent_shape), np.float32))).shape == (1, 32, 32, 3)

    c.model.text_encoder_paths = ("/elsewhere/text_encoder", "")
    with pytest.raises(ValueError, match="/elsewhere/text_encoder"):
        load_flux_pipeline(c)
    c.model.text_encoder_paths = ("", "", str(path / "text_encoder_3"))
    with pytest.raises(ValueError, match="text_encoder_paths entry #2"):
        load_flux_pipeline(c)
    c.model.text_encoder_paths = ("", "")
    c.model.resolution = 40
    with pytest.raises(ValueError, match="height=40"):
        load_flux_pipeline(c)
    c.model.path = ""
    with pytest.raises(ValueError, match="model.path"):
        load_flux_pipeline(c)
    c.model.path = str(path / "vae" / "nowhere")
    with pytest.raises(FileNotFoundError, match="model.path"):
        load_flux_pipeline(c)


def test_sample_cli(dev, tmp_path):
    from PIL import Image

    from awm_jax import sample

    _, path, _, _ = dev
    out = tmp_path / "img.png"
    rc = sample.main(["--model", str(path), "--prompt", "a red cat", "--prompt", "a dog", "--steps", "2",
                      "--seed", "3", "--max-sequence-length", str(MAX_SEQ), "--height", "16", "--width", "32",
                      "--out", str(out)])
    assert rc == 0
    files = sorted(tmp_path.glob("img*.png"))
    assert [f.name for f in files] == ["img_0.png", "img_1.png"]
    imgs = [np.asarray(Image.open(f)) for f in files]
    assert imgs[0].shape == (16, 32, 3) and imgs[0].dtype == np.uint8
    assert not np.array_equal(imgs[0], imgs[1])
    with pytest.raises(SystemExit):  # CFG is an SD3 option
        sample.main(["--model", str(path), "--prompt", "x", "--guidance-scale", "4", "--out", str(out)])


def test_convert_cli_takes_the_pipeline_folder(dev, tmp_path):
    """``tools/convert_weights.py to-flax --model flux`` on a whole FLUX pipeline folder converts its
    transformer/; the Flax folder loads to the same parameters and back to the same diffusers bytes."""
    from awm_jax.convert.io import SafetensorsReader
    from awm_jax.models import load_transformer, transformer_params
    from tools.convert_weights import main

    _, root, _, _ = dev
    assert main(["to-flax", "--model", "flux", "--src", str(root), "--dst", str(tmp_path / "flax")]) == 0
    assert main(["to-diffusers", "--model", "flux", "--src", str(tmp_path / "flax"),
                 "--dst", str(tmp_path / "back")]) == 0
    a = transformer_params(load_transformer(root))
    b = transformer_params(load_transformer(tmp_path / "flax"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with SafetensorsReader(root / "transformer") as r0, SafetensorsReader(tmp_path / "back") as r1:
        assert sorted(r0.keys()) == sorted(r1.keys())
        assert all(r0.get(k).tobytes() == r1.get(k).tobytes() for k in r0.keys())
    assert main(["to-flax", "--model", "sd3", "--src", str(root), "--dst", str(tmp_path / "x")]) == 2
