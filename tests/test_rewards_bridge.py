"""The host reward bridge: transfer, multi-host gather, retries, NaN/inf, overlap."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from awm_jax.rewards.bridge import RewardBridge, RewardError, gather_rewards, local_rows, shard_rows


def _images(b=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, 4, 6, 3), dtype=np.uint8)


def mean_scorer(images, prompts, metadata):
    return images.reshape(len(images), -1).mean(-1).astype(np.float32) + np.array([len(p) for p in prompts])


class Flaky:
    """Fails ``fails`` times (exception or a bad value), then scores."""

    def __init__(self, fails, bad=None):
        self.fails, self.bad, self.calls = fails, bad, 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        r = mean_scorer(images, prompts, metadata)
        if self.calls <= self.fails:
            if self.bad is None:
                raise ConnectionError("reward server unreachable")
            r[1] = self.bad
        return r


def test_score_numpy_and_sharded_jax_arrays_agree():
    imgs, prompts = _images(8), [f"prompt {i}" * (i + 1) for i in range(8)]
    want = mean_scorer(imgs, prompts, None)
    bridge = RewardBridge(mean_scorer)
    np.testing.assert_allclose(bridge.score(imgs, prompts), want)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    for spec in (PartitionSpec("data"), PartitionSpec(("data", "model")), PartitionSpec()):
        x = jax.device_put(jnp.asarray(imgs), NamedSharding(mesh, spec))
        rows, host, b = local_rows(x)
        assert b == 8 and rows.tolist() == list(range(8))
        np.testing.assert_array_equal(host, imgs)
        np.testing.assert_allclose(bridge.score(x, prompts), want)
        np.testing.assert_allclose(bridge.submit(x, prompts).result(), want)
        # the multi-host path (addressable shards, replicated copies taken once) gives the same rows
        rows, host, b = shard_rows(x)
        assert b == 8 and rows.tolist() == list(range(8))
        np.testing.assert_array_equal(host, imgs)
    x = jax.device_put(jnp.asarray(imgs), NamedSharding(mesh, PartitionSpec(None, "data")))
    with pytest.raises(ValueError, match="sharded along the batch axis only"):
        shard_rows(x)


def test_gather_rewards_two_simulated_hosts():
    # process 0 holds rows 0,1,4,5 and process 1 rows 2,3,6,7 (an interleaved batch sharding)
    rows = {0: np.array([0, 1, 4, 5]), 1: np.array([2, 3, 6, 7])}
    rew = {p: r.astype(np.float32) * 10 for p, r in rows.items()}
    state = {"calls": 0}

    def allgather(x):  # what process_allgather returns: the (processes, n) stack, same on every host
        state["calls"] += 1
        key = "rows" if x.dtype == np.int32 else "rew"
        return np.stack([(rows if key == "rows" else rew)[p].astype(x.dtype) for p in (0, 1)])

    out = gather_rewards(rows[0], rew[0], 8, allgather)
    np.testing.assert_array_equal(out, np.arange(8) * 10.0)
    assert state["calls"] == 2
    with pytest.raises(RewardError, match=r"rows \[7\]"):
        gather_rewards(np.arange(7), np.zeros(7), 8, lambda x: np.asarray(x)[None])


def test_real_process_allgather_single_process():
    from jax.experimental import multihost_utils

    out = gather_rewards(np.arange(4), np.arange(4.0), 4, lambda x: multihost_utils.process_allgather(x))
    np.testing.assert_array_equal(out, np.arange(4.0))


def test_prompt_selection_and_length_errors():
    imgs = _images(4)
    bridge = RewardBridge(lambda i, p, m: np.array([float(x["v"]) for x in m], np.float32))
    meta = [{"v": i} for i in range(4)]
    np.testing.assert_array_equal(bridge.score(imgs, list("abcd"), meta), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="got 3 prompts for a batch of 4"):
        bridge.score(imgs, list("abc"))
    with pytest.raises(ValueError, match="uint8"):
        bridge.score(imgs.astype(np.float32), list("abcd"))


def test_retry_then_success():
    s = Flaky(fails=2)
    r = RewardBridge(s, retries=2).score(_images(4), list("abcd"))
    assert s.calls == 3
    np.testing.assert_allclose(r, mean_scorer(_images(4), list("abcd"), None))


def test_retries_exhausted_names_scorer_prompt_and_error():
    s = Flaky(fails=5)
    with pytest.raises(RewardError) as e:
        RewardBridge(s, retries=1, name="ocr").score(_images(2), ["a sign saying \"hi\"", "b"])
    msg = str(e.value)
    assert "'ocr'" in msg and "2 attempt(s)" in msg and "sign saying" in msg
    assert "ConnectionError" in msg and "unreachable" in msg
    assert isinstance(e.value.__cause__, ConnectionError) and s.calls == 2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rewards_are_errors(bad):
    prompts = ["good prompt", "the bad prompt", "other"]
    with pytest.raises(RewardError) as e:
        RewardBridge(Flaky(fails=10, bad=bad), retries=1, name="pickscore").score(_images(3), prompts)
    msg = str(e.value)
    assert "non-finite" in msg and "'the bad prompt'" in msg and "good prompt" not in msg
    s = Flaky(fails=1, bad=bad)  # a transient NaN is retried
    assert np.isfinite(RewardBridge(s, retries=1).score(_images(3), prompts)).all() and s.calls == 2


def test_wrong_output_shape_is_an_error():
    bridge = RewardBridge(lambda i, p, m: np.zeros((len(p), 2)), retries=0, name="multi")
    with pytest.raises(RewardError, match=r"'multi'.*returned shape \(2, 2\)"):
        bridge.score(_images(2), ["a", "b"])


def test_submit_overlaps_with_caller():
    started, release = threading.Event(), threading.Event()

    def slow(images, prompts, metadata):
        started.set()
        assert release.wait(30), "the caller never released the scorer"
        return mean_scorer(images, prompts, metadata)

    imgs = _images(4)
    with RewardBridge(slow) as bridge:
        pending = bridge.submit(jnp.asarray(imgs), list("abcd"))  # returns while the scorer runs
        assert started.wait(30)
        assert not pending.done()
        # the caller keeps working (e.g. samples the next batch) while scoring is in flight
        nxt = jax.jit(lambda x: x * 2)(jnp.ones(4))
        assert float(nxt.sum()) == 8.0 and not pending.done()
        release.set()
        np.testing.assert_allclose(pending.result(timeout=30), mean_scorer(imgs, list("abcd"), None))
        # results come back in submission order, failures surface at result()
        p1, p2 = bridge.submit(imgs, list("abcd")), bridge.submit(imgs[:2], list("ab"))
        assert p1.result().shape == (4,) and p2.result().shape == (2,)
        bridge.scorer = Flaky(fails=9)
        bridge.retries = 0
        failing = bridge.submit(imgs, list("abcd"))
        with pytest.raises(RewardError, match="unreachable"):
            failing.result(timeout=30)


def test_evaluate_passes_through():
    class WithEval:
        def __call__(self, images, prompts, metadata):
            return np.zeros(len(prompts), np.float32)

        def evaluate(self, images, prompts, metadata):
            return {"accuracy": np.array([1.0, 0.0, 1.0], np.float32), "tag": ["a", "b", "a"]}

    out = RewardBridge(WithEval()).evaluate(_images(3), list("xyz"))
    np.testing.assert_array_equal(out["accuracy"], [1.0, 0.0, 1.0])
    assert out["tag"] == ["a", "b", "a"]
    with pytest.raises(AttributeError, match="has no evaluate"):
        RewardBridge(mean_scorer).evaluate(_images(3), list("xyz"))
