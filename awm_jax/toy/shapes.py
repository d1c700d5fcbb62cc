"""The toy shapes world: GenEval-style prompts, metadata and a deterministic procedural renderer.

Images are small RGB ``uint8`` arrays (``IMAGE_SIZE`` x ``IMAGE_SIZE``, default 32) of flat-coloured
circles, squares and triangles on a black background. Objects never touch (a gap of at least
``GAP`` pixels between bounding boxes), so a colour segmentation + connected components detector
(``awm_jax.toy.detector``) recovers them exactly.

Prompts follow GenEval's templates and its JSONL metadata schema
(``{"tag", "include": [{"class", "count", "color"?, "position"?}], "exclude", "prompt"}``) for the six
tags ``single_object, two_object, counting, colors, position, color_attr``. ``prompt_split("train")``
and ``prompt_split("heldout")`` are deterministic and disjoint for every tag except ``single_object``
(only three prompts exist, they are in both): the held-out split holds unseen *combinations* of
words that all occur in training.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

# GenEval's position rule (one implementation, shared with the reward); re-exported as toy.shapes names
from awm_jax.rewards.geneval_rules import POSITION_MARGIN, relative_position  # noqa: F401

IMAGE_SIZE = 32
GAP = 2  # minimum empty pixels between two objects' bounding boxes
BACKGROUND = (0, 0, 0)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 70, 240),
    "yellow": (240, 220, 30),
    "purple": (170, 40, 220),
}
CLASSES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HALF_SIZES = (3, 4, 5)  # object bounding boxes are (2 h + 1) pixels wide
HELDOUT_FRACTION = 0.25


def _meta(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict:
    return {"tag": tag, "include": include, "exclude": exclude or [], "prompt": prompt}


def all_prompts(tag: str) -> list[dict]:
    """Every metadata record of one tag, in a fixed order."""
    out = []
    if tag == "single_object":
        for c in CLASSES:
            out.append(_meta(tag, [{"class": c, "count": 1}], f"a photo of a {c}"))
    elif tag == "two_object":
        for a in CLASSES:
            for b in CLASSES:
                if a != b:
                    inc = [{"class": a, "count": 1}, {"class": b, "count": 1}]
                    out.append(_meta(tag, inc, f"a photo of a {a} and a {b}"))
    elif tag == "counting":
        for n, word in NUMBERS.items():
            for c in CLASSES:
                out.append(
                    _meta(
                        tag,
                        [{"class": c, "count": n}],
                        f"a photo of {word} {PLURALS[c]}",
                        exclude=[{"class": c, "count": n + 1}],
                    )
                )
    elif tag == "colors":
        for col in COLORS:
            for c in CLASSES:
                out.append(_meta(tag, [{"class": c, "count": 1, "color": col}], f"a photo of a {col} {c}"))
    elif tag == "position":
        for a in CLASSES:
            for b in CLASSES:
                if a == b:
                    continue
                for rel in RELATIONS:
                    inc = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]
                    out.append(_meta(tag, inc, f"a photo of a {a} {rel} a {b}"))
    elif tag == "color_attr":
        for ca in COLORS:
            for a in CLASSES:
                for cb in COLORS:
                    for b in CLASSES:
                        if a == b or ca == cb:
                            continue
                        inc = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
                        out.append(_meta(tag, inc, f"a photo of a {ca} {a} and a {cb} {b}"))
    else:
        raise ValueError(f"unknown toy tag {tag!r}; valid tags: {TAGS}")
    return out


def _heldout(prompt: str) -> bool:
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    return (h % 10_000) < HELDOUT_FRACTION * 10_000


def prompt_split(split: str, tags: tuple[str, ...] = TAGS, per_tag: int | str | None = None) -> list[dict]:
    """Deterministic metadata list for ``split`` in {"train", "heldout", "all"}.

    A prompt is held out iff a hash of its text falls in the first quarter; ``single_object``
    prompts are in both splits. Every tag keeps at least one prompt on each side.

    ``per_tag`` balances the tags (the splits are dominated by ``color_attr``: 92 of 134 train
    prompts): each tag's records are repeated cyclically, or cut, to exactly ``per_tag`` records;
    ``"balanced"`` means the size of the largest tag. ``None`` keeps the natural split.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"unknown toy split {split!r}; valid: 'train', 'heldout', 'all'")
    by_tag = []
    for tag in tags:
        recs = all_prompts(tag)
        if not (split == "all" or tag == "single_object"):
            want_held = split == "heldout"
            recs = [r for r in recs if _heldout(r["prompt"]) == want_held]
        by_tag.append(recs)
    if per_tag is None:
        return [r for recs in by_tag for r in recs]
    if per_tag == "balanced":
        per_tag = max(len(r) for r in by_tag)
    if not isinstance(per_tag, int) or isinstance(per_tag, bool) or per_tag < 1:
        raise ValueError(f"toy split per_tag must be a positive int or 'balanced', got {per_tag!r}")
    return [dict(recs[i % len(recs)]) for recs in by_tag for i in range(per_tag)]


def parse_split_spec(spec: str) -> list[dict]:
    """Records of a split spec ``"<split>"`` or ``"<split>@<n>"`` / ``"<split>@balanced"`` (per-tag count)."""
    split, _, per_tag = spec.partition("@")
    if not per_tag:
        return prompt_split(split)
    if per_tag != "balanced":
        if not per_tag.isdigit() or int(per_tag) < 1:
            raise ValueError(
                f"toy split spec {spec!r}: the part after '@' must be a positive int or 'balanced'"
            )
        per_tag = int(per_tag)
    return prompt_split(split, per_tag=per_tag)


def write_jsonl(records: list[dict], path) -> None:
    """Write metadata records as GenEval-style JSONL (one JSON object per line)."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# ----------------------------------------------------------------------------------------- rendering


def shape_mask(cls: str, cx: int, cy: int, h: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of one object centred at pixel (cx, cy) with half-size h."""
    yy, xx = np.mgrid[0:size, 0:size]
    dx, dy = xx - cx, yy - cy
    if cls == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if cls == "circle":
        return dx * dx + dy * dy <= (h + 0.5) ** 2
    if cls == "triangle":  # upright isosceles: apex at the top row, base on the bottom row
        frac = (dy + h) / (2 * h)  # 0 at the apex row, 1 at the base row
        return (np.abs(dy) <= h) & (np.abs(dx) <= frac * h + 0.5)
    raise ValueError(f"unknown toy class {cls!r}; valid: {CLASSES}")


def render(objects: list[dict], size: int = IMAGE_SIZE) -> np.ndarray:
    """Render objects ``[{class, color, cx, cy, h}]`` into a (size, size, 3) uint8 image."""
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    for o in objects:
        if o["color"] not in COLORS:
            raise ValueError(f"unknown toy colour {o['color']!r}; valid: {tuple(COLORS)}")
        img[shape_mask(o["class"], o["cx"], o["cy"], o["h"], size)] = COLORS[o["color"]]
    return img


def object_box(o: dict) -> tuple[int, int, int, int]:
    """Inclusive-exclusive pixel box (x0, y0, x1, y1) of a placed object."""
    return (o["cx"] - o["h"], o["cy"] - o["h"], o["cx"] + o["h"] + 1, o["cy"] + o["h"] + 1)


def _separated(box, boxes) -> bool:
    return all(
        box[2] + GAP <= b[0] or b[2] + GAP <= box[0] or box[3] + GAP <= b[1] or b[3] + GAP <= box[1]
        for b in boxes
    )


def _place(
    rng: np.random.Generator, specs: list[dict], relation=None, size: int = IMAGE_SIZE, tries: int = 500
) -> list[dict]:
    """Place objects (class, color) without overlap; ``relation=(i, rel, j)`` constrains i relative to j."""
    for _ in range(tries):
        placed = []
        for s in specs:
            h = int(rng.choice(HALF_SIZES))
            cx, cy = int(rng.integers(h, size - h)), int(rng.integers(h, size - h))
            o = dict(s, cx=cx, cy=cy, h=h)
            if not _separated(object_box(o), [object_box(p) for p in placed]):
                break
            placed.append(o)
        else:
            if relation is not None:
                i, rel, j = relation
                rels = relative_position(object_box(placed[i]), object_box(placed[j]))
                if rels != {rel}:  # unambiguous: exactly the wanted relation
                    continue
            return placed
    raise RuntimeError(f"could not place {specs} with relation {relation} in {tries} tries")


def scene_for(meta: dict, rng: np.random.Generator) -> list[dict]:
    """Random object layout that satisfies a metadata record exactly (free colours are random)."""
    specs, relation = [], None
    colors = list(COLORS)
    for k, req in enumerate(meta["include"]):
        start = len(specs)
        for _ in range(int(req["count"])):
            col = req.get("color") or colors[int(rng.integers(len(colors)))]
            specs.append({"class": req["class"], "color": col})
        if req.get("position"):
            rel, target = req["position"]
            if req["count"] != 1 or meta["include"][target]["count"] != 1:
                raise ValueError(f"position clauses need count 1: {meta['prompt']!r}")
            relation = (start, rel, target)  # include items are count 1, so index = object index
            if k != 1 or target != 0:
                raise ValueError(f"unsupported position layout in {meta['prompt']!r}")
    return _place(rng, specs, relation)


def render_meta(meta: dict, seed: int) -> tuple[np.ndarray, list[dict]]:
    """Deterministic (image, objects) for a metadata record and an integer seed."""
    rng = np.random.default_rng(
        [seed, int.from_bytes(hashlib.sha256(meta["prompt"].encode()).digest()[:4], "little")]
    )
    objs = scene_for(meta, rng)
    return render(objs), objs


def sample_batch(
    rng: np.random.Generator, records: list[dict], batch: int, by_tag: bool = True
) -> tuple[np.ndarray, list[dict]]:
    """A batch of (images (B,S,S,3) uint8, metadata) drawn from ``records``.

    ``by_tag``: draw a tag uniformly, then a prompt of that tag (else prompts uniformly).
    """
    if by_tag:
        groups: dict[str, list[dict]] = {}
        for r in records:
            groups.setdefault(r["tag"], []).append(r)
        keys = sorted(groups)
        metas = []
        for t in rng.integers(0, len(keys), size=batch):
            g = groups[keys[t]]
            metas.append(g[int(rng.integers(len(g)))])
    else:
        metas = [records[i] for i in rng.integers(0, len(records), size=batch)]
    imgs = np.stack([render(scene_for(m, rng)) for m in metas])
    return imgs, metas


def random_scene(rng: np.random.Generator, max_objects: int = 4) -> list[dict]:
    """A free random scene (1..max_objects objects of random class/colour), for detector tests."""
    n = int(rng.integers(1, max_objects + 1))
    specs = [
        {"class": CLASSES[int(rng.integers(3))], "color": list(COLORS)[int(rng.integers(len(COLORS)))]}
        for _ in range(n)
    ]
    return _place(rng, specs)
