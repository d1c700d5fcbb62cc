"""Multi-host training with several JAX processes on CPU (gloo collectives), the toy pipeline at tiny sizes.

One launch of ``python -m awm_jax.train`` per process (``--coordinator_address/--num_processes/--process_id``,
2 fake CPU devices each) against one process with 4 devices: the same config and seed give the same rewards
and losses per step, and a 2-process run stopped after step 2 and resumed reaches step 4 with the
uninterrupted run's numbers; each epoch makes two optimizer steps (``train.steps_per_epoch``: the parts are
drawn from the global batch, the same on every process). Every subprocess has a timeout, so a hung
collective fails the test.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 400  # per launch; the runs take ~10-40 s on a loaded 2-core machine

OVERRIDES = {
    "data.group_size": 4, "data.prompts_per_step": 2, "sample.batch_size": 2,
    "sample.num_steps": 3, "train.micro_batch_size": 4, "eval.every": 0, "log.progress": "false",
    "log.tensorboard": "false", "checkpoint.every": 2, "checkpoint.async_save": "true",
    "reward.name": "jpeg_compressibility",  # a continuous reward: non-zero advantages and losses
    "train.steps_per_epoch": 2,  # two optimizer steps on shuffled halves of each epoch's global rollouts
}
# XLA:CPU without its expensive optimisations: half the compile time of the train step; every run of the test
# compiles with the same flags, so the 1-vs-2-process and resume comparisons are unaffected
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
KEYS = ("reward_mean", "reward_std", "loss", "policy_loss", "kl", "grad_norm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_model(path):
    """A random one-block toy checkpoint (the shipped toy has 4): a quarter of the train step to compile, the
    same code paths (the block is the dual-attention one, like the toy's first)."""
    from awm_jax.toy import world

    cfg = world.default_config()
    cfg["transformer"] = dict(cfg["transformer"], num_layers=1)
    transformer, text = world.build_models(cfg, seed=0)
    world.save_toy_checkpoint(path, transformer, text, cfg, dtype="float32")
    return path


def _launch(workdir, processes: int, devices: int, max_steps: int, model, cache):
    """Start ``processes`` trainer processes (``devices`` CPU devices each); returns the Popen objects.

    Every launch shares the compilation cache ``cache``: the resumed launch (same workdir, same topology)
    loads the first launch's executables instead of compiling them again."""
    args = [sys.executable, "-m", "awm_jax.train", "--config", os.path.join(ROOT, "configs", "toy.py"),
            "--workdir", str(workdir), f"--config.max_steps={max_steps}", f"--config.model.path={model}"]
    args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", AWM_JAX_COMPILE_CACHE=str(cache),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port = _free_port()
    procs = []
    for i in range(processes):
        extra = ([] if processes == 1 else
                 ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(processes),
                  "--process_id", str(i)])
        log = open(f"{workdir}.log{i}", "w")
        procs.append(subprocess.Popen(args + extra, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs, workdir):
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        if p.returncode != 0:
            tail = open(f"{workdir}.log{i}").read()[-3000:]
            pytest.fail(f"process {i} of {workdir} exited {p.returncode}:\n{tail}")


def _metrics(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    one, two = base / "one_x4", base / "two_x2"
    model, cache = _toy_model(base / "toy_1block"), base / "jax_cache"
    a = _launch(one, 1, 4, 4, model, cache)  # uninterrupted, one process with 4 devices, concurrently with
    b = _launch(two, 2, 2, 2, model, cache)  # two processes, stopped after step 2 ...
    _wait(b, two)
    b2 = _launch(two, 2, 2, 4, model, cache)  # ... and resumed to step 4
    _wait(a, one)
    _wait(b2, two)
    return one, two


def test_two_processes_match_one_process_and_resume(runs):
    one, two = runs
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m1] == [1, 2, 3, 4]
    assert [r["step"] for r in m2] == [1, 2, 3, 4]  # steps 3-4 came from the resumed launch
    assert "resumed from step 2" in open(f"{two}.log0").read()
    assert [r["opt_steps"] for r in m1] == [2, 4, 6, 8] and [r["opt_steps"] for r in m2] == [2, 4, 6, 8]
    for r1, r2 in zip(m1, m2):
        for k in KEYS:
            # same samples, noise and global order: rewards agree exactly; losses and gradient norms to ~1e-6
            # relative (the cross-process all-reduce sums in another order than the in-process one)
            np.testing.assert_allclose(r2[k], r1[k], rtol=1e-4, atol=1e-12, err_msg=f"step {r1['step']} {k}")
        assert r2["reward_mean"] == r1["reward_mean"]
    assert np.std([r["reward_mean"] for r in m1]) > 0 and any(abs(r["loss"]) > 0 for r in m1)
    # process 0 alone writes the logs; every process wrote its checkpoint shards into the shared directory
    assert sorted(os.listdir(two / "checkpoints")) == ["2", "4"]
    assert not os.path.exists(two / "tb")


def test_distributed_helpers_single_process():
    from awm_jax import distributed

    rest, flags = distributed.pop_distributed_flags(
        ["--config", "c.py", "--coordinator_address=h:1", "--num_processes", "2", "--process_id=1", "--x=1"])
    assert rest == ["--config", "c.py", "--x=1"]
    assert flags == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    with pytest.raises(ValueError, match="--num_processes='two'"):
        distributed.pop_distributed_flags(["--num_processes=two"])
    # 12 samples in blocks of 8 over 2 processes: each owns half of every block
    np.testing.assert_array_equal(distributed.local_positions(12, 8, 0, 2), [0, 1, 2, 3, 8, 9])
    np.testing.assert_array_equal(distributed.local_positions(12, 8, 1, 2), [4, 5, 6, 7, 10, 11])
    assert distributed.block_slices(12, 8, 2) == [slice(0, 4), slice(4, 6)]
    with pytest.raises(ValueError, match="not divisible by the 2 processes"):
        distributed.local_positions(9, 8, 0, 2)
    pos = distributed.local_positions(6, 4, 0, 1)
    np.testing.assert_array_equal(distributed.gather_rows(np.arange(6.0), pos, 6), np.arange(6.0))
    assert distributed.gather_strings(["a", "bé"], np.arange(2), 2) == ["a", "bé"]
    if distributed.detected_cluster() is None:  # (not when the suite itself runs under srun -n 2 ...)
        assert not distributed.initialize()  # a single host stays single-process
