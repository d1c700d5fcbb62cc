"""GenEval rules on synthetic detections (pure functions, no models)."""

import json

import numpy as np
import pytest

from awm_jax.rewards import geneval_rules as R


def obj(x, y, s=0.95, color=None, w=10, h=10):
    return {"box": (x, y, x + w, y + h), "score": s, "color": color}


def verdicts(raw, meta, **kw):
    dets = R.filter_detections(raw, meta["tag"])
    ok, _ = R.geneval_correct(dets, meta)
    exact, score = R.reward_score(dets, meta, **kw)
    return ok, exact, score


def test_relative_position():
    a, b = (0, 0, 10, 10), (30, 0, 40, 10)
    assert R.relative_position(a, b) == {"left of"}
    assert R.relative_position(b, a) == {"right of"}
    assert R.relative_position((0, 30, 10, 40), a) == {"below"}  # y grows downwards
    assert R.relative_position(a, (0, 30, 10, 40)) == {"above"}
    assert R.relative_position((30, 30, 40, 40), a) == {"right of", "below"}  # diagonal: both
    assert R.relative_position(a, (2, 1, 12, 11)) == set()  # heavy overlap: no relation
    close = (12, 0, 22, 10)  # offset 12, margin 0.1 * (10 + 10) = 2 -> still "left of"
    assert R.relative_position(a, close) == {"left of"}
    assert R.relative_position(a, close, margin=0.6) == set()  # margin eats the whole offset


def test_filter_threshold_sort_and_cap():
    raw = {"dog": [obj(0, 0, 0.3), obj(0, 0, 0.31), obj(0, 0, 0.9)], "cat": [obj(0, 0, 0.1)]}
    d = R.filter_detections(raw, "single_object")
    assert [o["score"] for o in d["dog"]] == [0.9, 0.31]  # strictly above 0.3, sorted
    assert "cat" not in d
    assert "dog" not in R.filter_detections({"dog": [obj(0, 0, 0.9)]}, "counting")  # 0.9 is not > 0.9
    many = {"cup": [obj(i, 0, 0.5 + i / 100) for i in range(20)]}
    kept = R.filter_detections(many, "single_object")["cup"]
    assert len(kept) == 16 and kept[0]["score"] == pytest.approx(0.69)


def test_single_object():
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    assert verdicts({"dog": [obj(0, 0)]}, meta) == (True, True, 1.0)
    assert verdicts({"dog": [obj(0, 0, 0.2)]}, meta) == (False, False, 0.0)  # below threshold
    assert verdicts({"cat": [obj(0, 0)]}, meta) == (False, False, 0.0)
    # two dogs: GenEval accepts (>= 1), the exact verdict does not, partial = 1 - 1/1 = 0
    assert verdicts({"dog": [obj(0, 0), obj(20, 0)]}, meta) == (True, False, 0.0)
    # three dogs: the unclamped partial score goes negative (reward-server semantics)
    assert verdicts({"dog": [obj(0, 0), obj(20, 0), obj(40, 0)]}, meta)[2] == pytest.approx(-1.0)


def test_two_object():
    meta = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "car", "count": 1}]}
    assert verdicts({"dog": [obj(0, 0)], "car": [obj(50, 0)]}, meta) == (True, True, 1.0)
    assert verdicts({"dog": [obj(0, 0)]}, meta) == (False, False, 0.5)


def test_counting_threshold_and_exclusion():
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 2}],
            "exclude": [{"class": "cup", "count": 3}]}
    two = {"cup": [obj(0, 0, 0.95), obj(20, 0, 0.92)]}
    assert verdicts(two, meta) == (True, True, 1.0)
    three = {"cup": [obj(0, 0), obj(20, 0), obj(40, 0)]}
    ok, exact, score = verdicts(three, meta)
    assert not ok and not exact and score == pytest.approx(0.5)  # excluded count reached
    low = {"cup": [obj(0, 0, 0.95), obj(20, 0, 0.85), obj(40, 0, 0.5)]}  # only one above 0.9
    assert verdicts(low, meta) == (False, False, 0.5)
    # without the exclude clause, three cups pass GenEval (first `count` objects) but not exact
    meta_no_ex = {"tag": "counting", "include": [{"class": "cup", "count": 2}]}
    assert verdicts(three, meta_no_ex)[:2] == (True, False)


def test_colors():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert verdicts({"car": [obj(0, 0, color="red")]}, meta) == (True, True, 1.0)
    assert verdicts({"car": [obj(0, 0, color="blue")]}, meta) == (False, False, 0.5)  # [1, 0]
    assert verdicts({}, meta) == (False, False, 0.0)  # [0, 0]
    # GenEval colours only the most confident `count` objects: a blue second car does not matter
    two = {"car": [obj(0, 0, 0.9, color="red"), obj(20, 0, 0.5, color="blue")]}
    assert verdicts(two, meta)[0] is True


def test_position():
    meta = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                           {"class": "cow", "count": 1, "position": ["right of", 0]}]}
    right = {"laptop": [obj(0, 0)], "cow": [obj(60, 0)]}
    left = {"laptop": [obj(60, 0)], "cow": [obj(0, 0)]}
    assert verdicts(right, meta) == (True, True, 1.0)
    ok, exact, score = verdicts(left, meta)
    assert (ok, exact) == (False, False) and score == pytest.approx(2 / 3)  # [1, 1, 0]
    assert verdicts(left, meta, legacy_position=True)[2] == pytest.approx(0.75)  # server quirk [1, 1, 0, 1]
    ok, exact, score = verdicts({"cow": [obj(60, 0)]}, meta)  # no target: [0, 1, 0]
    assert (ok, exact) == (False, False) and score == pytest.approx(1 / 3)
    _, why = R.geneval_correct(R.filter_detections({"cow": [obj(60, 0)]}, "position"), meta)
    assert "no target" in why
    overlap = {"laptop": [obj(0, 0)], "cow": [obj(1, 0)]}
    assert verdicts(overlap, meta)[0] is False


def test_color_attr():
    meta = {"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"},
                                             {"class": "scissors", "count": 1, "color": "black"}]}
    good = {"handbag": [obj(0, 0, color="pink")], "scissors": [obj(50, 0, color="black")]}
    assert verdicts(good, meta) == (True, True, 1.0)
    swapped = {"handbag": [obj(0, 0, color="black")], "scissors": [obj(50, 0, color="pink")]}
    assert verdicts(swapped, meta) == (False, False, 0.5)  # [1, 0, 1, 0]
    half = {"handbag": [obj(0, 0, color="pink")], "scissors": [obj(50, 0, color="white")]}
    assert verdicts(half, meta) == (False, False, 0.75)


def test_validate_metadata_errors():
    with pytest.raises(ValueError, match="needs keys 'tag' and 'include'"):
        R.validate_metadata({"include": []}, where="#3")
    with pytest.raises(ValueError, match="'zebra' of #0 is not a detector class"):
        R.validate_metadata({"tag": "single_object", "include": [{"class": "zebra", "count": 1}]},
                            class_names=["dog"], where="#0")
    with pytest.raises(ValueError, match="bad position"):
        R.validate_metadata({"tag": "position",
                             "include": [{"class": "a", "count": 1, "position": ["near", 0]}]})


def _perfect(meta):
    """Detections that satisfy a metadata record exactly (groups placed per position clause)."""
    dets, centres = {}, []
    step = {"left of": (-80, 0), "right of": (80, 0), "above": (0, -80), "below": (0, 80)}
    for i, req in enumerate(meta["include"]):
        cx, cy = 300 + 200 * i, 300
        if "position" in req:
            rel, j = req["position"]
            cx, cy = centres[j][0] + step[rel][0], centres[j][1] + step[rel][1]
        centres.append((cx, cy))
        for k in range(req["count"]):
            dets.setdefault(req["class"], []).append(
                {"box": (cx - 5 + k, cy - 5, cx + 5 + k, cy + 5), "score": 0.95, "color": req.get("color")})
    return dets


def test_every_published_record_perfect_and_broken(prompt_set):
    path, full = prompt_set("geneval_test")  # the published set where present, else the project's sample
    metas = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    assert len(metas) == (553 * 4 if full else 24) and {m["tag"] for m in metas} == set(R.TAGS)
    for i, m in enumerate(metas):
        R.validate_metadata(m, where=f"line {i + 1}")
        dets = _perfect(m)
        assert verdicts(dets, m) == (True, True, 1.0), m
        first = m["include"][0]["class"]
        broken = {k: (v[1:] if k == first else v) for k, v in dets.items()}
        ok, exact, score = verdicts(broken, m)
        assert not ok and not exact and score < 1.0, m


def test_summarize():
    s = R.summarize(["counting", "counting", "colors"], np.array([1.0, 0.0, 1.0]))
    assert s == {"colors": 1.0, "counting": 0.5, "overall": 0.75}
