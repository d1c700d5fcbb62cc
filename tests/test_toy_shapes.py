"""Toy shapes world: generator determinism, metadata schema, splits, detector accuracy."""

import json

import numpy as np
import pytest

from awm_jax.toy import detector, shapes


def test_metadata_schema_and_counts():
    recs = shapes.prompt_split("all")
    assert {r["tag"] for r in recs} == set(shapes.TAGS)
    for r in recs:
        assert set(r) == {"tag", "include", "exclude", "prompt"}
        assert r["prompt"].startswith("a photo of ")
        for req in r["include"]:
            assert set(req) <= {"class", "count", "color", "position"}
            assert req["class"] in shapes.CLASSES and req["count"] >= 1
            if "color" in req:
                assert req["color"] in shapes.COLORS
            if "position" in req:
                rel, idx = req["position"]
                assert rel in shapes.RELATIONS and 0 <= idx < len(r["include"])
        json.dumps(r)
    counting = [r for r in recs if r["tag"] == "counting"]
    assert all(
        r["exclude"] == [{"class": r["include"][0]["class"], "count": r["include"][0]["count"] + 1}]
        for r in counting
    )
    assert len({r["prompt"] for r in recs}) == len(recs)
    pos = next(r for r in recs if r["prompt"] == "a photo of a circle left of a square")
    assert pos["include"] == [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["left of", 0]},
    ]


def test_splits_deterministic_disjoint_and_cover_vocabulary():
    train, held = shapes.prompt_split("train"), shapes.prompt_split("heldout")
    assert train == shapes.prompt_split("train") and held == shapes.prompt_split("heldout")
    tp = {r["prompt"] for r in train}
    for tag in shapes.TAGS:
        h = [r["prompt"] for r in held if r["tag"] == tag]
        t = [r["prompt"] for r in train if r["tag"] == tag]
        assert h and t, tag
        if tag != "single_object":
            assert not set(h) & set(t), tag
    train_words = {w for p in tp for w in p.split()}
    assert {w for r in held for w in r["prompt"].split()} <= train_words
    with pytest.raises(ValueError, match="valid"):
        shapes.prompt_split("test")


def test_rendering_deterministic_from_seed(tmp_path):
    meta = shapes.prompt_split("all", ("color_attr",))[7]
    a, oa = shapes.render_meta(meta, seed=3)
    b, ob = shapes.render_meta(meta, seed=3)
    c, _ = shapes.render_meta(meta, seed=4)
    assert a.dtype == np.uint8 and a.shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)
    assert np.array_equal(a, b) and oa == ob and not np.array_equal(a, c)
    x1, _ = shapes.sample_batch(np.random.default_rng(5), shapes.prompt_split("train"), 8)
    x2, _ = shapes.sample_batch(np.random.default_rng(5), shapes.prompt_split("train"), 8)
    assert np.array_equal(x1, x2)
    shapes.write_jsonl([meta], tmp_path / "m.jsonl")
    assert json.loads((tmp_path / "m.jsonl").read_text()) == meta
    with pytest.raises(ValueError, match="unknown toy colour"):
        shapes.render([{"class": "circle", "color": "pink", "cx": 5, "cy": 5, "h": 3}])


def test_scenes_satisfy_their_metadata():
    rng = np.random.default_rng(0)
    for meta in shapes.prompt_split("all", ("position", "counting")):
        objs = shapes.scene_for(meta, rng)
        assert len(objs) == sum(r["count"] for r in meta["include"])
        if meta["tag"] == "position":
            rel = meta["include"][1]["position"][0]
            assert shapes.relative_position(shapes.object_box(objs[1]), shapes.object_box(objs[0])) == {rel}


def test_detector_recovers_random_scenes():
    rng = np.random.default_rng(1)
    exact = 0
    n = 200
    for _ in range(n):
        objs = shapes.random_scene(rng)
        dets = detector.detect(shapes.render(objs))
        got = sorted((c, d["color"], d["box"]) for c in dets for d in dets[c])
        want = sorted((o["class"], o["color"], shapes.object_box(o)) for o in objs)
        exact += got == want
    assert exact >= 0.99 * n


def test_detector_ignores_noise_and_rejects_bad_shapes():
    img = np.zeros((32, 32, 3), np.uint8)
    img[3, 3] = (230, 30, 30)  # one stray pixel
    img[10:20, 10:20] = (60, 60, 60)  # dark grey is background (far from every palette colour)
    assert all(v == [] for v in detector.detect(img).values())
    with pytest.raises(ValueError, match="shape"):
        detector.detect(np.zeros((32, 32), np.uint8))


def test_balanced_splits_and_specs():
    from awm_jax.data import PromptFileError, load_dataset

    held = shapes.prompt_split("heldout")
    bal = shapes.prompt_split("heldout", per_tag=5)
    assert [r["tag"] for r in bal] == [t for t in shapes.TAGS for _ in range(5)]
    for tag in shapes.TAGS:  # cyclic repeat of the tag's own held-out prompts, in order
        own = [r["prompt"] for r in held if r["tag"] == tag]
        got = [r["prompt"] for r in bal if r["tag"] == tag]
        assert got == [own[i % len(own)] for i in range(5)]
    n_max = max(sum(r["tag"] == t for r in shapes.prompt_split("train")) for t in shapes.TAGS)
    assert len(shapes.prompt_split("train", per_tag="balanced")) == 6 * n_max
    assert len(load_dataset("toy:heldout@24", "geneval")) == 144
    assert load_dataset("toy:train", "geneval").prompts == [r["prompt"] for r in shapes.prompt_split("train")]
    for bad in ("toy:heldout@0", "toy:heldout@x", "toy:nope"):
        with pytest.raises((PromptFileError, ValueError), match="toy"):
            load_dataset(bad, "geneval")
