"""Toy GenEval reward: partial (training) and strict (evaluation) scores per tag; toy text encoder."""

import numpy as np
import pytest
from flax import nnx

from awm_jax.toy import reward, shapes, text


def _first(tag):
    return shapes.prompt_split("all", (tag,))[0]


def _img(objs):
    return shapes.render(objs)[None]


def _eval(scorer, img, meta):
    ev = scorer.evaluate(img, [meta["prompt"]], [meta])
    r = scorer(img, [meta["prompt"]], [meta])
    assert r.dtype == np.float32 and r.shape == (1,)
    assert np.isclose(r[0], ev["score"][0])
    return float(ev["accuracy"][0]), float(r[0])


def test_correct_renders_score_one_for_every_prompt():
    scorer = reward.ToyGenEvalScorer()
    metas = shapes.prompt_split("all")
    rng = np.random.default_rng(0)
    imgs = np.stack([shapes.render(shapes.scene_for(m, rng)) for m in metas])
    prompts = [m["prompt"] for m in metas]
    ev = scorer.evaluate(imgs, prompts, metas)
    assert ev["accuracy"].min() == 1.0 and ev["score"].min() == 1.0, [r for r in ev["reason"] if r][:3]
    acc = reward.per_tag_accuracy(ev)
    assert set(acc) == set(shapes.TAGS) | {"overall"} and acc["overall"] == 1.0


O = dict  # shorthand


def test_wrong_images_per_tag():
    s = reward.ToyGenEvalScorer()
    blank = np.zeros((1, 32, 32, 3), np.uint8)
    # single_object: nothing drawn -> 0; wrong class -> 0
    m = {
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1}],
        "exclude": [],
        "prompt": "a photo of a circle",
    }
    assert _eval(s, blank, m) == (0.0, 0.0)
    assert _eval(s, _img([O({"class": "square", "color": "red", "cx": 8, "cy": 8, "h": 4})]), m) == (0.0, 0.0)
    # two_object: one of two present -> strict 0, partial 1/2
    m = {
        "tag": "two_object",
        "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
        "exclude": [],
        "prompt": "a photo of a circle and a square",
    }
    assert _eval(s, _img([O({"class": "circle", "color": "red", "cx": 8, "cy": 8, "h": 4})]), m) == (0.0, 0.5)
    # counting: three circles for "two" -> strict 0 (exclude), partial 1 - 1/2
    m = {
        "tag": "counting",
        "include": [{"class": "circle", "count": 2}],
        "exclude": [{"class": "circle", "count": 3}],
        "prompt": "a photo of two circles",
    }
    objs = [O({"class": "circle", "color": "blue", "cx": x, "cy": 6, "h": 3}) for x in (5, 16, 27)]
    assert _eval(s, _img(objs), m) == (0.0, 0.5)
    assert _eval(s, _img(objs[:2]), m) == (1.0, 1.0)
    # colors: right class, wrong colour -> strict 0, partial 1/2
    m = {
        "tag": "colors",
        "include": [{"class": "square", "count": 1, "color": "green"}],
        "exclude": [],
        "prompt": "a photo of a green square",
    }
    assert _eval(s, _img([O({"class": "square", "color": "red", "cx": 8, "cy": 8, "h": 4})]), m) == (0.0, 0.5)
    # position: circle right of the square when "left of" is asked -> strict 0, partial 2/3
    m = {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "position": ["left of", 0]},
        ],
        "exclude": [],
        "prompt": "a photo of a circle left of a square",
    }
    sq = O({"class": "square", "color": "red", "cx": 6, "cy": 16, "h": 4})
    ci = O({"class": "circle", "color": "blue", "cx": 25, "cy": 16, "h": 4})
    acc, part = _eval(s, _img([sq, ci]), m)
    assert acc == 0.0 and np.isclose(part, 2 / 3)
    sq2, ci2 = dict(sq, cx=25), dict(ci, cx=6)
    assert _eval(s, _img([sq2, ci2]), m) == (1.0, 1.0)
    # color_attr: colours swapped -> strict 0, partial 1/2
    m = {
        "tag": "color_attr",
        "include": [
            {"class": "circle", "count": 1, "color": "red"},
            {"class": "square", "count": 1, "color": "blue"},
        ],
        "exclude": [],
        "prompt": "a photo of a red circle and a blue square",
    }
    swapped = [
        O({"class": "circle", "color": "blue", "cx": 6, "cy": 6, "h": 4}),
        O({"class": "square", "color": "red", "cx": 24, "cy": 24, "h": 4}),
    ]
    assert _eval(s, _img(swapped), m) == (0.0, 0.5)


def test_rules_on_detections_directly():
    d = {
        "circle": [
            {"box": (0, 0, 4, 4), "score": 0.95, "color": "red"},
            {"box": (10, 0, 14, 4), "score": 0.5, "color": "red"},
        ]
    }
    m = {
        "tag": "counting",
        "include": [{"class": "circle", "count": 2}],
        "exclude": [{"class": "circle", "count": 3}],
    }
    assert reward.score_detections(d, m)[:2] == (False, 0.5)  # 0.9 threshold for counting drops one
    m2 = dict(m, tag="two_object")
    assert reward.score_detections(d, m2)[:2] == (True, 1.0)


def test_scorer_input_errors():
    s = reward.ToyGenEvalScorer()
    m = _first("single_object")
    with pytest.raises(ValueError, match="uint8"):
        s(np.zeros((1, 32, 32, 3), np.float32), [m["prompt"]], [m])
    with pytest.raises(ValueError, match="a photo of a square"):
        s(np.zeros((1, 32, 32, 3), np.uint8), ["a photo of a square"], [m])
    with pytest.raises(ValueError, match="needs"):
        s(np.zeros((1, 32, 32, 3), np.uint8), [m["prompt"]], [{"tag": "x"}])


def test_text_encoder_shapes_cache_and_unknown_word():
    model = text.ToyTextModel(dim=16, pooled_dim=8, rngs=nnx.Rngs(0))
    enc = text.ToyTextEncoder(model, cache_size=3)
    prompts = [
        "a photo of a red circle and a blue square",
        "a photo of two circles",
        "a photo of a red circle and a blue square",
    ]
    e, p = enc.encode(prompts)
    assert e.shape == (3, text.MAX_TOKENS, 16) and p.shape == (3, 8)
    assert e.dtype == np.float32 and p.dtype == np.float32
    assert np.array_equal(e[0], e[2]) and not np.allclose(e[0], e[1])
    e1, p1 = enc.encode(["a photo of two circles"])
    assert np.allclose(e1[0], e[1]) and np.allclose(p1[0], p[1])
    enc.encode(["a photo of a circle", "a photo of a square", "a photo of a triangle"])
    assert len(enc.cache) == 3
    with pytest.raises(ValueError, match="unknown word 'dog'"):
        enc.encode(["a photo of a dog"])
    with pytest.raises(ValueError, match="at most"):
        text.tokenize(["a " * 20])
    for r in shapes.prompt_split("all"):
        text.tokenize([r["prompt"]])  # the whole grammar is in the vocabulary


def test_speckles_are_not_objects():
    """A few stray pixels are below GenEval's confidence threshold: they cost neither score."""
    s = reward.ToyGenEvalScorer()
    m = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "exclude": [],
         "prompt": "a photo of a circle"}
    img = _img([O({"class": "circle", "color": "red", "cx": 8, "cy": 8, "h": 4})])
    assert _eval(s, img, m) == (1.0, 1.0)
    speck = img.copy()
    speck[0, 24:27, 24:27] = shapes.COLORS["red"]  # 9-pixel square speckle
    speck[0, 28:31, 20:23] = shapes.COLORS["red"]
    assert _eval(s, speck, m) == (1.0, 1.0)
    assert reward.confidence(reward.MIN_OBJECT_AREA) == 1.0 and reward.confidence(9) < 0.3
    big = _img([O({"class": "circle", "color": "red", "cx": 8, "cy": 8, "h": 4}),
                O({"class": "circle", "color": "blue", "cx": 24, "cy": 24, "h": 3})])
    assert _eval(s, big, m) == (1.0, 0.0)  # a real second object still counts against the partial score


def test_strict_training_reward_is_the_verdict():
    """strict=True: the training reward is the evaluation's 0/1 verdict (one of two objects: 0, not 0.5)."""
    m = {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
         "exclude": [], "prompt": "a photo of a circle and a square"}
    one = _img([O({"class": "circle", "color": "red", "cx": 8, "cy": 8, "h": 4})])
    both = _img([O({"class": "circle", "color": "red", "cx": 8, "cy": 8, "h": 4}),
                 O({"class": "square", "color": "blue", "cx": 24, "cy": 24, "h": 4})])
    imgs, metas = np.concatenate([one, both]), [m, m]
    strict = reward.ToyGenEvalScorer(strict=True)
    np.testing.assert_array_equal(strict(imgs, [m["prompt"]] * 2, metas), [0.0, 1.0])
    np.testing.assert_array_equal(reward.ToyGenEvalScorer()(imgs, [m["prompt"]] * 2, metas), [0.5, 1.0])
    with pytest.raises(ValueError, match="strict must be true or false"):
        reward.ToyGenEvalScorer(strict="yes")
