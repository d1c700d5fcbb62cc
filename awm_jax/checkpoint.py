"""Orbax checkpoints of the trainer: named items, async, keep-last-k, safe fallback.

A checkpoint at step ``s`` is a directory of *named* items (orbax ``Composite``):

==============  =====================================================================================
``trainable``   the trained weights (LoRA adapters, or every parameter when full fine-tuning)
``opt_state``   the optax optimizer state
``kl_ema``      the kl-EMA adapter (only when the run keeps one)
``eval_ema``    the evaluation EMA (only when the run keeps one)
``rng``         the run's PRNG key data (``{"key_data": uint32 array}``)
``meta``        JSON: ``step``, ``data_position``, ``wall_s``, counters
``config``      JSON: the run's resolved config
==============  =====================================================================================

Resume restores the items by name onto the current state's structure and shardings; export reads
``trainable`` or ``eval_ema`` alone, without a target and without building an optimizer. Restoring walks
the saved steps from the newest down; a step that fails to restore (corrupt or partial files) is skipped
with a warning. A directory written in the old positional layout (one ``state`` item of numbered leaves)
raises :class:`CheckpointFormatError` naming that format.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["ARRAY_ITEMS", "JSON_ITEMS", "CheckpointFormatError", "CheckpointRestoreWarning", "Checkpointer",
           "flat_params"]

log = logging.getLogger(__name__)

ARRAY_ITEMS = ("trainable", "opt_state", "kl_ema", "eval_ema", "rng")
JSON_ITEMS = ("meta", "config")
ITEM_NAMES = ARRAY_ITEMS + JSON_ITEMS


class CheckpointRestoreWarning(UserWarning):
    """The newest checkpoint could not be restored; an older one was used."""


class CheckpointFormatError(RuntimeError):
    """A checkpoint directory written in a layout this version does not read."""


class Checkpointer:
    """Keep-last-k orbax checkpoints of named items in ``directory`` (created unless ``read_only``)."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        if not read_only:
            os.makedirs(self.directory, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=not read_only, read_only=read_only)
        self._saved: set[int] = set()
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEM_NAMES)

    def all_steps(self) -> list[int]:
        """Saved (finalized) steps, ascending."""
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def items_at(self, step: int) -> set[str]:
        """Names of the items saved at ``step`` (raises :class:`CheckpointFormatError` for the old layout)."""
        d = os.path.join(self.directory, str(step))
        names = set(os.listdir(d)) if os.path.isdir(d) else set()
        if "state" in names and "trainable" not in names:
            raise CheckpointFormatError(
                f"checkpoint {d} uses the old positional layout (one 'state' item of numbered leaves, "
                "awm-jax before named checkpoints); this version reads named items (trainable, opt_state, "
                "kl_ema, eval_ema, rng, meta, config) only: start a new --workdir")
        return names & set(ITEM_NAMES)

    def save(self, step: int, items: Mapping[str, Any], force: bool = False) -> bool:
        """Save the named ``items`` at ``step`` (async); ``None`` items are left out."""
        unknown = sorted(set(items) - set(ITEM_NAMES))
        if unknown:
            raise ValueError(f"unknown checkpoint items {unknown}; valid: {ITEM_NAMES}")
        if step in self._saved or step in self._mngr.all_steps():
            return False
        self._saved.add(step)
        args = {}
        for name, value in items.items():
            if value is None:
                continue
            if name in JSON_ITEMS:
                args[name] = ocp.args.JsonSave(dict(value))
            else:
                tree = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), value)
                args[name] = ocp.args.StandardSave(tree)
        return self._mngr.save(step, args=ocp.args.Composite(**args), force=force)

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self._mngr.wait_until_finished()

    def restore(self, step: int, names: Iterable[str], templates: Mapping[str, Any] | None = None) -> dict:
        """Restore the items ``names`` of ``step``.

        ``templates[name]`` (a pytree of arrays or ``jax.ShapeDtypeStruct``) gives an array item's structure,
        dtypes and shardings; an array item without a template comes back as nested dicts of numpy arrays.
        Raises ``KeyError`` for an item the step does not hold.
        """
        have = self.items_at(step)
        templates = dict(templates or {})
        args = {}
        for name in names:
            if name not in have:
                raise KeyError(f"checkpoint {os.path.join(self.directory, str(step))} has no item {name!r} "
                               f"(it holds {sorted(have)})")
            if name in JSON_ITEMS:
                args[name] = ocp.args.JsonRestore()
            elif name in templates:
                args[name] = ocp.args.StandardRestore(jax.tree.map(_abstract, templates[name]))
            else:
                args[name] = ocp.args.StandardRestore()
        out = self._mngr.restore(step, args=ocp.args.Composite(**args))
        result = {name: out[name] for name in args}
        for name, tmpl in templates.items():
            if name in result:
                _check_structure(tmpl, result[name], name)
        return result

    def restore_latest(self, templates: Mapping[str, Any], json_items: Iterable[str] = ("meta",)):
        """Restore the newest restorable checkpoint: every item in ``templates`` that the step holds (the
        step must hold the ``trainable`` one) plus ``json_items``. Returns ``(step, items)`` or ``None``.

        Corrupt or partial checkpoints are skipped with a :class:`CheckpointRestoreWarning`.
        """
        for step in reversed(self.all_steps()):
            have = self.items_at(step)  # the old layout raises here, before any fallback
            names = [n for n in templates if n in have] + list(json_items)
            try:
                if "trainable" in templates and "trainable" not in have:
                    raise ValueError("the step holds no 'trainable' item")
                out = self.restore(step, names, {n: templates[n] for n in names if n in templates})
                meta = out.get("meta")
                if "meta" in json_items and (meta is None or "step" not in meta):
                    raise ValueError("metadata missing or has no 'step'")
                return step, out
            except Exception as e:  # noqa: BLE001 - any failure means "unusable checkpoint"
                msg = (f"checkpoint at step {step} in {self.directory} could not be restored "
                       f"({type(e).__name__}: {str(e)[:300]}); falling back to an older one")
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


def flat_params(tree: Mapping) -> dict[str, np.ndarray]:
    """A raw-restored nnx state (nested dicts, Variable leaves as ``{"value": array}``) as
    ``{dot.joined.path: array}``."""
    out: dict[str, np.ndarray] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            if set(node) == {"value"} and not isinstance(node["value"], Mapping):
                out[prefix] = np.asarray(node["value"])
                return
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = np.asarray(node)

    walk(tree, "")
    return out


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _check_structure(template, restored, name: str) -> None:
    """Structure and shapes must match the template exactly."""
    t_leaves, t_def = jax.tree.flatten(template)
    s_leaves, s_def = jax.tree.flatten(restored)
    if t_def != s_def:
        raise ValueError(f"restored item {name!r}: tree structure differs: {s_def} vs {t_def}")
    for a, b in zip(t_leaves, s_leaves):
        if tuple(np.shape(a)) != tuple(np.shape(b)):
            raise ValueError(f"restored item {name!r}: leaf shape {np.shape(b)} differs from {np.shape(a)}")
