"""Prompt files and the grouped sampler."""

import json

import numpy as np
import pytest

from awm_jax import data


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_text_and_ocr_and_geneval(tmp_path):
    t = data.load_prompts(_write(tmp_path / "a.txt", "a cat\n\n a dog \n"), "text")
    assert t.prompts == ["a cat", "a dog"] and t.metadata == [{}, {}]
    ocr_text = 'a sign saying "Hello World"\nmug with \u201cTea\u201d\n'
    o = data.load_prompts(_write(tmp_path / "o.txt", ocr_text), "ocr")
    assert [m["target"] for m in o.metadata] == ["Hello World", "Tea"]
    recs = [{"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "two cats"},
            {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"}]
    g = data.load_prompts(_write(tmp_path / "g.jsonl", "\n".join(json.dumps(r) for r in recs)), "geneval")
    assert g.prompts == ["two cats", "a dog"] and g.metadata[0]["tag"] == "counting"
    p, m = g.take([1, 1, 0])
    assert p == ["a dog", "a dog", "two cats"] and m[2]["include"][0]["count"] == 2


def test_prompt_set_files_load(prompt_set):
    (gp, g_full), (op, o_full) = prompt_set("geneval_test"), prompt_set("ocr_test")
    g = data.load_prompts(str(gp), "geneval")
    o = data.load_prompts(str(op), "ocr")
    assert len(g) == (553 * 4 if g_full else 24) and {"tag", "include"} <= set(g.metadata[0])
    assert len(o) == (1018 if o_full else 20) and all(m["target"] for m in o.metadata)


def test_empty_file(tmp_path):
    with pytest.raises(data.PromptFileError, match=r"e\.txt.*empty"):
        data.load_prompts(_write(tmp_path / "e.txt", "\n  \n"), "text")


def test_bad_json_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "g.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",\n')
    with pytest.raises(data.PromptFileError, match=r"g\.jsonl:3: invalid JSON"):
        data.load_prompts(path, "geneval")
    path = _write(tmp_path / "h.jsonl", '{"prompt": "a"}\n{"tag": "x"}\n')
    with pytest.raises(data.PromptFileError, match=r"h\.jsonl:2:.*'prompt'"):
        data.load_prompts(path, "geneval")


def test_ocr_without_quotes(tmp_path):
    path = _write(tmp_path / "o.txt", 'a "quoted" sign\na sign without quotes\n')
    with pytest.raises(data.PromptFileError, match=r"o\.txt:2: OCR prompt has no double-quoted"):
        data.load_prompts(path, "ocr")


def test_missing_file_and_format(tmp_path):
    with pytest.raises(data.PromptFileError, match="not found"):
        data.load_prompts(str(tmp_path / "none.txt"), "text")
    with pytest.raises(data.PromptFileError, match="unknown prompt format"):
        data.load_prompts(_write(tmp_path / "a.txt", "x\n"), "csv")


def test_toy_split():
    ds = data.load_dataset("toy:train", "geneval")
    assert len(ds) > 10 and "tag" in ds.metadata[0]


def test_grouped_sampler_groups_and_determinism():
    s = data.GroupedSampler(num_prompts=10, prompts_per_step=3, group_size=4, seed=7)
    idx, groups = s.global_indices(5)
    assert idx.shape == (12,) and groups.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for g in range(3):
        assert len(set(idx[groups == g].tolist())) == 1
    assert len(set(idx.tolist())) == 3  # distinct prompts within a step
    again, _ = data.GroupedSampler(10, 3, 4, seed=7).global_indices(5)
    np.testing.assert_array_equal(idx, again)
    other, _ = data.GroupedSampler(10, 3, 4, seed=8).global_indices(5)
    assert not np.array_equal(idx, other) or not np.array_equal(s.global_indices(6)[0], idx)


def test_grouped_sampler_epoch_coverage_and_hosts():
    s = data.GroupedSampler(num_prompts=12, prompts_per_step=4, group_size=2, seed=0)
    seen = np.concatenate([s.step_prompts(k) for k in range(3)])
    assert sorted(seen.tolist()) == list(range(12))  # one epoch = every prompt once
    full, fg = s.global_indices(4)
    parts = [s.local_indices(4, p, 4) for p in range(4)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), full)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), fg)
    with pytest.raises(ValueError, match="not divisible"):
        s.local_indices(0, 0, 3)
