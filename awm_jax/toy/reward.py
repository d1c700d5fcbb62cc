"""GenEval-style reward for the toy shapes world (registered lazily as ``"toy_geneval"``).

The toy detector (``awm_jax.toy.detector``) produces detections in the format of the pure GenEval
rules (``awm_jax.rewards.geneval_rules``: ``{class: [{"box", "score", "color"}, ...]}``), and the
same rules score them:

- training reward (``__call__``) = the GenEval partial score of the reward server
  (``geneval_rules.reward_score``: mean over count / colour / position clauses);
- ``evaluate()`` = GenEval's strict correctness (``geneval_rules.geneval_correct``), whose per-tag
  means (``per_tag_accuracy``) are the GenEval score.

Confidence: the toy detector reports every connected component with score 1.0, speckles included
(a real detector such as GenEval's Mask2Former does not fire on a few stray pixels).  Counted as
objects, speckles made the partial score (which counts *all* kept objects, unclamped) average
below the strict accuracy on the same images, so the training reward punished images the
evaluation accepts.  ``confidence`` therefore scores each component by its area relative to the
smallest object the world renders (``MIN_OBJECT_AREA``); GenEval's thresholds (0.3; 0.9 for
counting) then drop speckles and fragments for both the strict verdict and the partial score.
"""

from __future__ import annotations

import numpy as np

from awm_jax.deprecation import aliases as _deprecated_aliases
from awm_jax.rewards.geneval_rules import (
    POSITION_MARGIN,
    filter_detections,
    geneval_correct,
    reward_score,
    summarize,
    validate_metadata,
)
from awm_jax.toy.detector import MIN_AREA, detect
from awm_jax.toy.shapes import CLASSES, HALF_SIZES, shape_mask

__all__ = ["ToyGenEvalScorer", "confidence", "filter_detections", "per_tag_accuracy", "score_detections"]

# Pixel area of the smallest object the toy world renders (31: a triangle of half-size 3).
MIN_OBJECT_AREA = int(min(shape_mask(c, 16, 16, h).sum() for c in CLASSES for h in HALF_SIZES))


def confidence(area: int) -> float:
    """Detection score of a component: 0 at the detector's ``MIN_AREA``, 1 from ``MIN_OBJECT_AREA`` on."""
    return float(np.clip((area - MIN_AREA) / (MIN_OBJECT_AREA - MIN_AREA), 0.0, 1.0))


def rescore(dets: dict) -> dict:
    """Detections with ``score`` replaced by :func:`confidence` of their ``area``."""
    return {
        c: [dict(o, score=confidence(o["area"])) if "area" in o else o for o in objs]
        for c, objs in dets.items()
    }


def score_detections(dets: dict, meta: dict, margin: float = POSITION_MARGIN) -> tuple[bool, float, str]:
    """(strict GenEval verdict, partial training score, reasons) of raw detections for one record.

    Detections carrying an ``area`` are rescored with :func:`confidence` before GenEval's filter.
    """
    if any("area" in o for objs in dets.values() for o in objs):
        dets = rescore(dets)
    kept = filter_detections(dets, meta["tag"])
    ok, why = geneval_correct(kept, meta, margin)
    _, partial = reward_score(kept, meta, margin)
    return ok, partial, why


class ToyGenEvalScorer:
    """Scorer ``(images uint8 (B,H,W,3), prompts, metadata) -> np.float32 (B,)`` for the toy world."""

    def __init__(self, position_margin: float = POSITION_MARGIN, strict: bool = False):
        """``position_margin``: GenEval's position threshold (0.1). ``strict``: train on the evaluation's
        strict 0/1 verdict instead of the partial score (``--config.reward.kwargs.strict=true``; the
        reward-vs-metric experiment of the drift study in
        ``benchmarks/results/toy_awm_vs_flow_grpo_2026-12-06.md``)."""
        self.margin = float(position_margin)
        if not isinstance(strict, bool):
            raise ValueError(f"toy_geneval: strict must be true or false, got {strict!r}")
        self.strict = strict

    def _check(self, images, prompts, metadata):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"toy_geneval: images must be uint8 (B,H,W,3), got {images.dtype} {images.shape}"
            )
        if not (len(images) == len(prompts) == len(metadata)):
            raise ValueError(
                f"toy_geneval: {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata records"
            )
        for i, (p, m) in enumerate(zip(prompts, metadata)):
            validate_metadata(m, CLASSES, where=f"#{i} ({p!r})")
            if m.get("prompt", p) != p:
                raise ValueError(f"toy_geneval: metadata #{i} is for {m['prompt']!r} but the prompt is {p!r}")
        return images

    def __call__(self, images, prompts, metadata) -> np.ndarray:
        """Training reward: the GenEval partial score per image (``strict``: the 0/1 verdict)."""
        images = self._check(images, prompts, metadata)
        res = [score_detections(detect(im), m, self.margin) for im, m in zip(images, metadata)]
        return np.array([float(ok) if self.strict else partial for ok, partial, _ in res], np.float32)

    def evaluate(self, images, prompts, metadata) -> dict:
        """Per-sample ``accuracy`` (strict 0/1), ``score`` (partial), ``tag`` and ``reason``."""
        images = self._check(images, prompts, metadata)
        res = [score_detections(detect(im), m, self.margin) for im, m in zip(images, metadata)]
        return {
            "accuracy": np.array([float(r[0]) for r in res], np.float32),
            "score": np.array([r[1] for r in res], np.float32),
            "tag": [m["tag"] for m in metadata],
            "reason": [r[2] for r in res],
        }


def per_tag_accuracy(result: dict) -> dict[str, float]:
    """Mean strict accuracy per tag plus ``overall`` (the mean of the per-tag means, as GenEval)."""
    return summarize(result["tag"], result["accuracy"])


# deprecated aliases of names that moved (awm_jax/deprecation.py, CHANGELOG.md)
__getattr__ = _deprecated_aliases(__name__)
