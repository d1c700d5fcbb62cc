"""The README's SD3.5 commands as printed, on tiny stand-ins in the fetch_assets layout.

A tiny random SD3 pipeline at ``weights/sd3.5-medium``, tiny random reward models at the layout's reward
paths and small prompt files at ``data/prompts/`` (under a temporary working directory): each
``python -m awm_jax.train --config configs/sd35m_*.py ...`` line of the README runs (``--check`` first)
with only size keys added. Also: the pre-flight reports every missing path at once, and leaves no workdir.
"""

import json
import pathlib
import shlex

import numpy as np
import pytest
from tiny_pipeline import TINY, build_tiny_sd3_pipeline

from awm_jax import train
from awm_jax.rewards.tiny import save_tiny_clip, save_tiny_detr

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = [  # the size keys: tiny model, one step, a 2-prompt evaluation at steps 0 and 1
    "--config.max_steps=1", f"--config.model.resolution={TINY['sample_size'] * TINY['vae_scale_factor']}",
    "--config.model.max_sequence_length=16", "--config.model.dtype=float32", "--config.data.group_size=4",
    "--config.data.prompts_per_step=2", "--config.lora.rank=2", "--config.lora.alpha=4.0",
    "--config.sample.num_steps=3", "--config.sample.batch_size=1", "--config.awm.train_timesteps=2",
    "--config.train.micro_batch_size=1", "--config.eval.every=1", "--config.eval.num_steps=2",
    "--config.eval.num_prompts=2", "--config.eval.grid_images=2", "--config.checkpoint.async_save=false",
    "--config.log.progress=false", "--config.reward.geneval.batch_size=2",
]
GENEVAL = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
           {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}],
            "prompt": "a photo of a red dog"}]
OCR = ['a sign that says "hello"', 'a shop window reading "open"']


def readme_train_commands() -> list[list[str]]:
    """The README's ``python -m awm_jax.train --config configs/sd35m_*.py`` commands (lines joined)."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("python -m awm_jax.train --config configs/sd35m_"):
            out.append(shlex.split(line)[3:])  # drop "python -m awm_jax.train"
    return out


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """A working directory with every asset of the shipped sd35m configs' defaults, tiny and random."""
    root = tmp_path_factory.mktemp("assets")
    build_tiny_sd3_pipeline(root / "weights" / "sd3.5-medium", seed=0)
    save_tiny_detr(str(root / "weights/rewards/mask2former-swin-small-coco"))
    save_tiny_clip(str(root / "weights/rewards/clip-vit-large-patch14"))
    save_tiny_clip(str(root / "weights/rewards/pickscore_v1"))
    save_tiny_clip(str(root / "weights/rewards/clip-vit-h-14"))
    p = root / "data" / "prompts"
    p.mkdir(parents=True)
    for split in ("train", "test"):
        (p / f"geneval_{split}_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GENEVAL))
        (p / f"ocr_{split}.txt").write_text("\n".join(OCR) + "\n")
        (p / f"pickscore_{split}.txt").write_text("a cat on a sofa\na red car\n")
    return root


def _in_layout(layout, monkeypatch, args):
    monkeypatch.chdir(layout)
    return [str(ROOT / a) if a.startswith("configs/") else a for a in args]


def test_readme_has_the_three_sd35_commands():
    cmds = readme_train_commands()
    configs = {c[c.index("--config") + 1] for c in cmds}
    assert {"configs/sd35m_geneval.py", "configs/sd35m_ocr.py", "configs/sd35m_pickscore.py"} <= configs
    assert any("--check" in c for c in cmds)
    assert any("--config.reward.geneval.detector_path=/models/mask2former" in c for c in cmds)


@pytest.mark.parametrize("task", ["geneval", "ocr", "pickscore"])
def test_readme_command_runs_for_each_reward(layout, monkeypatch, capsys, task):
    cmd = next(c for c in readme_train_commands()
               if f"configs/sd35m_{task}.py" in c and "--check" not in c and len(c) == 4)
    args = _in_layout(layout, monkeypatch, cmd)
    # the held-out evaluation (its own sampler compile) only for GenEval, whose scorer has an evaluate();
    # OCR / PickScore score their rollouts in the training step
    size = SIZE if task == "geneval" else SIZE + ["--config.eval.every=0"]
    assert train.main(args + size + ["--check"]) == 0
    assert "ok:" in capsys.readouterr().out
    assert train.main(args + size) == 0
    wd = layout / args[args.index("--workdir") + 1]
    if task == "geneval":
        evals = [json.loads(x) for x in (wd / "eval.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals] == [0, 1] and all(e["num_images"] == 2 for e in evals)
        assert "accuracy/overall" in evals[-1]
    else:
        assert np.isfinite(json.loads((wd / "metrics.jsonl").read_text().splitlines()[-1])["reward_mean"])
    assert json.loads((wd / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
    out = capsys.readouterr().out
    assert "run finished: step 1 of 1" in out and "checkpoints" in out and "tb" in out
    assert task != "geneval" or "samples" in out  # the evaluation's image grids


def test_check_reports_every_missing_path_and_leaves_no_workdir(layout, monkeypatch, tmp_path, capsys):
    cmd = next(c for c in readme_train_commands() if "--config.model.path=/models/sd35m" in c)
    args = _in_layout(layout, monkeypatch, cmd)
    wd = tmp_path / "never"
    args[args.index("--workdir") + 1] = str(wd)
    assert train.main(args + SIZE) == 2
    err = capsys.readouterr().err
    for key, path in (("model.path", "/models/sd35m"), ("data.train_prompts", "/data/geneval_train.jsonl"),
                      ("data.eval_prompts", "/data/geneval_test.jsonl"),
                      ("reward.geneval.detector_path", "/models/mask2former"),
                      ("reward.geneval.clip_path", "/models/clip-l")):
        assert f"'{key}' = '{path}'" in err, (key, err)
    assert err.startswith("error: 5 problems") and not wd.exists()


def test_check_names_missing_pipeline_parts_and_empty_reward_key(layout, monkeypatch, tmp_path, capsys):
    import shutil

    pipe = tmp_path / "pipe"
    shutil.copytree(layout / "weights" / "sd3.5-medium", pipe)
    shutil.rmtree(pipe / "text_encoder_2")
    shutil.rmtree(pipe / "vae")
    monkeypatch.chdir(layout)
    args = ["--config", str(ROOT / "configs/sd35m_geneval.py"), "--workdir", str(tmp_path / "wd"), "--check",
            f"--config.model.path={pipe}", "--config.reward.geneval.clip_path="]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert str(pipe / "text_encoder_2") in err and str(pipe / "vae" / "config.json") in err
    assert "'reward.geneval.clip_path' is empty" in err
    assert not (tmp_path / "wd").exists()


def test_reward_kwargs_can_be_added_from_the_command_line():
    from awm_jax import config_lib, rewards

    c = config_lib.load_config(str(ROOT / "configs/sd35m_ocr.py"))
    config_lib.apply_overrides(c, [("reward.ocr.det_limit_type", "max"),
                                   ("reward.kwargs.min_confidence", "0.3")])
    kw = rewards.config_kwargs(c)
    assert kw["det_limit_type"] == ("reward.ocr.det_limit_type", "max")
    assert kw["min_confidence"] == ("reward.kwargs.min_confidence", 0.3) and "det_model_path" not in kw
    with pytest.raises(config_lib.ConfigError, match="reward.ocr.det_limit"):
        config_lib.apply_overrides(c, [("reward.ocr.det_limit", "1")])
