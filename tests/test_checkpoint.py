"""Orbax checkpointer: round trip, keep-last-k, corrupt/partial fallback; logging helpers."""

import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.checkpoint import Checkpointer, CheckpointRestoreWarning
from awm_jax.logging_lib import JsonlLog, image_grid


def _state(s):
    return {
        "w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * s,
        "opt": {"mu": jnp.full((3,), s, jnp.bfloat16), "count": jnp.asarray(s, jnp.int32)},
        "rng": np.array([s, s + 1], np.uint32),
    }


def test_round_trip_and_keep_last(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep=2, async_save=True)
    for s in (1, 2, 3):
        ck.save(s, _state(s), {"step": s, "data_position": 10 * s})
    ck.wait()
    assert ck.all_steps() == [2, 3]
    step, state, meta = ck.restore_latest(_state(0))
    assert step == 3 and meta == {"step": 3, "data_position": 30}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(3))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype
    ck.close()


def test_empty_dir_restores_none(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep=2, async_save=False)
    assert ck.restore_latest(_state(0)) is None
    ck.close()


@pytest.mark.parametrize("damage", ["corrupt", "partial"])
def test_bad_latest_falls_back_with_warning(tmp_path, damage):
    d = tmp_path / "ck"
    ck = Checkpointer(str(d), keep=3, async_save=False)
    for s in (1, 2):
        ck.save(s, _state(s), {"step": s})
    ck.wait()
    if damage == "corrupt":
        for f in (d / "2" / "state").rglob("*"):
            if f.is_file() and "ocdbt" in f.name:
                f.write_bytes(b"garbage")
    else:  # files of the state item gone, as if the writer died half-way
        shutil.rmtree(d / "2" / "state")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        step, state, meta = ck.restore_latest(_state(0))
    assert step == 1 and meta["step"] == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(1)["w"]))
    assert any(issubclass(x.category, CheckpointRestoreWarning) and "step 2" in str(x.message) for x in w)
    # the bad step is moved aside, so step 2 can be saved again
    assert ck.all_steps() == [1]
    ck.save(2, _state(2), {"step": 2})
    ck.wait()
    assert ck.restore_latest(_state(0))[0] == 2
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
