"""OCR reward (REFERENCE.md section 6), with the offline ``rapidocr-onnxruntime`` engine.

target = the first double-quoted span of the prompt; recognised and target text are lower-cased
with all spaces removed; ``dist = 0`` if the target is a substring of the recognised text, else
the Levenshtein distance, capped at ``len(target)``; ``r = 1 - dist / len(target)``. The
recognised text is the concatenation of every detected line whose confidence is above
``min_confidence`` (the reference keeps lines with confidence > 0).
"""

from __future__ import annotations

import os
from typing import Any

import Levenshtein
import numpy as np

from awm_jax.rewards.base import RewardConfigError, check_batch, check_file


def ocr_target(prompt: str) -> str:
    """The first double-quoted span of ``prompt``; raises if there is none or it is empty."""
    parts = prompt.split('"')
    if len(parts) < 3:
        raise ValueError(f'ocr: prompt has no double-quoted target text: {prompt!r}')
    target = parts[1]
    if not target.replace(" ", ""):
        raise ValueError(f"ocr: empty quoted target text in prompt {prompt!r}")
    return target


def normalize_text(text: str) -> str:
    """Lower-case and remove spaces (the reference normalisation)."""
    return text.replace(" ", "").lower()


def ocr_reward(recognized: str, target: str) -> float:
    """``1 - min(dist, len(t)) / len(t)`` on normalised text; dist 0 when ``t`` is a substring."""
    rec, tgt = normalize_text(recognized), normalize_text(target)
    if not tgt:
        raise ValueError(f"ocr: empty target text {target!r}")
    dist = 0 if tgt in rec else min(Levenshtein.distance(rec, tgt), len(tgt))
    return 1.0 - dist / len(tgt)


class OCRScorer:
    """OCR reward. Config: optional ``det_model_path`` / ``rec_model_path`` / ``cls_model_path``
    (ONNX files; default: the models shipped in the rapidocr wheel), ``min_confidence`` (0.0),
    ``use_angle_cls`` (False, as the reference), ``det_limit_side_len`` / ``det_limit_type``
    (the detector's resize rule; rapidocr's default 736 / "min" upsamples 512 px images, 512 /
    "max" keeps them and is about twice as fast on CPU)."""

    def __init__(
        self,
        det_model_path: str | None = None,
        rec_model_path: str | None = None,
        cls_model_path: str | None = None,
        min_confidence: float = 0.0,
        use_angle_cls: bool = False,
        intra_op_num_threads: int = -1,
        det_limit_side_len: int = 736,
        det_limit_type: str = "min",
    ):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:  # pragma: no cover - installed in this project
            raise RewardConfigError("ocr: the 'rapidocr-onnxruntime' package is not installed") from e
        if det_limit_type not in ("min", "max"):
            raise RewardConfigError(f"ocr: det_limit_type must be 'min' or 'max', got {det_limit_type!r}")
        kwargs: dict[str, Any] = {"intra_op_num_threads": intra_op_num_threads,
                                  "det_limit_side_len": int(det_limit_side_len),
                                  "det_limit_type": det_limit_type}
        for key, path in (("det_model_path", det_model_path), ("rec_model_path", rec_model_path),
                          ("cls_model_path", cls_model_path)):
            if path is not None:
                kwargs[key] = check_file(path, f"ocr {key}")
        self.min_confidence = float(min_confidence)
        self.use_angle_cls = bool(use_angle_cls)
        self.engine = RapidOCR(**kwargs)
        self.engine.text_score = self.min_confidence  # rapidocr drops lines below 0.5 by default

    def recognize(self, image: np.ndarray) -> str:
        """Concatenated text of every line above ``min_confidence`` in one uint8 (H,W,3) RGB image."""
        bgr = np.ascontiguousarray(image[..., ::-1])  # rapidocr follows the OpenCV (BGR) convention
        result, _ = self.engine(bgr, use_cls=self.use_angle_cls)
        if not result:
            return ""
        return "".join(str(line[1]) for line in result if float(line[2]) > self.min_confidence)

    def __call__(self, images, prompts, metadata=None) -> np.ndarray:
        """OCR reward per image; see the module docstring."""
        images, prompts, _ = check_batch(images, prompts, metadata, "ocr")
        targets = [ocr_target(p) for p in prompts]
        out = np.empty(len(prompts), np.float32)
        for i, (img, tgt) in enumerate(zip(images, targets)):
            out[i] = ocr_reward(self.recognize(img), tgt)
        return out


def _model_dir() -> str:
    """Folder of the ONNX models shipped in the rapidocr wheel (for documentation / tests)."""
    import rapidocr_onnxruntime

    return os.path.join(os.path.dirname(rapidocr_onnxruntime.__file__), "models")
