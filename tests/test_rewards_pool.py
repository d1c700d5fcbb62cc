"""The reward worker pool (awm_jax/rewards/pool.py): order, worker processes and threads, named failures,
respawn, construction errors, the config hook."""

import os

import numpy as np
import pytest
from pool_scorers import expected

from awm_jax import config_lib, rewards
from awm_jax.rewards.base import RewardConfigError, RewardError
from awm_jax.rewards.bridge import RewardBridge
from awm_jax.rewards.pool import ScorerPool, default_workers, resolve_workers

NAME = "pool_scorers:RowScorer"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pool():
    """Built the trainer's way: ``rewards.from_config`` with ``reward.workers = 2``."""
    config = config_lib.load_config(os.path.join(ROOT, "configs", "toy.py"))
    config.reward.name, config.reward.workers, config.reward.worker_threads = NAME, 2, 1
    config.reward.kwargs.scale = 2.0
    p = rewards.from_config(config)
    assert isinstance(p, ScorerPool) and p.workers == 2 and p.threads == 1
    yield p
    p.close()
    assert p.pids() == [None, None]


def _batch(b=5):
    imgs = np.random.default_rng(0).integers(0, 256, (b, 4, 4, 3), dtype=np.uint8)
    return imgs, [f"prompt {'x' * i}" for i in range(b)]


def test_pool_scores_in_row_order_across_two_processes(pool):
    imgs, prompts = _batch(5)
    np.testing.assert_array_equal(pool(imgs, prompts), expected(imgs, prompts, 2.0))
    ev = pool.evaluate(imgs, prompts, None)
    np.testing.assert_array_equal(ev["score"], expected(imgs, prompts, 2.0))
    assert len(set(ev["pid"].tolist())) == 2 and os.getpid() not in ev["pid"].tolist()
    assert ev["omp"] == ["1"] * 5 and ev["ort"] == [1] * 5  # each worker's threads (torch, onnxruntime)
    bridge = RewardBridge(pool, gather=False)  # behind the reward bridge like any scorer
    np.testing.assert_array_equal(bridge.submit(imgs, prompts).result(), expected(imgs, prompts, 2.0))
    assert bridge.evaluate(imgs, prompts)["pid"].tolist() == ev["pid"].tolist()
    one = pool(imgs[:1], prompts[:1])  # fewer rows than workers
    np.testing.assert_array_equal(one, expected(imgs[:1], prompts[:1], 2.0))


def test_worker_death_is_named_and_the_worker_replaced(pool):
    imgs, prompts = _batch(4)
    meta = [{}, {}, {}, {"die": True}]  # rows 2..3 go to worker 1
    before = pool.pids()
    died = r"worker 1 \(pid \d+\) died \(exit code 3\) on rows 2\.\.3.*prompt xxx"
    with pytest.raises(RewardError, match=died):
        pool(imgs, prompts, meta)
    r = pool(imgs, prompts)  # the next call (the bridge's retry) runs on a fresh worker 1
    np.testing.assert_array_equal(r, expected(imgs, prompts, 2.0))
    after = pool.pids()
    assert after[0] == before[0] and after[1] != before[1]
    with pytest.raises(RewardError, match=r"worker 0 .* raised RuntimeError: asked to fail.*rows 0\.\.1"):
        pool(imgs, prompts, [{"fail": True}, {}, {}, {}])
    assert pool.pids() == after  # a raising worker stays


def test_bad_scorer_config_fails_at_construction_naming_it():
    with pytest.raises(RewardConfigError, match="scale must be > 0"):
        ScorerPool(NAME, workers=1, scale=-1.0)
    with pytest.raises(RewardConfigError, match="unknown reward 'nope'"):
        ScorerPool("nope", workers=2)


def test_workers_config_value():
    config = config_lib.load_config(os.path.join(ROOT, "configs", "toy.py"))
    config.reward.name, config.reward.workers = "jpeg_compressibility", 1
    assert not isinstance(rewards.from_config(config), ScorerPool)  # 0 / 1: in-process
    assert default_workers(2) == 1 and default_workers(180) == 45
    assert resolve_workers(-1, 16) == 4 and resolve_workers(0) == 1 and resolve_workers(3) == 3
    assert resolve_workers(-1, 16, "geneval") == 4 and resolve_workers(-1, 16, "ocr") == 4
    assert resolve_workers(-1, 16, "toy_geneval") == resolve_workers(-1, 16, "jpeg_compressibility") == 1
    with pytest.raises(RewardConfigError, match="reward.workers"):
        resolve_workers("many")
