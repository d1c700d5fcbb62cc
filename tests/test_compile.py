"""Compilation: the persistent cache's directory rules, the timeline, and no recompiles after step 1 of
the real toy trainer (AWM and Flow-GRPO, evaluation every step)."""

import json
import os

import pytest

from awm_jax import compile_cache, config_lib, train
from awm_jax.timeline import PHASES, Timeline, format_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cache_dir_rules(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve_cache_dir("") == str(tmp_path / "xdg" / "awm_jax" / "jax_cache")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.resolve_cache_dir("") == str(tmp_path / "home" / ".cache" / "awm_jax" / "jax_cache")
    assert compile_cache.resolve_cache_dir("off") is None
    assert compile_cache.resolve_cache_dir(str(tmp_path / "c")) == str(tmp_path / "c")
    monkeypatch.setenv(compile_cache.ENV, "off")  # the environment overrides the key
    assert compile_cache.resolve_cache_dir(str(tmp_path / "c")) is None


def test_timeline_laps_and_summary():
    now = [0.0]
    tl = Timeline(clock=lambda: now[0])
    with tl.phase("rollout"):
        now[0] += 2.0
    with tl.phase("train"):
        now[0] += 1.0
    now[0] += 0.5  # untimed host work
    lap = tl.lap()
    assert lap["time/rollout"] == 2.0 and lap["time/train"] == 1.0 and lap["time/idle"] == 0.5
    assert lap["time/total"] == 3.5 and set(lap) == {f"time/{p}" for p in PHASES + ("idle", "total")}
    with tl.phase("checkpoint"):
        now[0] += 0.5
    tl.lap(count=False)
    s = tl.summary()
    assert s["steps"] == 1 and s["wall_s"] == 4.0 and s["phases"]["rollout"]["share"] == 0.5
    assert format_summary(s).startswith("timeline over 1 steps (4.0 s): rollout 50%")
    with pytest.raises(KeyError, match="unknown timeline phase"):
        with tl.phase("nap"):
            pass


def _tiny_toy(algorithm: str, steps: int):
    c = config_lib.load_config(os.path.join(ROOT, "configs", "toy.py" if algorithm == "awm"
                                            else "toy_flow_grpo.py"))
    config_lib.apply_overrides(c, [
        ("model.path", ""), ("max_steps", str(steps)), ("data.group_size", "2"),
        ("data.prompts_per_step", "4"), ("sample.batch_size", "1"), ("sample.num_steps", "3"),
        ("train.micro_batch_size", "1"), ("eval.every", "1"), ("eval.num_prompts", "8"),
        ("eval.num_steps", "2"), ("eval.grid_images", "0"), ("log.progress", "false"),
        ("log.tensorboard", "false"), ("checkpoint.every", "1"), ("checkpoint.async_save", "false"),
        ("awm.train_timesteps", "2")])
    return c


_COUNTS: list = []


def counting_components(config):
    """The default components, recording the compile counter at each rollout call."""
    comp = train.default_components(config)
    inner = comp.rollout

    def rollout(*a):
        _COUNTS.append(_COUNTER.lowerings)
        return inner(*a)

    comp.rollout = rollout
    return comp


_COUNTER = compile_cache.CompileCounter()


@pytest.mark.parametrize("algorithm", ["awm", "flow_grpo"])
def test_no_recompiles_after_step_1(tmp_path, algorithm):
    """3 steps with an evaluation and a checkpoint after each: every jitted function (train step, rollout,
    evaluation sampler, orbax's per-device slices of the first save) is lowered during step 1 (and the
    base-model evaluation before it) and never again; the per-step metrics hold the timeline."""
    c = _tiny_toy(algorithm, 3)
    c.components = "test_compile:counting_components"
    _COUNTS.clear()
    with _COUNTER:
        train.run(c, str(tmp_path))
        end = _COUNTER.lowerings
    assert len(_COUNTS) == 3  # one rollout chunk per step on the 8-device mesh
    assert _COUNTS[0] > 0  # the counter sees the compiles of step 0's evaluation
    assert end == _COUNTS[1], f"{algorithm}: {end - _COUNTS[1]} jit lowerings after step 1"
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["time/train"] > 0 and r["time/rollout"] > 0 for r in recs)
    assert recs[1]["time/eval"] > 0  # step 1's evaluation is timed in step 2's record
    summary = json.load(open(tmp_path / "timeline.json"))
    assert summary["steps"] == 3 and summary["phases"]["train"]["s"] > 0
