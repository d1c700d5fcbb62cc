"""The host side of a step's rollouts (``awm_jax.rl.collect``): block i + 1 is on the devices before block i's
images are scored, and the batch and rewards come back in the global row order."""

import types
from concurrent.futures import Future

import jax
import ml_collections
import numpy as np

from awm_jax.rl.collect import prepare, rollout_epoch
from awm_jax.timeline import Timeline


def _fakes(events: list, n: int):
    def rollout(params, base, emb, pooled, key):
        i = sum(e[0] == "rollout" for e in events)
        events.append(("rollout", i))
        return {"x0": np.asarray(emb)[:, :1, :1] + 0.0}

    def decode(x0):
        events.append(("decode", int(np.asarray(x0)[0, 0, 0])))
        return np.asarray(x0)[:, 0, 0]

    def submit(images, prompts, metadata):
        events.append(("score", int(images[0])))
        f = Future()
        f.set_result(np.asarray(images, np.float32) * 10)
        return f

    pipeline = types.SimpleNamespace(decode=decode)
    comp = types.SimpleNamespace(rollout=rollout, base_state=None, pipeline=pipeline)
    sampler = types.SimpleNamespace(global_indices=lambda step: (np.arange(n), np.arange(n) // 2))
    dataset = types.SimpleNamespace(take=lambda idx: ([f"p{i}" for i in idx], [{} for _ in idx]))
    # row i's embedding holds i: the fake rollout's x0 carries the row index through decode and scoring
    embed = types.SimpleNamespace(encode=lambda prompts: (
        np.array([[[float(p[1:])]] for p in prompts], np.float32), np.zeros((len(prompts), 2), np.float32)))
    return comp, sampler, dataset, embed, types.SimpleNamespace(submit=submit)


def test_next_block_is_dispatched_before_this_block_is_scored():
    events: list = []
    block_rows = 2
    config = ml_collections.ConfigDict({"sample": {"batch_size": block_rows // jax.device_count() or 1}})
    block = config.sample.batch_size * jax.device_count()
    n = 3 * block
    comp, sampler, dataset, embed, bridge = _fakes(events, n)
    tl = Timeline()
    prepared = prepare(config, sampler, dataset, embed, 1)
    batch, rewards, pos = rollout_epoch(comp, config, None, None, embed, sampler, dataset, bridge, 1,
                                        jax.random.key(0), tl, prepared)
    # blocks: rollout 0, decode 0, rollout 1 ... before score 0; rollout 2 before score 1
    order = {e: k for k, e in enumerate(events)}
    assert order[("rollout", 1)] < order[("score", 0)]
    assert order[("rollout", 2)] < order[("score", block)]
    assert [e for e in events if e[0] == "score"] == [("score", 0), ("score", block), ("score", 2 * block)]
    np.testing.assert_array_equal(rewards, 10 * np.arange(n))  # global row order
    np.testing.assert_array_equal(np.asarray(batch["x0"])[:, 0, 0], np.arange(n))
    np.testing.assert_array_equal(pos, np.arange(n))
    lap = tl.lap()
    assert all(lap[f"time/{k}"] >= 0 for k in ("rollout", "decode", "score")) and lap["time/text_encode"] == 0
