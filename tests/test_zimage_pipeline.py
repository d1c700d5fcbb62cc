"""Z-Image pipeline (host Qwen3 encoder, Flax transformer + VAE) vs diffusers' ZImagePipeline (tiny random
models): encode_prompt, Euler sampling with and without CFG, the trainer's loader, the sampling CLI, and the
converter CLI on the pipeline folder."""

import numpy as np
import pytest
import torch
from test_zimage_model import exact_timestep_embedding
from tiny_zimage_pipeline import TINY_ZIMAGE, build_tiny_zimage_pipeline

import awm_jax  # noqa: F401  (flax settings)

# a tuple: ZImagePipeline replaces the items of a prompt list by their chat-templated text in place
PROMPTS = ("a red cat", "two blue cars on the street next to a big old clock")
STEPS = 3
MAX_SEQ = 40
H, W = 32, 48  # latents (16, 4, 6), token grid 2 x 3
# float32 sigmas: diffusers shifts them in float32, the family's grid in float64 (1 ulp of t moves
# sin(1000 t f) by ~1e-4 rad); 3 Euler steps measured 3.4e-5
LATENT_TOL = 5e-5


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from diffusers import ZImagePipeline

    from awm_jax.pipelines import load_zimage

    path = build_tiny_zimage_pipeline(tmp_path_factory.mktemp("zimage"))
    ref = ZImagePipeline.from_pretrained(path)
    ref.set_progress_bar_config(disable=True)
    return path, ref, load_zimage(path, height=H, width=W, max_sequence_length=MAX_SEQ)


def _rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def test_text_encoder_matches_encode_prompt(pipes):
    _, ref, ours = pipes
    enc = ours.text_encoder
    long = " ".join(["a big red dog on the beach"] * 10)  # truncated at MAX_SEQ tokens
    prompts = [PROMPTS[0], long]
    with torch.no_grad():
        want, neg = ref.encode_prompt(list(prompts), do_classifier_free_guidance=True,
                                      max_sequence_length=MAX_SEQ)
    emb, mask = enc.encode(prompts)
    assert emb.dtype == mask.dtype == np.float32
    assert emb.shape == (2, MAX_SEQ, TINY_ZIMAGE["text_width"]) and mask.shape == (2, MAX_SEQ)
    for i, w in enumerate(want):
        n = int(mask[i].sum())
        assert n == w.shape[0] and mask[i, :n].all() and not mask[i, n:].any()
        np.testing.assert_allclose(emb[i, :n], w.numpy(), rtol=0, atol=1e-6)
        assert not emb[i, n:].any()
    assert int(mask[1].sum()) == MAX_SEQ and int(mask[0].sum()) < MAX_SEQ
    e_neg, m_neg = enc.encode([""])
    np.testing.assert_allclose(e_neg[0, :int(m_neg.sum())], neg[0].numpy(), rtol=0, atol=1e-6)
    hits = enc.cache.hits
    np.testing.assert_array_equal(enc.encode([long, PROMPTS[0]])[0], emb[::-1])
    assert enc.cache.hits == hits + 2
    with pytest.raises(TypeError, match="single string"):
        enc.encode_uncached("a red cat")
    import copy

    from awm_jax.text.zimage import ZImageTextEncoder

    tok = copy.deepcopy(enc.tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        ZImageTextEncoder(tok, enc.text_encoder)


@pytest.mark.parametrize("g", [0.0, 2.0])
def test_euler_ode_matches_diffusers(pipes, g, monkeypatch):
    from diffusers.models.transformers import transformer_z_image as tz

    _, ref, ours = pipes
    monkeypatch.setattr(tz.TimestepEmbedder, "timestep_embedding", staticmethod(exact_timestep_embedding))
    assert ours.latent_shape == (16, H // 8, W // 8) and ours.shift == 3.0
    noise = np.random.RandomState(0).randn(len(PROMPTS), *ours.latent_shape).astype(np.float32)
    kw = dict(num_inference_steps=STEPS, guidance_scale=g, max_sequence_length=MAX_SEQ, height=H, width=W,
              negative_prompt=["blurry", ""] if g else None)
    with torch.no_grad():
        want = ref(list(PROMPTS), latents=torch.from_numpy(noise), output_type="latent", **kw).images.numpy()
    got = np.asarray(ours.sample_latents(PROMPTS, num_steps=STEPS, guidance_scale=g, latents=noise,
                                         negative_prompt=["blurry", ""] if g else None))
    assert got.shape == want.shape == (2, 16, H // 8, W // 8)
    err = _rel(got, want)
    print(f"[g={g}] {STEPS}-step Euler latents rel max err {err:.2e}")
    assert err <= LATENT_TOL * (1 + 2 * g)  # pos + g (pos - neg) scales a per-branch error by up to 1 + 2g
    assert float(np.abs(got - noise).max()) > 1e-2  # it moved
    if g == 0.0:
        with torch.no_grad():
            img = ref(list(PROMPTS), latents=torch.from_numpy(noise), output_type="np", **kw).images
        want_u8 = (img * 255).round().astype(np.uint8)
        diff = np.abs(np.asarray(ours.decode(got)).astype(int) - want_u8.astype(int))
        assert diff.shape == (2, H, W, 3) and diff.max() <= 1 and (diff > 0).mean() < 0.01


def _trainer_config(path):
    from awm_jax import config_lib

    c = config_lib.load_config("configs/toy.py")  # every declared key, then this test's values
    c.model.update(dict(kind="zimage", path=str(path / "transformer"), vae_path="",
                        text_encoder_paths=(str(path / "text_encoder"),), max_sequence_length=MAX_SEQ,
                        resolution=32, dtype="float32", param_dtype="float32"))
    return c


def test_load_zimage_pipeline_from_trainer_config(pipes):
    from awm_jax.models import get_family
    from awm_jax.pipelines import ZImageT2IPipeline, load_zimage_pipeline

    path, _, ours = pipes
    c = _trainer_config(path)
    fam = get_family("zimage")
    assert fam.input_problems(c) == []
    pipe = fam.load_pipeline(c)
    assert isinstance(pipe, ZImageT2IPipeline) and pipe.latent_shape == (16, 4, 4)
    np.testing.assert_array_equal(pipe.text_encoder.encode(["a red cat"])[0], ours.text_encoder.encode(
        ["a red cat"])[0])
    c.model.text_encoder_paths = ("", str(path / "text_encoder_2"))
    with pytest.raises(ValueError, match="text_encoder_paths entry #1"):
        load_zimage_pipeline(c)
    c.model.text_encoder_paths = ("",)
    c.model.resolution = 40
    with pytest.raises(ValueError, match="multiple of 16"):
        load_zimage_pipeline(c)


def test_sample_cli_and_convert_cli(pipes, tmp_path):
    from PIL import Image

    from awm_jax import sample
    from awm_jax.convert.io import SafetensorsReader
    from awm_jax.models import detect_family, load_transformer, transformer_params
    from tools.convert_weights import main

    path, _, _ = pipes
    out = tmp_path / "img.png"
    rc = sample.main(["--model", str(path), "--prompt", "a red cat", "--prompt", "a dog", "--steps", "2",
                      "--seed", "3", "--max-sequence-length", str(MAX_SEQ), "--height", "16", "--width", "32",
                      "--guidance-scale", "1.5", "--out", str(out)])
    assert rc == 0
    imgs = [np.asarray(Image.open(f)) for f in sorted(tmp_path.glob("img*.png"))]
    assert len(imgs) == 2 and imgs[0].shape == (16, 32, 3) and not np.array_equal(imgs[0], imgs[1])
    with pytest.raises(SystemExit):
        sample.main(["--model", str(path), "--prompt", "x", "--no-t5", "--out", str(out)])
    # converter CLI on the pipeline folder: bit-exact round trip; load_transformer recognises both folders
    assert detect_family(path).name == "zimage"
    assert main(["to-flax", "--model", "zimage", "--src", str(path), "--dst", str(tmp_path / "flax")]) == 0
    assert main(["to-diffusers", "--model", "zimage", "--src", str(tmp_path / "flax"),
                 "--dst", str(tmp_path / "back")]) == 0
    assert detect_family(tmp_path / "flax").name == "zimage"
    a = transformer_params(load_transformer(path))
    b = transformer_params(load_transformer(tmp_path / "flax"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with SafetensorsReader(path / "transformer") as r0, SafetensorsReader(tmp_path / "back") as r1:
        assert sorted(r0.keys()) == sorted(r1.keys())
        assert all(r0.get(k).tobytes() == r1.get(k).tobytes() for k in r0.keys())
    assert main(["to-flax", "--model", "flux", "--src", str(path), "--dst", str(tmp_path / "x")]) == 2
