"""How the trainer stops when a scorer, the evaluation or the disk fails, without losing finished steps.

- **Every host the same error.** :func:`agreed` runs one host's scoring and exchanges a status flag with the
  other hosts (:func:`awm_jax.distributed.gather_status`) before anything waits in a collective on rewards: a
  host whose scorer failed, timed out (``reward.timeout_s``) or was interrupted makes every host raise the
  same named error, instead of leaving the others in the reward all-gather.
- **A scorer that keeps failing** (:class:`ScorerFailedError`, exit :data:`EXIT_SCORER`): the checkpoint of
  the last finished step is saved first (:func:`stop_after_scoring`); a signal during the wait
  (:class:`~awm_jax.rewards.bridge.RewardInterrupted`) saves it too and ends the run normally (exit 0).
- **A failing evaluation** (:func:`guarded_eval`) runs after the step's checkpoint; ``eval.on_error``:
  ``"raise"`` stops with :class:`EvalFailedError` (exit :data:`EXIT_SCORER`, the step is saved),
  ``"continue"`` reports it (a message and an ``{"step", "error"}`` line in ``eval.jsonl``) and trains on.
- **A full disk** (:func:`disk_full_message`): one line naming the path and the free space,
  exit :data:`EXIT_DISK_FULL`.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax

from awm_jax import distributed
from awm_jax.rewards.bridge import RewardError, RewardInterrupted

__all__ = ["EXIT_BAD_INPUT", "EXIT_DISK_FULL", "EXIT_NONFINITE", "EXIT_SCORER", "EvalFailedError",
           "ScorerFailedError", "agreed", "disk_full_message", "eval_scores", "guarded_eval",
           "stop_after_scoring"]

EXIT_BAD_INPUT = 2  # bad input, unusable workdir or checkpoints, a workdir another trainer holds
EXIT_NONFINITE = 3  # train.max_nonfinite non-finite updates in a row (checkpoint saved)
EXIT_SCORER = 4  # the reward scorer kept failing or timing out, in training or evaluation (checkpoint saved)
EXIT_DISK_FULL = 5  # no space left on the device of the workdir

_INTERRUPTED = "interrupted: "


class ScorerFailedError(RuntimeError):
    """The reward scorer kept failing (retries and ``reward.timeout_s`` spent) on some host; the checkpoint
    of the last finished step was saved."""


class EvalFailedError(ScorerFailedError):
    """The evaluation's scorer kept failing and ``eval.on_error`` is ``"raise"``; the step was saved."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def agreed(fn: Callable[..., Any], *args) -> Any:
    """``fn(*args)`` (this host's scoring), once every host has finished its own: on every host either the
    results, or the same :class:`RewardInterrupted` (any host was interrupted) or :class:`ScorerFailedError`
    naming the first failing host and its error."""
    try:
        out, err = fn(*args), None
    except RewardError as e:
        out, err = None, e
    status = "" if err is None else _one_line(err)
    if isinstance(err, RewardInterrupted):
        status = _INTERRUPTED + status
    failed = distributed.gather_status(err is None, status)
    if not failed:
        return out
    where = (lambda i: f"process {i}: ") if jax.process_count() > 1 else (lambda i: "")
    stopped = [(i, m) for i, m in failed if m.startswith(_INTERRUPTED)]
    if stopped:
        i, m = stopped[0]
        raise RewardInterrupted(where(i) + m[len(_INTERRUPTED):])
    i, m = failed[0]
    raise ScorerFailedError(where(i) + m) from err


def eval_scores(bridge, images, prompts, metadata):
    """This host's evaluation rewards and ``scorer.evaluate`` result (None without one), through the reward
    ``bridge`` (retries, ``reward.timeout_s``, finiteness): run it under :func:`agreed`."""
    res = bridge.evaluate(images, prompts, metadata) if hasattr(bridge.scorer, "evaluate") else None
    return bridge.score(images, prompts, metadata), res


def stop_after_scoring(e: RewardError | ScorerFailedError, save: Callable[..., Any], last_step: int,
                       logger) -> bool:
    """A step's scoring failed (``e`` from :func:`agreed`): save the checkpoint of ``last_step`` (the last
    finished one; nothing to save at 0) and return True for an interrupt (the loop ends normally), else raise
    :class:`ScorerFailedError` saying so."""
    if last_step > 0:
        save(last_step, force=True)
    kept = f"checkpoint at step {last_step} saved" if last_step > 0 else "no step had finished"
    if isinstance(e, RewardInterrupted):
        logger.message(f"signal received while waiting for the reward scorer: {kept}, exiting")
        return True
    raise ScorerFailedError(f"{_one_line(e)}; {kept} (the same command resumes from it)") from None


def guarded_eval(on_error: str, logger, step: int, save: Callable[..., Any] | None,
                 fn: Callable[..., Any], *args) -> bool:
    """Run the evaluation ``fn(*args)`` of ``step`` (its checkpoint, if due, is already saved). Returns True
    when a signal interrupted it (the step is saved; the loop should end); a failure is reported and training
    goes on (``on_error="continue"``) or the step is saved and :class:`EvalFailedError` raised."""
    try:
        fn(*args)
        return False
    except RewardInterrupted:
        if save is not None and step > 0:
            save(step, force=True)
        logger.message(f"signal received during the evaluation of step {step}: checkpoint at step {step} "
                       "saved, exiting")
        return True
    except (RewardError, ScorerFailedError) as e:
        msg = _one_line(e)
        if on_error == "continue":
            logger.message(f"step {step}: evaluation failed ({msg}); training goes on (eval.on_error="
                           "'continue')")
            logger.log_eval({"step": step, "error": msg})
            return False
        if save is not None and step > 0:
            save(step, force=True)
        kept = f"checkpoint at step {step} saved" if step > 0 else "nothing trained yet"
        raise EvalFailedError(f"evaluation at step {step} failed: {msg}; {kept} (eval.on_error='continue' "
                              "reports evaluation failures and trains on)") from None


def _enospc(e: BaseException | None) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
        e = e.__cause__ or e.__context__
    return None


def disk_full_message(e: BaseException, workdir: str) -> str | None:
    """One line for a full disk anywhere in ``e``'s chain (None: not a full disk): the path written and
    the free space on its filesystem."""
    err = _enospc(e)
    if err is None:
        if "No space left on device" not in str(e):
            return None
        path = workdir
    else:
        path = err.filename or workdir
    probe = os.path.abspath(str(path))
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        free = shutil.disk_usage(probe or "/").free
        space = f"{free / 2**20:.1f} MiB free on that filesystem"
    except OSError:
        space = "free space unknown"
    return f"no space left on device writing {path} ({space}); free some space and rerun to resume"
