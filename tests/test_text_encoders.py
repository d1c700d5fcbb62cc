"""SD3 text encoders vs diffusers' StableDiffusion3Pipeline.encode_prompt; caches; vocabulary checks."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
from tiny_pipeline import TINY, build_tiny_sd3_pipeline

from awm_jax.text import CachedTextEncoder, SD3TextEncoders, TextEncoder, VocabularyError, check_vocab_size

LONG = " ".join(["a big red dog on the street next to an old blue car"] * 12)
PROMPTS = [
    "a photo of a cat",
    'a sign that says "hello world"',
    "two green apples and one yellow banana on a small table, sunny morning!",
    LONG,  # > 77 CLIP tokens and > 128 T5 tokens: truncated by both
    "Ünïcode café — 日本 ☃ ???",
    "",
]
CLIP_W = TINY["clip_l_width"] + TINY["clip_g_width"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3") / "pipe", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def enc(tiny_dir) -> SD3TextEncoders:
    return SD3TextEncoders.from_pipeline_dir(tiny_dir, max_sequence_length=128)


def _diffusers(pipe, prompts, max_sequence_length):
    with torch.no_grad():
        pe, ne, pp, npp = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=True,
            negative_prompt="", max_sequence_length=max_sequence_length,
        )
    return pe.numpy(), ne.numpy(), pp.numpy(), npp.numpy()


def _linked_copy(src: pathlib.Path, dst: pathlib.Path, skip=()) -> pathlib.Path:
    """A pipeline folder whose components are symlinks into ``src`` (minus ``skip``)."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name not in skip:
            (dst / p.name).symlink_to(p)
    return dst


def test_long_prompt_really_truncated(pipe):
    n_clip = len(pipe.tokenizer(LONG).input_ids)
    n_t5 = len(pipe.tokenizer_3(LONG).input_ids)
    assert n_clip > 77 and n_t5 > 128, (n_clip, n_t5)


@pytest.mark.parametrize("max_sequence_length", [128, 256])
def test_matches_diffusers_encode_prompt(tiny_dir, pipe, enc, max_sequence_length):
    e = enc if max_sequence_length == 128 else SD3TextEncoders.from_pipeline_dir(tiny_dir, 256)
    pe, ne, pp, npp = _diffusers(pipe, PROMPTS, max_sequence_length)
    emb, pooled = e.encode_uncached(PROMPTS)
    assert emb.dtype == np.float32 and pooled.dtype == np.float32
    assert emb.shape == (len(PROMPTS), 77 + max_sequence_length, TINY["t5_width"]) == pe.shape
    assert pooled.shape == (len(PROMPTS), TINY["pooled_dim"]) == pp.shape
    assert np.abs(emb - pe).max() <= 1e-6
    assert np.abs(pooled - pp).max() <= 1e-6
    # CFG negative (empty prompt) embeddings.
    nemb, npooled = e.encode([""] * len(PROMPTS))
    assert np.abs(nemb - ne).max() <= 1e-6 and np.abs(npooled - npp).max() <= 1e-6
    # The CLIP block is zero-padded to the T5 width, and the T5 block is not empty.
    assert np.all(emb[:, :77, CLIP_W:] == 0) and np.abs(emb[:, 77:]).max() > 0
    assert e.seq_len == 77 + max_sequence_length and e.embed_dim == TINY["t5_width"]
    assert e.pooled_dim == TINY["pooled_dim"]
    # Different prompts give different embeddings (the comparison above is not vacuous).
    assert np.abs(emb[0] - emb[1]).max() > 1e-3 and np.abs(pooled[0] - pooled[1]).max() > 1e-3


def test_truncation_ignores_tail(enc):
    emb, pooled = enc.encode_uncached([LONG, LONG + " purple horse in the forest at night"])
    np.testing.assert_array_equal(emb[0], emb[1])
    np.testing.assert_array_equal(pooled[0], pooled[1])


def test_missing_t5_matches_diffusers(tiny_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    # load_t5=False on the full folder, and a folder whose model_index.json has null T5 entries.
    skip = ("model_index.json", "text_encoder_3", "tokenizer_3")
    no_t5 = _linked_copy(tiny_dir, tmp_path / "no_t5", skip=skip)
    index = json.loads((tiny_dir / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (no_t5 / "model_index.json").write_text(json.dumps(index))
    ref = StableDiffusion3Pipeline.from_pretrained(str(tiny_dir), text_encoder_3=None, tokenizer_3=None)
    assert ref.text_encoder_3 is None
    pe, ne, pp, npp = _diffusers(ref, PROMPTS[:3], 128)
    for e in (SD3TextEncoders.from_pipeline_dir(tiny_dir, 128, load_t5=False),
              SD3TextEncoders.from_pipeline_dir(no_t5, 128)):
        assert e.text_encoder_3 is None
        emb, pooled = e.encode(PROMPTS[:3])
        assert emb.shape == pe.shape == (3, 77 + 128, TINY["t5_width"])
        assert np.abs(emb - pe).max() <= 1e-6 and np.abs(pooled - pp).max() <= 1e-6
        assert np.all(emb[:, 77:] == 0) and np.abs(emb[:, :77, :CLIP_W]).max() > 0


class _Counting:
    """Deterministic fake encoder recording every batch it is asked to encode."""

    fingerprint = "counting-v1"

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        codes = np.array([[len(p), sum(map(ord, p)) % 997] for p in prompts], np.float32)
        return np.repeat(codes[:, None, :], 3, axis=1), codes * 2


def test_lru_cache_semantics():
    fake = _Counting()
    assert isinstance(fake, TextEncoder)
    c = CachedTextEncoder(fake, max_entries=2, chunk_size=2)
    emb, pooled = c.encode(["a", "bb", "a", "ccc"])
    assert fake.calls == [["a", "bb"], ["ccc"]]  # duplicates encoded once, misses chunked by 2
    ref_emb, ref_pooled = fake.encode(["a", "bb", "a", "ccc"])
    np.testing.assert_array_equal(emb, ref_emb)
    np.testing.assert_array_equal(pooled, ref_pooled)
    assert (c.hits, c.misses) == (0, 4)
    # LRU holds 2: "a" was the least recently stored -> evicted; "bb" and "ccc" are hits.
    fake.calls.clear()
    c.encode(["ccc", "bb"])
    assert fake.calls == [] and (c.hits, c.misses) == (2, 4)
    c.encode(["a"])
    assert fake.calls == [["a"]]
    assert "bb" in c and "a" in c and "ccc" not in c and len(c) == 2  # "ccc" was the least recently used
    # Returned arrays are copies: mutating them does not corrupt the cache.
    out, _ = c.encode(["bb"])
    out[:] = -1
    np.testing.assert_array_equal(c.encode(["bb"])[0], fake.encode(["bb"])[0])
    # A bare function works too, and max_entries=0 disables the LRU.
    calls = []
    f = CachedTextEncoder(lambda ps: (calls.append(ps), fake.encode(ps))[1], max_entries=0)
    f.encode(["x"])
    f.encode(["x"])
    assert calls == [["x"], ["x"]]


def test_lru_bounded_in_bytes():
    fake = _Counting()
    entry = 3 * 2 * 4 + 2 * 4  # one prompt: embeds (3, 2) + pooled (2,) float32 = 32 bytes
    c = CachedTextEncoder(fake, max_entries=1000, max_bytes=2 * entry + 5)
    c.encode(["a", "bb", "ccc"])
    assert len(c) == 2 and c.nbytes == 2 * entry and "a" not in c  # the oldest went over the byte bound
    c.encode(["bb"])  # a hit refreshes "bb": "ccc" is now the least recently used
    c.encode(["dddd"])
    assert "bb" in c and "dddd" in c and "ccc" not in c and c.nbytes == 2 * entry
    tiny = CachedTextEncoder(fake, max_entries=10, max_bytes=entry - 1)  # an entry larger than the bound
    tiny.encode(["a"])
    assert len(tiny) == 0 and tiny.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        CachedTextEncoder(fake, max_bytes=-1)


def test_cache_bad_inputs_and_shapes():
    c = CachedTextEncoder(_Counting())
    with pytest.raises(TypeError, match="single string"):
        c.encode("a photo")
    with pytest.raises(ValueError, match="empty"):
        c.encode([])
    with pytest.raises(TypeError, match="prompt #1"):
        c.encode(["ok", 3])
    bad = CachedTextEncoder(lambda ps: (np.zeros((len(ps), 4)), np.zeros((len(ps), 2))))
    with pytest.raises(ValueError, match=r"\(B,T,D\)"):
        bad.encode(["a"])


def test_sd3_cache_hits_match_uncached(tiny_dir):
    e = SD3TextEncoders.from_pipeline_dir(tiny_dir, 128, cache_size=8)
    ref_emb, ref_pooled = e.encode_uncached(PROMPTS)
    e.encode(PROMPTS[:2])
    assert (e.cache.hits, e.cache.misses) == (0, 2)
    emb, pooled = e.encode(PROMPTS)  # mixed: 2 hits, 4 misses
    assert (e.cache.hits, e.cache.misses) == (2, 6)
    assert np.abs(emb - ref_emb).max() <= 1e-6 and np.abs(pooled - ref_pooled).max() <= 1e-6

    def boom(prompts):
        raise AssertionError(f"cache miss for {prompts}")

    e.cache._encode_fn = boom  # everything must now come from the cache
    emb2, pooled2 = e.encode(list(reversed(PROMPTS)))
    np.testing.assert_array_equal(emb2, emb[::-1])
    np.testing.assert_array_equal(pooled2, pooled[::-1])


def test_disk_cache_round_trip(tiny_dir, tmp_path):
    cache_dir = tmp_path / "emb"
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[0]]
    e1 = SD3TextEncoders.from_pipeline_dir(tiny_dir, 128)
    path = e1.load_prompt_set(prompts, cache_dir)
    assert path.exists() and path.parent == cache_dir and path.suffix == ".npz"
    ref_emb, ref_pooled = e1.encode_uncached(prompts)

    # A fresh encoder with the same model + settings finds the file and never runs the models.
    e2 = SD3TextEncoders.from_pipeline_dir(tiny_dir, 128, cache_size=0)
    assert e2.fingerprint == e1.fingerprint

    def boom(prompts):
        raise AssertionError("disk cache not used")

    e2.cache._encode_fn = boom
    assert e2.load_prompt_set(prompts, cache_dir) == path
    emb, pooled = e2.encode(prompts)
    assert np.abs(emb - ref_emb).max() <= 1e-6 and np.abs(pooled - ref_pooled).max() <= 1e-6
    assert e2.cache.hits == len(prompts)

    # Other settings or another prompt list -> another file.
    e3 = SD3TextEncoders.from_pipeline_dir(tiny_dir, 64)
    assert e3.fingerprint != e1.fingerprint
    assert e3.load_prompt_set(prompts, cache_dir) != path
    assert e1.load_prompt_set(prompts[:1], cache_dir) != path
    assert len(list(cache_dir.glob("*.npz"))) == 3

    # A file whose content does not match its name fails loudly.
    other = e1.cache.load_prompt_set(prompts[:1], cache_dir)
    shutil.copy(other, path)
    with pytest.raises(ValueError, match="different prompt list"):
        e2.load_prompt_set(prompts, cache_dir)
    with pytest.raises(ValueError, match="fingerprint"):
        CachedTextEncoder(lambda ps: None).load_prompt_set(["a"], cache_dir)


@pytest.mark.parametrize("component", ["tokenizer", "tokenizer_2", "tokenizer_3"])
def test_near_empty_tokenizer_fails_loudly(tiny_dir, tmp_path, component):
    broken = _linked_copy(tiny_dir, tmp_path / "broken", skip=(component,))
    shutil.copytree(tiny_dir / component, broken / component)
    (broken / component / "tokenizer.json").unlink()  # an offline load now silently gives ~no vocab
    with pytest.raises(VocabularyError) as err:
        SD3TextEncoders.from_pipeline_dir(broken, 128)
    msg = str(err.value)
    assert str(broken / component) in msg and "only" in msg
    # Sizes are named: tokenizer size and the model's vocab size.
    te = "text_encoder" + component[len("tokenizer"):]
    vocab = json.loads((tiny_dir / te / "config.json").read_text())["vocab_size"]
    assert str(vocab) in msg


def test_check_vocab_size_bounds():
    check_vocab_size(32100, 32128, "/x")  # the real T5 pair passes
    with pytest.raises(VocabularyError, match=r"/m/tok has only 3 tokens .* 49408"):
        check_vocab_size(3, 49408, "/m/tok")
    with pytest.raises(VocabularyError, match="out of range"):
        check_vocab_size(50000, 49408, "/m/tok")


def test_bad_pipeline_dirs(tiny_dir, tmp_path, enc):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SD3TextEncoders.from_pipeline_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        SD3TextEncoders.from_pipeline_dir(tmp_path / "empty")
    no_te2 = _linked_copy(tiny_dir, tmp_path / "no_te2", skip=("text_encoder_2",))
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        SD3TextEncoders.from_pipeline_dir(no_te2)
    with pytest.raises(TypeError, match="single string"):
        enc.encode_uncached("a cat")


def test_tiny_pipeline_runs_and_is_deterministic(tiny_dir, pipe, tmp_path):
    from safetensors.torch import load_file

    out = pipe(
        prompt=["a photo of a cat"], height=16, width=16, num_inference_steps=2, guidance_scale=2.0,
        max_sequence_length=16, output_type="np", generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()
    assert pipe.vae_scale_factor == TINY["vae_scale_factor"]
    assert pipe.transformer.config.pooled_projection_dim == TINY["pooled_dim"]
    again = build_tiny_sd3_pipeline(tmp_path / "again", seed=0)
    files = [("transformer", "diffusion_pytorch_model.safetensors"), ("text_encoder_3", "model.safetensors")]
    for sub, fname in files:
        a, b = load_file(tiny_dir / sub / fname), load_file(again / sub / fname)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_dir / "tokenizer_3" / "tokenizer.json").read_text() == (
        again / "tokenizer_3" / "tokenizer.json"
    ).read_text()
