"""tools/fetch_assets.py without network: the layout logic with a mocked hub download; offline help."""

import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fetch_assets", ROOT / "tools" / "fetch_assets.py")
FA = importlib.util.module_from_spec(_spec)
sys.modules["fetch_assets"] = FA  # its dataclasses look their module up
_spec.loader.exec_module(FA)


def _fake_snapshot(calls):
    def snapshot_download(repo_id, local_dir, token=None, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        d = pathlib.Path(local_dir)
        asset = next(a for a in FA.ASSETS if a.repo == repo_id)
        for f in asset.required:
            p = d / f
            if "." in p.name:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("{}")
            else:
                p.mkdir(parents=True, exist_ok=True)
    return snapshot_download


def _fake_url(url, dest):
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.suffix == ".jsonl":
        dest.write_text(json.dumps({"tag": "single_object", "include": [{"class": "cat", "count": 1}],
                                    "prompt": "a photo of a cat"}) + "\n")
    else:
        dest.write_text('a sign that says "hi"\n')


def test_download_into_the_layout_verifies_and_prints_overrides(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []
    assert FA.main(["--root", str(tmp_path)], snapshot_download=_fake_snapshot(calls),
                   download_url=_fake_url) == 0
    out = capsys.readouterr().out
    repos = {r for r, _ in calls}
    assert "stabilityai/stable-diffusion-3.5-medium" in repos and "black-forest-labs/FLUX.1-dev" not in repos
    assert ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ["*.json", "*.txt"]) in calls  # processor files only
    assert (tmp_path / "weights/sd3.5-medium/text_encoder_3/config.json").is_file()
    assert (tmp_path / "data/prompts/ocr_train.txt").is_file()
    assert f"--config.reward.geneval.detector_path={tmp_path.resolve()}/weights/rewards/" in out
    assert f"--config.model.path={tmp_path.resolve()}/weights/sd3.5-medium" in out
    # the layout is the shipped configs' defaults
    sys.path.insert(0, str(ROOT / "configs"))
    import awm_base

    c = awm_base.sd35m("geneval")
    assert (c.model.path, c.reward.geneval.clip_path) == ("weights/sd3.5-medium",
                                                           "weights/rewards/clip-vit-large-patch14")
    assert c.data.train_prompts == "data/prompts/geneval_train_metadata.jsonl"
    # a second run finds everything and downloads nothing
    calls.clear()
    assert FA.main(["--root", str(tmp_path)], snapshot_download=_fake_snapshot(calls),
                   download_url=_fake_url) == 0
    assert calls == []


def test_offline_downloads_nothing_and_says_what_to_copy_where(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def boom(*a, **k):
        raise AssertionError("downloaded while offline")

    assert FA.main(["--root", str(tmp_path), "--only", "flux", "prompts"], snapshot_download=boom,
                   download_url=boom) == 1
    out = capsys.readouterr().out
    assert "No network download" in out and "https://huggingface.co/black-forest-labs/FLUX.1-dev" in out
    assert f"{tmp_path}/data/prompts/pickscore_test.txt" in out and "dataset/pickscore/test.txt" in out
    assert not (tmp_path / "weights").exists()


def test_a_failing_download_falls_back_to_the_instructions(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refused(*a, **k):
        raise OSError("connection refused")

    assert FA.main(["--root", str(tmp_path), "--only", "geneval"], snapshot_download=refused) == 1
    captured = capsys.readouterr()
    assert "connection refused" in captured.err and "No network download" in captured.out
