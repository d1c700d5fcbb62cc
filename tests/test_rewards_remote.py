"""Reward servers on loopback (awm_jax/rewards/serve.py + remote.py): two real server processes, one dies
mid-step and the step completes on the other with every row scored once; all endpoints down -> named error."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from pool_scorers import expected

from awm_jax import config_lib, rewards
from awm_jax.rewards.base import RewardConfigError, RewardError
from awm_jax.rewards.bridge import RewardBridge
from awm_jax.rewards.remote import RemoteScorer
from awm_jax.rewards.serve import decode_request, encode_request

NAME = "pool_scorers:RowScorer"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _server(mortal: bool):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")]),
               POOL_SCORERS_MORTAL="1" if mortal else "0", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "awm_jax.rewards.serve", "--reward", "pool_scorers:RowScorer", "--port", "0",
           "--config.reward.kwargs.scale=2.0"]
    proc = subprocess.Popen(cmd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    return proc


@pytest.fixture(scope="module")
def servers():
    procs = [_server(mortal=True), _server(mortal=False)]  # started together: their imports overlap
    urls = []
    try:
        for p in procs:
            line = p.stdout.readline()
            assert "serving 'pool_scorers:RowScorer' on http://127.0.0.1:" in line, (line, p.stderr.read())
            urls.append(line.split(" on ")[1].strip())
        yield procs, urls
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _batch(b=6):
    imgs = np.random.default_rng(1).integers(0, 256, (b, 4, 4, 3), dtype=np.uint8)
    return imgs, [f"p{'x' * i}" for i in range(b)]


def test_wire_format_round_trip_without_pickle():
    imgs, prompts = _batch(3)
    meta = [{"tag": "a"}, {}, {"n": [1, 2]}]
    got = decode_request(encode_request(imgs, prompts, meta))
    np.testing.assert_array_equal(got[0], imgs)
    assert got[1] == prompts and got[2] == meta
    with pytest.raises(ValueError, match="npz"):
        decode_request(b"\x80\x04pickle")


def test_spread_death_mid_step_and_all_down(servers):
    (mortal, other), urls = servers
    config = config_lib.load_config(os.path.join(ROOT, "configs", "toy.py"))  # built the trainer's way
    config.reward.name, config.reward.remote, config.reward.remote_timeout_s = NAME, tuple(urls), 30.0
    assert rewards.config_problems(config) == []  # nothing of the scorer's needed on this host
    scorer = rewards.from_config(config)
    assert isinstance(scorer, RemoteScorer) and scorer.urls == urls
    imgs, prompts = _batch(6)
    want = expected(imgs, prompts, 2.0)
    ev = scorer.evaluate(imgs, prompts)  # both endpoints take a chunk of 3
    np.testing.assert_array_equal(ev["score"], want)
    assert sorted(set(ev["pid"].tolist())) == sorted([mortal.pid, other.pid])
    # the step's scoring through the bridge; the mortal server's process dies on its chunk (rows 0..2)
    bridge = RewardBridge(scorer, retries=0)
    r = bridge.score(imgs, prompts, [{"die": True}] * 6)
    np.testing.assert_array_equal(r, want)  # completed on the other endpoint
    assert mortal.wait(10) == 3
    with urllib.request.urlopen(f"{urls[1]}/health", timeout=10) as resp:  # 3 (evaluate) + 3 own + 3 re-sent
        assert json.loads(resp.read())["scored"] == 9
    ev = scorer.evaluate(imgs, prompts)  # only the survivor now: every row once, from one process
    assert ev["pid"].tolist() == [other.pid] * 6
    slow = RemoteScorer(urls, timeout_s=0.5)  # the survivor hangs past the timeout: named, then re-probed
    with pytest.raises(RewardError, match=r"all 2 reward endpoints are down: .*timed out"):
        slow(imgs[:1], prompts[:1], [{"sleep": 1.5}])
    time.sleep(1.5)
    np.testing.assert_array_equal(slow(imgs, prompts), want)  # back after a health check
    named = r"endpoint http://127\.0\.0\.1:\d+ failed 1 time\(s\).*asked to fail"  # retries 0: the bridge
    with pytest.raises(RewardError, match=named):
        scorer(imgs, prompts, [{"fail": True}] * 6)  # a scorer error is named, not an endpoint death
    with pytest.raises(RewardError, match=r"failed 3 time\(s\).*asked to fail"):  # RemoteScorer(retries=2)
        slow(imgs, prompts, [{"fail": True}] * 6)
    other.kill()
    other.wait()
    with pytest.raises(RewardError, match=r"all 2 reward endpoints are down: http://127.*'pxxx'"):
        scorer(imgs, prompts)
    with pytest.raises(RewardConfigError, match="no endpoint answers"):
        RemoteScorer(urls, timeout_s=5)
