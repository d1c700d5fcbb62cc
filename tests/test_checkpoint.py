"""Orbax checkpointer: round trip, keep-last-k, corrupt/partial fallback; logging helpers."""

import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from awm_jax.checkpoint import Checkpointer, CheckpointFormatError, CheckpointRestoreWarning, flat_params
from awm_jax.logging_lib import JsonlLog, image_grid


def _items(s):
    return {
        "trainable": {"blocks": {"0": {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * s}}},
        "opt_state": ({"mu": jnp.full((3,), s, jnp.bfloat16)}, {"count": jnp.asarray(s, jnp.int32)}),
        "kl_ema": None,  # a run without one: the item is left out
        "rng": {"key_data": np.array([s, s + 1], np.uint32)},
        "meta": {"step": s, "data_position": 10 * s},
        "config": {"seed": s},
    }


def _templates():
    t = _items(0)
    return {k: t[k] for k in ("trainable", "opt_state", "rng", "kl_ema") if t[k] is not None}


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


def test_round_trip_and_keep_last(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep=2, async_save=True)
    for s in (1, 2, 3):
        ck.save(s, _items(s))
    ck.wait()
    assert ck.all_steps() == [2, 3]
    assert ck.items_at(3) == {"trainable", "opt_state", "rng", "meta", "config"}
    step, out = ck.restore_latest(_templates())
    assert step == 3 and out["meta"] == {"step": 3, "data_position": 30}
    for k in ("trainable", "opt_state", "rng"):
        _same(out[k], _items(3)[k])
    ck.close()


def test_trainable_alone_by_name_without_target(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep=2, async_save=False)
    ck.save(5, _items(5))
    ck.close()
    ro = Checkpointer(str(tmp_path / "ck"), read_only=True)
    out = ro.restore(5, ["trainable", "config"])
    assert set(out) == {"trainable", "config"} and out["config"] == {"seed": 5}
    flat = flat_params(out["trainable"])
    assert list(flat) == ["blocks.0.w"]
    np.testing.assert_array_equal(flat["blocks.0.w"], np.arange(6).reshape(2, 3) * 5)
    with pytest.raises(KeyError, match="no item 'kl_ema'"):
        ro.restore(5, ["kl_ema"])
    ro.close()


def write_positional_checkpoint(directory, step: int) -> None:
    """A checkpoint in the old positional layout (one ``state`` item of numbered leaves + ``meta``)."""
    old = ocp.CheckpointManager(str(directory), item_names=("state", "meta"),
                                options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    old.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"leaves": {"00000": np.zeros(2)}}),
                                           meta=ocp.args.JsonSave({"step": step})))
    old.close()


def test_old_positional_layout_is_named(tmp_path):
    d = tmp_path / "ck"
    write_positional_checkpoint(d, 4)
    ck = Checkpointer(str(d), async_save=False)
    with pytest.raises(CheckpointFormatError, match="old positional layout.*start a new --workdir"):
        ck.restore_latest(_templates())
    assert ck.all_steps() == [4]  # nothing quarantined or lost
    ck.close()


def test_empty_dir_restores_none(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep=2, async_save=False)
    assert ck.restore_latest(_templates()) is None
    with pytest.raises(ValueError, match="unknown checkpoint items"):
        ck.save(1, {"state": {}})
    ck.close()


@pytest.mark.parametrize("damage", ["corrupt", "partial"])
def test_bad_latest_falls_back_with_warning(tmp_path, damage):
    d = tmp_path / "ck"
    ck = Checkpointer(str(d), keep=3, async_save=False)
    for s in (1, 2):
        ck.save(s, _items(s))
    ck.wait()
    if damage == "corrupt":
        for f in (d / "2" / "trainable").rglob("*"):
            if f.is_file() and "ocdbt" in f.name:
                f.write_bytes(b"garbage")
    else:  # files of the trainable item gone, as if the writer died half-way
        shutil.rmtree(d / "2" / "trainable")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        step, out = ck.restore_latest(_templates())
    assert step == 1 and out["meta"]["step"] == 1
    _same(out["trainable"], _items(1)["trainable"])
    assert any(issubclass(x.category, CheckpointRestoreWarning) and "step 2" in str(x.message) for x in w)
    # the bad step is moved aside, so step 2 can be saved again
    assert ck.all_steps() == [1]
    ck.save(2, _items(2))
    ck.wait()
    assert ck.restore_latest(_templates())[0] == 2
    ck.close()


def test_jsonl_truncate(tmp_path):
    log = JsonlLog(str(tmp_path / "m.jsonl"))
    for s in (1, 2, 3, 4):
        log.write({"step": s, "loss": np.float32(s) / 2})
    with open(log.path, "a") as f:
        f.write('{"step": 5, "lo')  # a line cut by a crash
    assert log.truncate_after(2) == 2
    assert [r["step"] for r in log.read()] == [1, 2]
    assert json.loads(open(log.path).readline())["loss"] == 0.5


def test_image_grid_has_captions():
    imgs = np.zeros((3, 16, 16, 3), np.uint8) + 255
    with_cap = np.asarray(image_grid(imgs, ["a red circle", "two squares", "x"]))
    no_cap = np.asarray(image_grid(imgs, ["", "", ""]))
    assert with_cap.shape == no_cap.shape and with_cap.shape[0] > 2 * 128
    assert (with_cap != no_cap).any()  # text pixels under the images
