"""OCR reward: the formula, and the real engine on text rendered from the OCR test prompts."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from awm_jax.rewards import get
from awm_jax.rewards.base import RewardConfigError
from awm_jax.rewards.ocr import ocr_reward, ocr_target

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
N_PROMPTS = 16


def _font(size):
    try:
        return ImageFont.truetype(FONT, size)
    except OSError:
        return ImageFont.load_default(size=size)


def render(text: str, size: int = 512) -> np.ndarray:
    """Black text on white, the largest font size (<= 56) whose line fits in the image width."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for fs in range(56, 11, -2):
        font = _font(fs)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        if x1 - x0 <= size - 40:
            break
    draw.text(((size - (x1 - x0)) // 2 - x0, (size - (y1 - y0)) // 2 - y0), text, fill="black", font=font)
    return np.asarray(img)


@pytest.fixture(scope="module")
def prompts(prompt_set):
    path, _ = prompt_set("ocr_test")  # the public set where present, else the project's sample
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln.count('"') >= 2]
    assert len(lines) >= N_PROMPTS
    step = len(lines) // N_PROMPTS  # spread over the file
    return lines[::step][:N_PROMPTS]


@pytest.fixture(scope="module")
def scorer():
    return get("ocr", det_limit_side_len=512, det_limit_type="max")


def test_target_extraction():
    assert ocr_target('a sign reading "Hello World" and "other"') == "Hello World"
    with pytest.raises(ValueError, match="no double-quoted"):
        ocr_target("no quotes here")
    with pytest.raises(ValueError, match="empty quoted"):
        ocr_target('empty " " quotes')


def test_formula():
    assert ocr_reward("xx HELLO world yy", "Hello World") == 1.0  # substring after normalisation
    assert ocr_reward("", "Hello") == 0.0
    assert ocr_reward("Hallo", "Hello") == pytest.approx(1 - 1 / 5)
    assert ocr_reward("a completely different long text", "abc") == 0.0  # distance capped at len
    assert ocr_reward("helo", "hello") == pytest.approx(0.8)


def test_correct_text_scores_high(scorer, prompts):
    imgs = np.stack([render(ocr_target(p)) for p in prompts])
    r = scorer(imgs, prompts)
    assert r.shape == (N_PROMPTS,) and r.dtype == np.float32
    assert r.mean() >= 0.9, list(zip(r.tolist(), [ocr_target(p) for p in prompts]))


def test_blank_images_score_low(scorer, prompts):
    imgs = np.full((4, 512, 512, 3), 255, np.uint8)
    imgs[2:] = 90
    r = scorer(imgs, prompts[:4])
    assert r.mean() <= 0.1


def test_misspelling_gets_partial_credit(scorer):
    prompts = ['A shop sign reading "Fresh Bakery Daily" above the door',
               'A poster that says "Welcome Home Friends" in bold letters']
    wrong = ["Frosh Bakary Daily", "Welcome Hame Fiends"]
    r = scorer(np.stack([render(t) for t in wrong]), prompts)
    assert np.all(r > 0.0) and np.all(r < 1.0), r
    assert r.mean() > 0.6


def test_default_engine_reads_text():
    s = get("ocr")
    r = s(render("Forever Yours")[None], ['a ring engraved "Forever Yours"'])
    assert r[0] >= 0.9


def test_bad_model_path_names_it(tmp_path):
    bad = tmp_path / "missing_det.onnx"
    with pytest.raises(RewardConfigError, match="missing_det.onnx"):
        get("ocr", det_model_path=str(bad))
    with pytest.raises(RewardConfigError, match="det_limit_type"):
        get("ocr", det_limit_type="middle")
