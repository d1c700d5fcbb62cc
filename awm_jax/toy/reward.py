"""GenEval-style reward for the toy shapes world (registered lazily as ``"toy_geneval"``).

Training reward = GenEval partial score (REFERENCE.md section 6): the mean over clauses of
``max(0, 1 - |n - n_hat| / n)`` per included object, ``max(0, 1 - |n - n_colour| / n)`` per colour
requirement and 0/1 per position requirement. ``evaluate()`` = GenEval's strict correctness
(all include clauses with colour / position checks, and no excluded counts).

The rule functions ``strict_correct`` and ``partial_score`` are pure functions of detections in
the format ``{class: [{"box": (x0, y0, x1, y1), "score": float, "color": str}, ...]}``
(``awm_jax.toy.detector``), following the GenEval evaluation script's semantics: detections
below the confidence threshold (0.3; 0.9 for counting) are dropped, at most 16 per class are
kept (highest score first), a count clause takes the first ``count`` objects.
"""

from __future__ import annotations

import numpy as np

from awm_jax.toy.detector import detect
from awm_jax.toy.shapes import POSITION_MARGIN, relative_position

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16


def _validate(meta: dict, where: str) -> None:
    if not isinstance(meta, dict) or "include" not in meta or "tag" not in meta:
        raise ValueError(f"toy_geneval: metadata {where} needs keys 'tag' and 'include', got {meta!r}")
    for req in meta["include"]:
        if "class" not in req or "count" not in req:
            raise ValueError(f"toy_geneval: include clause {req!r} of {where} needs 'class' and 'count'")


def filter_detections(dets: dict, tag: str) -> dict:
    """Threshold (0.3, or 0.9 for counting), sort by score, keep at most 16 per class."""
    thr = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    out = {}
    for cls, objs in dets.items():
        kept = sorted((o for o in objs if o["score"] >= thr), key=lambda o: -o["score"])
        out[cls] = kept[:MAX_OBJECTS]
    return out


def _position_ok(objs, targets, rel, margin) -> bool:
    return all(rel in relative_position(o["box"], t["box"], margin) for o in objs for t in targets)


def strict_correct(dets: dict, meta: dict, margin: float = POSITION_MARGIN) -> tuple[bool, str]:
    """GenEval strict correctness of filtered detections against one metadata record."""
    correct, reasons, groups = True, [], []
    for req in meta["include"]:
        cls, n = req["class"], int(req["count"])
        found = dets.get(cls, [])[:n]
        matched = True
        if len(found) < n:
            matched = False
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        else:
            if req.get("color"):
                n_col = sum(o["color"] == req["color"] for o in found)
                if n_col < n:
                    matched = False
                    reasons.append(f"expected {req['color']} {cls}>={n}, found {n_col}")
            if req.get("position") and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                elif not _position_ok(found, groups[target], rel, margin):
                    matched = False
                    reasons.append(f"expected {cls} {rel} target")
        correct &= matched
        groups.append(found if matched else None)
    for req in meta.get("exclude", []) or []:
        if len(dets.get(req["class"], [])) >= int(req["count"]):
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}")
    return bool(correct), "; ".join(reasons)


def partial_score(dets: dict, meta: dict, margin: float = POSITION_MARGIN) -> float:
    """GenEval partial score in [0, 1]: the mean over count / colour / position clauses."""
    clauses, groups = [], []
    for req in meta["include"]:
        cls, n = req["class"], int(req["count"])
        objs = dets.get(cls, [])
        clauses.append(max(0.0, 1.0 - abs(n - len(objs)) / n))
        if req.get("color"):
            n_col = sum(o["color"] == req["color"] for o in objs)
            clauses.append(max(0.0, 1.0 - abs(n - n_col) / n))
        found = objs[:n]
        if req.get("position"):
            rel, target = req["position"]
            tgt = groups[target]
            ok = len(found) == n and bool(tgt) and _position_ok(found, tgt, rel, margin)
            clauses.append(1.0 if ok else 0.0)
        groups.append(found if len(found) == n else None)
    return float(np.mean(clauses))


class ToyGenEvalScorer:
    """Scorer ``(images uint8 (B,H,W,3), prompts, metadata) -> np.float32 (B,)`` for the toy world."""

    def __init__(self, position_margin: float = POSITION_MARGIN):
        """``position_margin``: GenEval's position threshold (0.1)."""
        self.margin = float(position_margin)

    def _check(self, images, prompts, metadata):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"toy_geneval: images must be uint8 (B,H,W,3), got {images.dtype} {images.shape}"
            )
        if not (len(images) == len(prompts) == len(metadata)):
            raise ValueError(
                f"toy_geneval: {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata"
            )
        for i, (p, m) in enumerate(zip(prompts, metadata)):
            _validate(m, f"#{i}")
            if m.get("prompt", p) != p:
                raise ValueError(f"toy_geneval: metadata #{i} is for {m['prompt']!r} but the prompt is {p!r}")
        return images

    def __call__(self, images, prompts, metadata) -> np.ndarray:
        """Training reward: the GenEval partial score per image."""
        images = self._check(images, prompts, metadata)
        return np.array(
            [
                partial_score(filter_detections(detect(im), m["tag"]), m, self.margin)
                for im, m in zip(images, metadata)
            ],
            np.float32,
        )

    def evaluate(self, images, prompts, metadata) -> dict:
        """Per-sample ``accuracy`` (strict 0/1), ``score`` (partial), ``tag`` and ``reason``."""
        images = self._check(images, prompts, metadata)
        acc, score, reasons = [], [], []
        for im, m in zip(images, metadata):
            dets = filter_detections(detect(im), m["tag"])
            ok, why = strict_correct(dets, m, self.margin)
            acc.append(float(ok))
            reasons.append(why)
            score.append(partial_score(dets, m, self.margin))
        return {
            "accuracy": np.array(acc, np.float32),
            "score": np.array(score, np.float32),
            "tag": [m["tag"] for m in metadata],
            "reason": reasons,
        }


def per_tag_accuracy(result: dict) -> dict[str, float]:
    """Mean strict accuracy per tag plus ``overall`` (the mean of the per-tag means, as GenEval)."""
    acc, tags = np.asarray(result["accuracy"]), list(result["tag"])
    out = {t: float(acc[[i for i, x in enumerate(tags) if x == t]].mean()) for t in sorted(set(tags))}
    out["overall"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out
