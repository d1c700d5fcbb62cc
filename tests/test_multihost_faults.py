"""Two JAX processes (CPU, gloo): a host whose scorer hangs past ``reward.timeout_s`` (or fails) makes EVERY
host stop with the same named error, instead of leaving the other one waiting in the reward all-gather.

Each process scores its rows through the trainer's path (:class:`RewardBridge` -> :func:`run_faults.agreed`
-> the reward all-gather :func:`distributed.gather_rows`); process ``BAD``'s scorer hangs (or raises). Both
processes must exit with the same error line within seconds (a hung collective fails the test through the
subprocess timeout).
"""

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys, threading, time
import numpy as np
from awm_jax import distributed, run_faults
from awm_jax.rewards.bridge import RewardBridge

port, pid, bad, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
distributed.initialize(f"127.0.0.1:{port}", 2, pid)
stop = threading.Event()

def scorer(images, prompts, metadata):
    if pid == bad:
        if mode == "hang":
            stop.wait(60)
        else:
            raise ConnectionError("reward server unreachable")
    return np.ones(len(prompts), np.float32)

bridge = RewardBridge(scorer, retries=1, gather=False, timeout_s=1.0, name="fake")
imgs = np.zeros((2, 4, 4, 3), np.uint8)
pos = np.arange(2) + 2 * pid
try:
    local = run_faults.agreed(lambda: bridge.submit(imgs, ["a", "b"]).result())
    print("gathered", distributed.gather_rows(local, pos, 4).tolist(), flush=True)
except run_faults.ScorerFailedError as e:
    print(f"ERROR {type(e).__name__}: {e}", flush=True)
    sys.exit(run_faults.EXIT_SCORER)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_hosts_hanging_scorer_stops_every_host_with_the_same_error(tmp_path, mode="hang"):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port = _free_port()
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(port), str(i), "0", mode], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0].decode())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    took = time.monotonic() - t0
    errors = [[x for x in o.splitlines() if x.startswith("ERROR ")] for o in outs]
    assert [p.returncode for p in procs] == [4, 4], outs
    assert len(errors[0]) == 1 and errors[0] == errors[1], outs  # the same named error on both hosts
    why = "TimeoutError: no answer within reward.timeout_s = 1 s" if mode == "hang" else "ConnectionError"
    assert errors[0][0].startswith("ERROR ScorerFailedError: process 0: reward scorer 'fake' failed after 2")
    assert why in errors[0][0], errors[0][0]
    assert not any("gathered" in o for o in outs)
    assert took < 100, took
