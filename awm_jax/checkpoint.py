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
with a :class:`CheckpointRestoreWarning` naming its directory and the failing file, and moved aside to
``<step>.corrupt`` once an older step restored. When *no* saved step restores,
:meth:`Checkpointer.restore_latest` raises :class:`NoUsableCheckpointError` naming every checkpoint and
changes nothing, unless the caller allows a fresh start (``allow_fresh=True``: the bad steps are moved
aside and ``None`` is returned). Partial saves (``<step>.orbax-checkpoint-tmp[-<timestamp>]`` directories of
a writer killed mid-save) are never valid and are removed when a writable :class:`Checkpointer` opens the
directory. A directory written in the old positional layout (one ``state`` item of numbered leaves) raises
:class:`CheckpointFormatError` naming that format.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["ARRAY_ITEMS", "JSON_ITEMS", "CheckpointFormatError", "CheckpointRestoreWarning", "Checkpointer",
           "NoUsableCheckpointError", "flat_params"]

log = logging.getLogger(__name__)

ARRAY_ITEMS = ("trainable", "opt_state", "kl_ema", "eval_ema", "rng")
JSON_ITEMS = ("meta", "config")
ITEM_NAMES = ARRAY_ITEMS + JSON_ITEMS


class CheckpointRestoreWarning(UserWarning):
    """The newest checkpoint could not be restored; an older one was used."""


class CheckpointFormatError(RuntimeError):
    """A checkpoint directory written in a layout this version does not read."""


class CheckpointLookupError(LookupError):
    """:func:`restore_item` found no checkpoint, no such step, or no such item at that step."""


class NoUsableCheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be restored (nothing was changed on disk)."""

    def __init__(self, message: str, failures: list[tuple[int, str, str]]):
        super().__init__(message)
        self.failures = failures  # (step, step directory, reason)


# orbax's mark of a step directory still being written: orbax 0.12.8 names it ``<step>.orbax-checkpoint-tmp``
# (orbax/checkpoint/_src/path/atomicity.py, _get_tmp_directory: final name + TMP_DIR_SUFFIX), older versions
# ``<step>.orbax-checkpoint-tmp-<timestamp>`` (the pattern in orbax/checkpoint/_src/path/step.py): both hold
# it
TMP_MARKER = ".orbax-checkpoint-tmp"


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
        self.removed_partial: list[str] = [] if read_only else self._remove_partial_saves()
        self.quarantined: list[str] = []  # step directories moved aside by restore_latest
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEM_NAMES)

    def _remove_partial_saves(self) -> list[str]:
        """Delete the ``<step>.orbax-checkpoint-tmp[-<timestamp>]`` leftovers of saves that never finished
        (primary process only, before this process saves anything); returns their paths."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return []
        removed = []
        for name in sorted(os.listdir(self.directory)):
            if TMP_MARKER in name:
                path = os.path.join(self.directory, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
                removed.append(path)
                log.info("removed the partial checkpoint save %s", path)
        return removed

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

    def restore_latest(self, templates: Mapping[str, Any], json_items: Iterable[str] = ("meta",),
                       allow_fresh: bool = False):
        """Restore the newest restorable checkpoint: every item in ``templates`` that the step holds (the
        step must hold the ``trainable`` one) plus ``json_items``. Returns ``(step, items)``, or ``None`` when
        the directory holds no checkpoint.

        A step that fails to restore is skipped with a :class:`CheckpointRestoreWarning` naming its directory
        and the failing file; once an older step restored, the bad ones are moved aside (``<step>.corrupt``).
        When every step fails, :class:`NoUsableCheckpointError` is raised and nothing is moved, unless
        ``allow_fresh``: then the bad steps are moved aside and ``None`` is returned.
        """
        failures: list[tuple[int, str, str]] = []
        for step in reversed(self.all_steps()):
            have = self.items_at(step)  # the old layout raises here, before any fallback
            names = [n for n in templates if n in have] + list(json_items)
            step_dir = os.path.join(self.directory, str(step))
            try:
                if "trainable" in templates and "trainable" not in have:
                    raise ValueError("the step holds no 'trainable' item")
                for name in json_items:  # cheap checks first: a missing JSON item fails without array reads
                    if name in have and not os.path.isfile(os.path.join(step_dir, name, "metadata")):
                        raise FileNotFoundError(f"missing file {os.path.join(step_dir, name, 'metadata')}")
                _filter_late_callback_errors()  # a failed tensorstore read leaves callbacks on a closed loop
                out = self.restore(step, names, {n: templates[n] for n in names if n in templates})
                meta = out.get("meta")
                if "meta" in json_items and (meta is None or "step" not in meta):
                    raise ValueError("metadata missing or has no 'step'")
            except Exception as e:  # noqa: BLE001 - any failure means "unusable checkpoint"
                reason = _describe_failure(e, step_dir)
                failures.append((step, step_dir, reason))
                warnings.warn(f"checkpoint at step {step} ({step_dir}) could not be restored: {reason}; "
                              "trying an older one", CheckpointRestoreWarning, stacklevel=2)
                continue
            for bad_step, _, _ in failures:
                self._quarantine(bad_step)
            return step, out
        if failures and not allow_fresh:
            listed = "; ".join(f"step {s} ({d}): {_short(r)}" for s, d, r in failures)
            raise NoUsableCheckpointError(
                f"none of the {len(failures)} checkpoints in {self.directory} can be restored [{listed}]; "
                "nothing was changed", failures)
        for bad_step, _, _ in failures:
            self._quarantine(bad_step)
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
            self.quarantined.append(dst)
        self._saved.discard(step)
        self._mngr.reload()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self._mngr.wait_until_finished()
        self._mngr.close()


def restore_item(directory: str, item: str, step: int | None = None, template: Any = None
                 ) -> tuple[int, Any]:
    """``(step, tree)``: the one named ``item`` of checkpoint ``step`` (default: the newest) under
    ``directory``, read-only, onto ``template`` (None: raw nested dicts). Raises
    :class:`CheckpointLookupError` naming the saved steps / the items kept at that step, and
    :class:`CheckpointFormatError` for the old layout."""
    ck = Checkpointer(directory, read_only=True)
    try:
        steps = ck.all_steps()
        if not steps:
            raise CheckpointLookupError(f"no checkpoint under {directory}")
        if step is None:
            step = steps[-1]
        elif int(step) not in steps:
            raise CheckpointLookupError(f"no checkpoint at step {step} (saved steps: {steps})")
        have = ck.items_at(int(step))
        if item not in have:
            kept = [n for n in ITEM_NAMES if n in have]
            raise CheckpointLookupError(f"checkpoint step {step} keeps no {item!r} item; it has {kept}")
        tmpl = {} if template is None else {item: template}
        return int(step), ck.restore(int(step), [item], tmpl)[item]
    finally:
        ck.close()


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


_PATH_IN_MESSAGE = re.compile(r'(?:local file|file) "?(/[^"\s]+)"?')
_SPEC_DUMP = re.compile(r"\s*\[tensorstore_spec(?:\[\d+\])?='[^']*'\]")  # tensorstore's JSON spec of the read


def _describe_failure(e: BaseException, step_dir: str) -> str:
    """``bad file PATH: Type: message`` (the deepest file of ``step_dir`` the error names, else the item
    directory), on one line, the whole message less tensorstore's spec dumps."""
    text = _SPEC_DUMP.sub("", " ".join(f"{type(e).__name__}: {e}".split()))
    paths = [f for f in _PATH_IN_MESSAGE.findall(text) if f.startswith(step_dir)]
    files = [f for f in paths if not f.endswith("/")]
    if not files and isinstance(e, OSError) and getattr(e, "filename", None):
        files = [str(e.filename)]
    if files:
        return f"bad file {files[-1]}: {text}"
    if paths:
        return f"bad item directory {paths[-1]}: {text}"
    return text


def _short(reason: str, n: int = 240) -> str:
    return reason if len(reason) <= n else reason[:n] + "..."


_LATE_ERROR = "Event loop is closed"


def _filter_late_callback_errors() -> None:
    """Drop the ``RuntimeError('Event loop is closed')`` that tensorstore's pending read callbacks raise (one
    traceback per array, through ``sys.unraisablehook``) after orbax gave up on a corrupt checkpoint; every
    other unraisable exception still reaches the previous hook. Installed once."""
    hook = sys.unraisablehook
    if getattr(hook, "_awm_filter", False):
        return

    def filtered(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == _LATE_ERROR:
            return
        hook(unraisable)

    filtered._awm_filter = True
    sys.unraisablehook = filtered


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
