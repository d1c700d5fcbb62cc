"""Orbax checkpoints of the trainer: state pytree + JSON metadata, async, keep-last-k, safe fallback.

A checkpoint at step ``s`` holds the array pytree ``state`` (trainable weights, optimizer, EMAs,
RNG key data ...) and a JSON ``meta`` dict (step, data position, counters). Restoring walks the
saved steps from the newest down; a step that fails to restore (corrupt or partial files) is
skipped with a warning, so a crash during a save never loses the run.
"""

from __future__ import annotations

import logging
import os
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointRestoreWarning"]

log = logging.getLogger(__name__)


class CheckpointRestoreWarning(UserWarning):
    """The newest checkpoint could not be restored; an older one was used."""


class Checkpointer:
    """Keep-last-k orbax checkpoints in ``directory`` (created if missing)."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._saved: set[int] = set()
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        """Saved (finalized) steps, ascending."""
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        """Save ``state`` (pytree of arrays) and ``meta`` (JSON-serialisable) at ``step`` (async)."""
        if step in self._saved or step in self._mngr.all_steps():
            return False
        self._saved.add(step)
        state = jax.tree.map(lambda x: np.asarray(x) if not isinstance(x, jax.Array) else x, state)
        return self._mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
            force=force,
        )

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self._mngr.wait_until_finished()

    def restore_latest(self, abstract_state):
        """Restore the newest restorable checkpoint.

        ``abstract_state`` is a pytree of arrays or ``jax.ShapeDtypeStruct`` giving structure, dtypes
        (and shardings) of the state. Returns ``(step, state, meta)`` or ``None`` if none exists.
        Corrupt or partial checkpoints are skipped with a :class:`CheckpointRestoreWarning`.
        """
        steps = self.all_steps()
        target = jax.tree.map(_abstract, abstract_state)
        for step in reversed(steps):
            try:
                out = self._mngr.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                    ),
                )
                state, meta = out["state"], out["meta"]
                if meta is None or "step" not in meta:
                    raise ValueError("metadata missing or has no 'step'")
                _check_finite_structure(target, state)
                return step, state, dict(meta)
            except Exception as e:  # noqa: BLE001 - any failure means "unusable checkpoint"
                msg = (
                    f"checkpoint at step {step} in {self.directory} could not be restored "
                    f"({type(e).__name__}: {str(e)[:300]}); falling back to an older one"
                )
                warnings.warn(msg, CheckpointRestoreWarning, stacklevel=2)
                log.warning(msg)
                self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        """Move an unrestorable step aside (``<step>.corrupt``) so the step can be saved again."""
        src = os.path.join(self.directory, str(step))
        if os.path.isdir(src):
            dst = src + ".corrupt"
            n = 0
            while os.path.exists(dst):
                n += 1
                dst = f"{src}.corrupt{n}"
            os.rename(src, dst)
        self._saved.discard(step)
        self._mngr.reload()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self._mngr.wait_until_finished()
        self._mngr.close()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _check_finite_structure(target, state) -> None:
    """Shapes must match the expected structure exactly."""
    t_leaves, t_def = jax.tree.flatten(target)
    s_leaves, s_def = jax.tree.flatten(state)
    if t_def != s_def:
        raise ValueError(f"restored tree structure differs: {s_def} vs {t_def}")
    for a, b in zip(t_leaves, s_leaves):
        if tuple(a.shape) != tuple(np.shape(b)):
            raise ValueError(f"restored leaf shape {np.shape(b)} differs from expected {a.shape}")
