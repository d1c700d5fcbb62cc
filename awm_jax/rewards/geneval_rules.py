"""GenEval rules as pure functions of detections (no models here).

Semantics checked against the GenEval evaluation script (github djghosh13/geneval,
``evaluation/evaluate_images.py``) and the Flow-GRPO reward server (github yifan123/reward-server,
``reward_server/gen_eval.py``); this is an independent implementation.

Detections: ``{class_name: [{"box": (x0, y0, x1, y1), "score": float, "color": str | None}, ...]}``
(pixel boxes, y down). ``filter_detections`` keeps the objects with score *strictly above* the
threshold (0.3; 0.9 when the prompt's tag is ``counting``), highest score first, at most 16 per class.

Three verdicts per image and metadata record (``tag``, ``include`` [{class, count, color?,
position? = [relation, include-index]}], ``exclude`` [{class, count}]):

- ``geneval_correct`` -- the GenEval evaluation metric: every include clause sees the first
  ``count`` objects of its class (at least ``count`` needed); colour: all of those have the colour;
  position: every one of them stands in ``relation`` to every object of the referenced (matched)
  clause; exclude: fewer than ``count`` objects of the class. Per-tag means of this are the score.
- ``reward_score`` -> ``(exact_correct, partial)`` -- the training reward of the reward server:
  per include clause ``1 - |n - n_found| / n`` over *all* kept objects (unclamped: over-generation
  can make it negative); if ``n_found != n`` a clause with colour or position adds a 0; else colour
  adds ``1 - |n - n_colour| / n``, and (if the colour matched) position adds 1 or 0;
  ``partial = mean`` of the entries. ``exact_correct`` needs exact counts/colours/positions and
  ignores ``exclude``. ``legacy_position=True`` reproduces a quirk of the server, which on a failed
  position check appends both 0 and 1.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_MARGIN = 0.1


def validate_metadata(meta: Any, class_names=None, where: str = "") -> None:
    """Raise ``ValueError`` naming the record if it is not a valid GenEval metadata dict."""
    if not isinstance(meta, dict) or "include" not in meta or "tag" not in meta:
        raise ValueError(f"geneval: metadata {where} needs keys 'tag' and 'include', got {meta!r}")
    for i, req in enumerate(meta["include"]):
        if "class" not in req or "count" not in req or int(req["count"]) < 1:
            raise ValueError(f"geneval: include clause {req!r} of {where} needs 'class' and 'count' >= 1")
        if class_names is not None and req["class"] not in class_names:
            raise ValueError(f"geneval: class {req['class']!r} of {where} is not a detector class")
        if "position" in req:
            rel, idx = req["position"]
            if rel not in RELATIONS or not 0 <= int(idx) < i:
                raise ValueError(f"geneval: bad position {req['position']!r} in {where}: relation must be "
                                 f"one of {RELATIONS} and refer to an earlier include clause")
    for req in meta.get("exclude", []):
        if "class" not in req or "count" not in req:
            raise ValueError(f"geneval: exclude clause {req!r} of {where} needs 'class' and 'count'")


def filter_detections(dets: dict, tag: str, threshold: float = THRESHOLD,
                      counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS) -> dict:
    """Keep score > threshold (counting_threshold for tag 'counting'), sort by score, cap per class."""
    thr = counting_threshold if tag == "counting" else threshold
    out = {}
    for cls, objs in dets.items():
        kept = sorted((o for o in objs if float(o["score"]) > thr), key=lambda o: -float(o["score"]))
        if kept:
            out[cls] = kept[:max_objects]
    return out


def relative_position(box_a, box_b, margin: float = POSITION_MARGIN) -> set[str]:
    """Relations of box A relative to box B ('left of', 'right of', 'above', 'below').

    The centre offset is shrunk per axis by ``margin * (size_a + size_b)`` (not below zero);
    a relation holds when the shrunk offset, divided by the full offset's length, exceeds 0.5
    in that direction. Boxes that overlap too much have no relation.
    """
    a, b = np.asarray(box_a, np.float64)[:4], np.asarray(box_b, np.float64)[:4]
    ca, cb = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    size_a, size_b = np.abs(a[2:] - a[:2]), np.abs(b[2:] - b[:2])
    off = ca - cb
    shrunk = np.maximum(np.abs(off) - margin * (size_a + size_b), 0.0) * np.sign(off)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(off)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def _position_ok(objs, targets, rel, margin) -> bool:
    return all(rel in relative_position(o["box"], t["box"], margin) for o in objs for t in targets)


def geneval_correct(dets: dict, meta: dict, margin: float = POSITION_MARGIN) -> tuple[bool, str]:
    """GenEval evaluation verdict on filtered detections (see module docstring) and the reasons."""
    correct, reasons, groups = True, [], []
    for req in meta["include"]:
        cls, n = req["class"], int(req["count"])
        found = dets.get(cls, [])[:n]
        matched = len(found) >= n
        if not matched:
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        else:
            if "color" in req:
                n_col = sum(o.get("color") == req["color"] for o in found)
                if n_col < n:
                    matched = False
                    reasons.append(f"expected {req['color']} {cls}>={n}, found {n_col}")
            if "position" in req and matched:
                rel, idx = req["position"]
                if groups[idx] is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                elif not _position_ok(found, groups[idx], rel, margin):
                    matched = False
                    reasons.append(f"expected {cls} {rel} target")
        correct &= matched
        groups.append(found if matched else None)
    for req in meta.get("exclude", []):
        n_ex = len(dets.get(req["class"], []))
        if n_ex >= int(req["count"]):
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n_ex}")
    return bool(correct), "\n".join(reasons)


def reward_score(dets: dict, meta: dict, margin: float = POSITION_MARGIN,
                 legacy_position: bool = False) -> tuple[bool, float]:
    """Training reward ``(exact_correct, partial score)`` on filtered detections (module docstring)."""
    correct, entries, groups = True, [], []
    for req in meta["include"]:
        cls, n = req["class"], int(req["count"])
        found = dets.get(cls, [])
        entries.append(1.0 - abs(n - len(found)) / n)
        matched = len(found) == n
        if not matched:
            if "color" in req or "position" in req:
                entries.append(0.0)
        else:
            if "color" in req:
                n_col = sum(o.get("color") == req["color"] for o in found)
                entries.append(1.0 - abs(n - n_col) / n)
                matched = n_col == n
            if "position" in req and matched:
                rel, idx = req["position"]
                if groups[idx] is None:
                    matched = False
                    entries.append(0.0)
                elif _position_ok(found, groups[idx], rel, margin):
                    entries.append(1.0)
                else:
                    matched = False
                    entries.extend([0.0, 1.0] if legacy_position else [0.0])
        correct &= matched
        groups.append(found if matched else None)
    return bool(correct), float(np.mean(entries)) if entries else 0.0


def summarize(tags, accuracy) -> dict[str, float]:
    """Per-tag mean accuracy plus ``overall`` = mean over the tags present (GenEval's score)."""
    by_tag: dict[str, list[float]] = defaultdict(list)
    for t, a in zip(tags, np.asarray(accuracy, np.float64)):
        by_tag[t].append(float(a))
    out = {t: float(np.mean(v)) for t, v in sorted(by_tag.items())}
    if out:
        out["overall"] = float(np.mean(list(out.values())))
    return out
