"""Faults of the reward scorer, the evaluation, the disk and a second trainer (issue 26): bounded waits,
signals during a wait, a scorer that keeps failing, evaluation through the bridge, one writer per workdir, a
full disk.

The trainer runs in-process on the mock family of ``tests/test_train.py`` with a registered fake scorer
(``fault_scorer``) that hangs, fails or returns NaN on the training or the evaluation batches (6 images: the
evaluation's 3 prompts x 2 samples; training blocks hold 8).
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import test_train as tt

from awm_jax import checkpoint, rewards, train
from awm_jax.rewards.bridge import RewardBridge, RewardInterrupted, RewardTimeoutError
from awm_jax.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError

sys.modules.setdefault("test_faults_scorer", sys.modules[__name__])

EVAL_N = 6
# what the fake scorer does: mode per phase ("hang", "fail", "nan", "flaky" = fails once per batch), from
# which call of that phase on (1-based), how long a hang lasts at most (old code: the run goes on after it)
FAULT = {"train": None, "eval": None, "from": 1, "hang_s": 20.0}
_calls = {"train": 0, "eval": 0}
_release = threading.Event()
_hanging = threading.Event()


@rewards.register("fault_scorer")
class FaultScorer:
    name = "fault_scorer"

    def __init__(self):
        self._flaky_seen = set()

    def __call__(self, images, prompts, metadata):
        phase = "eval" if len(prompts) == EVAL_N else "train"
        _calls[phase] += 1
        r = np.asarray(images, np.float32)[..., 0].mean((1, 2)) / 255.0
        mode = FAULT[phase] if _calls[phase] >= FAULT["from"] else None
        if mode == "hang":
            _hanging.set()
            _release.wait(FAULT["hang_s"])
        elif mode == "fail":
            raise ConnectionError("reward server unreachable")
        elif mode == "nan":
            r[0] = np.nan
        elif mode == "flaky" and _calls[phase] not in self._flaky_seen:
            self._flaky_seen.add(_calls[phase])
            _calls[phase] -= 1  # the retry is the same batch
            raise ConnectionError("transient reward server error")
        return r


def fault_components(config):
    comp = tt.mock_components(config)
    comp.scorer = rewards.get("fault_scorer")
    return comp


@pytest.fixture(autouse=True)
def _reset():
    FAULT.update(train=None, eval=None, hang_s=20.0, **{"from": 1})
    _calls.update(train=0, eval=0)
    _release.clear()
    _hanging.clear()
    tt.MOCK.update(nan_calls=set(), report_finite=True, sleep=0.0)
    yield
    _release.set()  # abandoned hanging scorer threads end


def _main(wd, *extra) -> int:
    args = tt._cli(str(wd), "--config.components=test_faults_scorer:fault_components",
                   "--config.checkpoint.async_save=false", "--config.max_steps=4",
                   "--config.reward.retries=1",
                   *extra)[0]
    return train.main(args[3:])


def _first_err(capsys):
    cap = capsys.readouterr()
    lines = [x for x in cap.err.splitlines() if x.strip()]
    return cap.out, lines


def _steps(wd):
    return sorted(int(n) for n in os.listdir(wd / "checkpoints") if n.isdigit())


# ----------------------------------------------------------------------------- the bridge alone


def _imgs(n=2):
    return np.zeros((n, 4, 4, 3), np.uint8)


def test_bridge_timeout_is_retried_then_named():
    calls = []

    def hang(images, prompts, metadata):
        calls.append(1)
        _release.wait(20)
        return np.zeros(len(prompts), np.float32)

    t0 = time.monotonic()
    with pytest.raises(RewardTimeoutError, match=r"2 attempt\(s\).*no answer within reward.timeout_s = 0.2"):
        RewardBridge(hang, retries=1, gather=False, timeout_s=0.2).score(_imgs(), ["a", "b"])
    assert len(calls) == 2 and time.monotonic() - t0 < 5


def test_bridge_interrupt_ends_a_wait_at_once():
    def hang(images, prompts, metadata):
        _release.wait(20)
        return np.zeros(len(prompts), np.float32)

    def workers():
        return {t for t in threading.enumerate() if t.name.startswith("reward-bridge") and t.is_alive()}

    before = workers()
    bridge = RewardBridge(hang, retries=0, gather=False, timeout_s=0.0)
    pending = bridge.submit(_imgs(), ["a", "b"])
    threading.Timer(0.3, bridge.interrupt).start()
    t0 = time.monotonic()
    with pytest.raises(RewardInterrupted):
        pending.result()
    assert time.monotonic() - t0 < 3
    bridge.close()
    # the bridge's (non-daemon) worker is free too: a hung scorer must not block the interpreter's exit
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and workers() - before:
        time.sleep(0.05)
    assert not workers() - before


def test_bridge_evaluate_retries_and_checks_finite():
    class S:
        n = 0

        def __call__(self, images, prompts, metadata):
            return np.ones(len(prompts), np.float32)

        def evaluate(self, images, prompts, metadata):
            S.n += 1
            if S.n == 1:
                raise ConnectionError("transient")
            return {"accuracy": np.asarray([1.0, np.nan])}

    with pytest.raises(rewards.RewardError, match="evaluate.*2 attempt.*non-finite"):
        RewardBridge(S(), retries=1, gather=False).evaluate(_imgs(), ["a", "b"])
    assert S.n == 2


# ----------------------------------------------------------------------------- the trainer


def test_hanging_scorer_times_out_saves_last_step_exit4(tmp_path, capsys):
    FAULT.update(train="hang", **{"from": 5})  # steps 1-2 score (2 blocks each), step 3 hangs
    wd = tmp_path / "wd"
    t0 = time.monotonic()
    code = _main(wd, "--config.reward.timeout_s=0.3", "--config.checkpoint.every=1000")
    out, err = _first_err(capsys)
    assert code == 4, (out, err)
    assert time.monotonic() - t0 < 60
    assert len(err) == 1 and err[0].startswith("error: reward scorer 'fault_scorer' failed after 2 attempt")
    assert "no answer within reward.timeout_s = 0.3 s" in err[0] and "checkpoint at step 2 saved" in err[0]
    assert _steps(wd) == [2]
    assert [r["step"] for r in tt._metrics(str(wd))] == [1, 2]


def test_failing_scorer_saves_last_step_exit4_no_traceback(tmp_path, capsys):
    FAULT.update(train="fail", **{"from": 5})
    wd = tmp_path / "wd"
    assert _main(wd, "--config.checkpoint.every=1000") == 4
    out, err = _first_err(capsys)
    assert len(err) == 1 and "ConnectionError: reward server unreachable" in err[0], err
    assert err[0].startswith("error: reward scorer 'fault_scorer' failed after 2 attempt(s)")
    assert "checkpoint at step 2 saved" in err[0] and _steps(wd) == [2]
    assert _main(wd, "--config.checkpoint.every=1000", "--config.max_steps=3") == 4  # still failing
    FAULT["train"] = None
    assert _main(wd, "--config.checkpoint.every=1000") == 0  # scorer back: resumes from step 2
    assert "resumed from step 2" in capsys.readouterr().out
    assert [r["step"] for r in tt._metrics(str(wd))] == [1, 2, 3, 4]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_scorer_wait_ends_run_with_checkpoint(tmp_path, capsys, sig):
    FAULT.update(train="hang", **{"from": 5})

    def send():
        if _hanging.wait(60):
            os.kill(os.getpid(), sig)

    threading.Thread(target=send, daemon=True).start()
    wd = tmp_path / "wd"
    t0 = time.monotonic()
    assert _main(wd, "--config.checkpoint.every=1000") == 0
    took = time.monotonic() - t0
    out, err = _first_err(capsys)
    assert "signal received while waiting for the reward scorer: checkpoint at step 2 saved, exiting" in out
    assert _steps(wd) == [2] and took < 15, took


EVAL_ARGS = ("--config.eval.every=2", "--config.eval.num_prompts=3", "--config.eval.samples_per_prompt=2",
             "--config.checkpoint.every=2")


def test_eval_transient_error_is_retried(tmp_path, capsys):
    FAULT.update(eval="flaky")
    wd = tmp_path / "wd"
    assert _main(wd, *EVAL_ARGS[:3]) == 0
    assert [r["step"] for r in tt._metrics(str(wd))] == [1, 2, 3, 4]
    evals = [json.loads(x) for x in open(wd / "eval.jsonl")]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(np.isfinite(e["reward_mean"]) for e in evals)


@pytest.mark.parametrize("mode", ["fail", "nan"])
def test_failing_eval_keeps_the_step_and_stops_exit4(tmp_path, capsys, mode):
    FAULT.update(eval=mode, **{"from": 2})  # the base model's evaluation passes, step 2's fails
    wd = tmp_path / "wd"
    assert _main(wd, *EVAL_ARGS) == 4
    out, err = _first_err(capsys)
    assert len(err) == 1 and err[0].startswith("error: evaluation at step 2 failed: reward scorer 'fault_")
    assert ("non-finite" if mode == "nan" else "reward server unreachable") in err[0]
    assert "checkpoint at step 2 saved" in err[0]
    assert _steps(wd) == [2] and [r["step"] for r in tt._metrics(str(wd))] == [1, 2]


def test_failing_eval_continue_reports_and_trains_on(tmp_path, capsys):
    FAULT.update(eval="fail", **{"from": 2})
    wd = tmp_path / "wd"
    assert _main(wd, *EVAL_ARGS, "--config.eval.on_error=continue") == 0
    out, _ = _first_err(capsys)
    assert "step 2: evaluation failed (reward scorer 'fault_scorer'" in out
    evals = [json.loads(x) for x in open(wd / "eval.jsonl")]
    assert [e["step"] for e in evals] == [0, 2, 4] and "error" in evals[1] and "error" in evals[2]
    assert [r["step"] for r in tt._metrics(str(wd))] == [1, 2, 3, 4] and _steps(wd) == [2, 4]


def test_full_disk_is_one_line_exit5(tmp_path, capsys, monkeypatch):
    wd = tmp_path / "wd"

    def full(self, step, items, force=False):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.directory, str(step)))

    monkeypatch.setattr(checkpoint.Checkpointer, "save", full)
    assert _main(wd, "--config.checkpoint.every=1") == 5
    out, err = _first_err(capsys)
    assert len(err) == 1, err
    assert err[0].startswith(f"error: no space left on device writing {wd / 'checkpoints' / '1'} (")
    assert "MiB free on that filesystem" in err[0]


# ----------------------------------------------------------------------------- one writer per workdir


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(WorkdirLockedError, match=rf"pid {os.getpid()} on host .* holds .*{LOCK_NAME}"):
            WorkdirLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    with WorkdirLock(str(tmp_path)):  # released: free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "x"}))
    assert _main(wd, "--config.max_steps=1") == 0
    out, _ = _first_err(capsys)
    assert f"took over the stale workdir lock {wd / LOCK_NAME} of pid {dead.pid}" in out
    assert "no longer running" in out and not (wd / LOCK_NAME).exists()
