"""Registry, JPEG and multi rewards."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import awm_jax.rewards as rewards
from awm_jax.rewards.base import RewardConfigError


def _images(b=3, seed=0, h=32, w=40):
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def test_available_lists_builtins_and_lazy_toy():
    names = rewards.available()
    for n in ("ocr", "pickscore", "geneval", "aesthetic", "jpeg_compressibility",
              "jpeg_incompressibility", "multi", "toy_geneval"):
        assert n in names


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError) as e:
        rewards.get("no_such_reward")
    assert "no_such_reward" in str(e.value) and "pickscore" in str(e.value) and "toy_geneval" in str(e.value)


def test_import_is_lazy():
    code = ("import sys, awm_jax.rewards as r; r.available(); "
            "bad = [m for m in ('torch', 'transformers', 'awm_jax.toy.reward', 'rapidocr_onnxruntime') "
            "if m in sys.modules]; print(bad); assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_toy_geneval_resolves_lazily():
    assert rewards.resolve("toy_geneval").__name__ == "ToyGenEvalScorer"


def test_register_decorator_and_duplicate():
    @rewards.register("test_const_reward")
    class Const:
        def __init__(self, value=1.0):
            self.value = value

        def __call__(self, images, prompts, metadata=None):
            return np.full(len(prompts), self.value, np.float32)

    s = rewards.get("test_const_reward", value=2.5)
    np.testing.assert_array_equal(s(_images(2), ["a", "b"]), [2.5, 2.5])
    assert "test_const_reward" in rewards.available()
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("test_const_reward")(lambda: None)


def _kb(img, q=95):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=q)
    return len(buf.getvalue()) / 1000.0


def test_jpeg_formulas():
    imgs = _images(3)
    imgs[0] = 128  # flat image compresses well
    comp = rewards.get("jpeg_compressibility")(imgs, ["a"] * 3)
    incomp = rewards.get("jpeg_incompressibility")(imgs, ["a"] * 3)
    want = np.array([_kb(i) for i in imgs]) / 500
    np.testing.assert_allclose(incomp, want, rtol=1e-6)
    np.testing.assert_allclose(comp, -want, rtol=1e-6)
    assert comp.dtype == np.float32 and comp[0] > comp[1]
    q50 = rewards.get("jpeg_incompressibility", quality=50)(imgs, ["a"] * 3)
    np.testing.assert_allclose(q50, np.array([_kb(i, 50) for i in imgs]) / 500, rtol=1e-6)
    with pytest.raises(RewardConfigError, match="quality"):
        rewards.get("jpeg_compressibility", quality=0)


def test_scorer_input_validation():
    s = rewards.get("jpeg_compressibility")
    with pytest.raises(ValueError, match="uint8"):
        s(_images(2).astype(np.float32), ["a", "b"])
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        s(_images(2), ["a", "b", "c"])


def test_multi_weighted_sum():
    imgs = _images(4, seed=1)
    prompts = ["p"] * 4
    m = rewards.get("multi", components={
        "jpeg_compressibility": {"weight": 2.0},
        "inc": {"name": "jpeg_incompressibility", "weight": 0.5, "quality": 80},
        "const": {"weight": -1.0, "scorer": lambda i, p, md: np.arange(len(p), dtype=np.float32)},
    })
    comp = rewards.get("jpeg_compressibility")(imgs, prompts)
    inc = rewards.get("jpeg_incompressibility", quality=80)(imgs, prompts)
    np.testing.assert_allclose(m(imgs, prompts), 2 * comp + 0.5 * inc - np.arange(4), rtol=1e-5)
    parts = m.components(imgs, prompts)
    assert set(parts) == {"jpeg_compressibility", "inc", "const"}
    np.testing.assert_allclose(parts["inc"], inc)


def test_multi_config_errors():
    with pytest.raises(RewardConfigError, match="'a' needs a 'weight'"):
        rewards.get("multi", components={"a": {}})
    with pytest.raises(KeyError, match="nope"):
        rewards.get("multi", components={"nope": {"weight": 1.0}})
    bad = rewards.get("multi", components={"x": {"weight": 1.0, "scorer": lambda i, p, m: np.zeros(1)}})
    with pytest.raises(ValueError, match="component 'x' returned shape"):
        bad(_images(2), ["a", "b"])
