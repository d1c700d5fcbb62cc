"""Trainer logging: a tiny toy run with ``log.wandb=offline`` and tensorboardX missing (the base install)
writes a local W&B run (scalars, eval table, config) and says in one line that TensorBoard is off."""

import glob
import importlib.util
import json
import os
import sys

import pytest

from awm_jax import config_lib, logging_wandb, train
from awm_jax.logging_lib import TENSORBOARD_MISSING
from awm_jax.toy import world
from tests.toy_tiny import tiny_toy_config


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_toy") / "ckpt")
    cfg = tiny_toy_config()
    world.save_toy_checkpoint(path, *world.build_models(cfg, 0), cfg)
    return path


def _cfg(ckpt, **over):
    c = config_lib.load_config("configs/toy.py")
    items = {"model.path": ckpt, "max_steps": "1", "data.group_size": "4", "data.prompts_per_step": "2",
             "sample.batch_size": "1", "sample.num_steps": "3", "awm.train_timesteps": "2",
             "train.micro_batch_size": "1", "eval.every": "1", "eval.num_prompts": "2", "eval.num_steps": "2",
             "eval.grid_images": "2", "log.progress": "false", "checkpoint.async_save": "false", **over}
    config_lib.apply_overrides(c, list(items.items()))
    return c


def test_offline_wandb_run_without_tensorboardx(tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # the base install: no tensorboardX
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tiny_ckpt, **{"log.wandb": "offline", "log.wandb_tags": "('toy', 'test')",
                             "log.wandb_name": "tiny-toy"})
    wd = str(tmp_path / "run")
    train.run(cfg, wd)
    out = capsys.readouterr().out
    assert out.count(TENSORBOARD_MISSING) == 1
    assert not os.path.exists(os.path.join(wd, "tb"))
    assert [json.loads(x)["step"] for x in open(os.path.join(wd, "eval.jsonl"))] == [0, 1]
    runs = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*"))
    assert len(runs) == 1, os.listdir(tmp_path / "wb")
    run_id = open(os.path.join(wd, "wandb_id.txt")).read().strip()
    assert runs[0].endswith(run_id) and glob.glob(os.path.join(runs[0], f"run-{run_id}.wandb"))
    # the run's record stream holds the config, the run name, the tags and the scalar keys
    stream = open(os.path.join(runs[0], f"run-{run_id}.wandb"), "rb").read()
    for needle in (b"toy_geneval", b"tiny-toy", b"test", b"train/loss", b"train/reward_mean",
                   b"eval/accuracy"):
        assert needle in stream, needle
    # the eval tables (metrics of each evaluation, the grid's images with captions) and grids as media
    media = os.path.join(runs[0], "files", "media")
    evals = [json.loads(x) for x in open(os.path.join(wd, "eval.jsonl"))]
    for ev in evals:
        (path,) = glob.glob(os.path.join(media, "table", "eval", f"metrics_{ev['step']}_*.table.json"))
        table = dict(json.load(open(path))["data"])
        assert table["accuracy/overall"] == pytest.approx(ev["accuracy/overall"])
        assert table["reward_mean"] == pytest.approx(ev["reward_mean"])
    assert glob.glob(os.path.join(media, "table", "eval", "samples_1_*.table.json"))
    assert len(glob.glob(os.path.join(media, "images", "eval", "grid_*.png"))) == 2


def test_wandb_settings_are_checked(tiny_ckpt, monkeypatch):
    cfg = _cfg(tiny_ckpt, **{"log.wandb": "cloud"})
    assert "log.wandb" in logging_wandb.problems(cfg)[0]
    cfg.log.wandb = "offline"
    assert logging_wandb.problems(cfg) == []
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else find(n, *a))
    assert "wandb is not installed" in logging_wandb.problems(cfg)[0]
    cfg.log.wandb = ""
    assert logging_wandb.problems(cfg) == [] and logging_wandb.settings(cfg) is None
