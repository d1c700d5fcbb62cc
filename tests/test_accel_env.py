"""The accelerator environment set before JAX starts (no GPU needed): the GPU allocator fraction when a reward
runs on cuda, the user's own settings kept, the message when it is too late; libtpu's lock holders named."""

import os
import subprocess
import sys

import pytest

from awm_jax import accel_env, config_lib


def _cfg(**over):
    c = config_lib.load_config("configs/sd35m_geneval.py")
    config_lib.apply_overrides(c, list(over.items()))
    return c


def test_fraction_set_when_a_reward_runs_on_cuda():
    env = {}
    msg = accel_env.configure_gpu(accel_env.reward_devices(_cfg(**{"reward.geneval.device": "cuda"})), 0.6,
                                  environ=env, started=False)
    assert env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.60"}
    assert "cuda" in msg and "60%" in msg and "gpu.jax_mem_fraction" in msg
    # pickscore on cuda:1 through its section; another reward through reward.kwargs
    cfg = _cfg(**{"reward.name": "pickscore", "reward.pickscore.device": "cuda:1"})
    assert accel_env.reward_devices(cfg) == ["cuda:1"]
    cfg = _cfg(**{"reward.name": "aesthetic", "reward.kwargs.device": "cuda"})
    assert accel_env.reward_devices(cfg) == ["cuda"]


def test_nothing_changes_on_cpu_or_with_fraction_zero():
    env = {}
    assert accel_env.configure_gpu(accel_env.reward_devices(_cfg()), 0.6, environ=env, started=False) is None
    assert accel_env.configure_gpu(["cuda"], 0.0, environ=env, started=False) is None
    assert env == {}
    with pytest.raises(ValueError, match="gpu.jax_mem_fraction"):
        accel_env.configure_gpu(["cuda"], 1.5, environ=env, started=False)


def test_user_settings_win_and_late_start_is_reported():
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    msg = accel_env.configure_gpu(["cuda"], 0.6, environ=env, started=False)
    assert env == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} and "XLA_PYTHON_CLIENT_PREALLOCATE=false" in msg
    env = {}
    msg = accel_env.configure_gpu(["cuda"], 0.5, environ=env, started=True)
    assert env == {} and "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.50" in msg


def test_trainer_sets_the_fraction_before_jax_starts(tmp_path):
    """``python -m awm_jax.train --check`` with a cuda reward: the pre-flight line, and a JAX process started
    after it would read the fraction (checked in the same child process, before its backend starts)."""
    code = ("import os, sys; from awm_jax import train; "
            "rc = train.main(sys.argv[1:]); "
            "print('FRACTION', os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_PYTHON_CLIENT")}
    res = subprocess.run([sys.executable, "-c", code, "--config", "configs/toy.py", "--workdir",
                          str(tmp_path / "wd"), "--config.reward.kwargs.device=cuda", "--check"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert "FRACTION 0.60" in res.stdout, res.stdout + res.stderr
    assert "JAX preallocates 60% of the GPU memory" in res.stdout


def test_lock_holders_and_plan_environment(tmp_path):
    lock = tmp_path / "libtpu_lockfile"
    lock.write_text("")
    with open(lock):  # this process holds it
        holders = accel_env.lock_holders(str(lock))
        assert os.getpid() in [pid for pid, _ in holders]
        line = accel_env.lock_message(str(lock))
        assert str(lock) in line and f"pid {os.getpid()}" in line and "\n" not in line
    assert os.getpid() not in [pid for pid, _ in accel_env.lock_holders(str(lock))]
    env = {}
    accel_env.allow_shared_libtpu(env)
    assert env == {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def test_plan_allows_a_shared_libtpu():
    """``python -m awm_jax.plan`` sets ALLOW_MULTIPLE_LIBTPU_LOAD before any backend starts (here it stops at
    an unknown topology, exit 2)."""
    code = ("import os, sys; from awm_jax import plan; "
            "rc = plan.main(['--config', 'configs/toy.py', '--topology', 'v9z:1x1']); "
            "print('ALLOW', os.environ.get('ALLOW_MULTIPLE_LIBTPU_LOAD'), rc)")
    env = {k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert "ALLOW 1 2" in res.stdout, res.stdout + res.stderr
    assert "v9z:1x1" in res.stderr
