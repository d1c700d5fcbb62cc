"""Resume honours the checkpoint's own config: what a resumed run may change, and the record of what it did.

Every checkpoint holds the run's resolved config (the ``config`` item, :mod:`awm_jax.checkpoint`). Before a
trainer restores anything, :func:`check_resume` compares it with the config it was started with:

- **Keys that change what the saved state means** (:data:`MEANING`: the objective, the model, the LoRA
  rank / alpha / targets, full fine-tuning, the scanned-layer layout, the kept EMA items) are refused, each
  named with its saved and its new value: resuming would continue an AWM optimizer state under another
  objective, or scale a rank-8 adapter with another alpha. Start a new ``--workdir`` instead.
- **Keys that only steer the run** (:data:`FREE`: ``max_steps``, the mesh, logging, compilation, checkpoint
  and timeout settings) change freely.
- **Every other change** (learning rate, prompts per step, rewards, sampler settings, ...) is listed in one
  message and refused unless ``checkpoint.allow_config_change`` (``--allow-config-change``); allowed, it is
  appended to ``config_history.jsonl`` in the workdir (``config.json`` keeps the run's first config) and
  the later checkpoints hold the new config.

Export (:mod:`awm_jax.export`) and ``python -m awm_jax.sample --run`` read the ``config`` item of the
checkpoint they restore (:func:`checkpoint_config`), not ``config.json``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

__all__ = ["ALLOW_FLAG", "ALLOW_KEY", "FREE", "HISTORY", "MEANING", "ConfigChangeError", "check_resume",
           "check_workdir", "checkpoint_config", "saved_config", "config_changes", "record_changes"]

ALLOW_FLAG = "--allow-config-change"
ALLOW_KEY = "checkpoint.allow_config_change"
HISTORY = "config_history.jsonl"

MEANING = ("algorithm", "model.kind", "model.arch", "model.resolution", "model.scan_layers", "lora.rank",
           "lora.alpha", "lora.targets", "lora.full_finetune", "ema.eval_ema")
FREE_PREFIXES = ("mesh.", "log.", "compile.", "checkpoint.")
FREE = ("max_steps", "reward.timeout_s", "reward.retries", "eval.on_error", "model.text_cache_mb",
        "model.remat_policy", "train.micro_batch_size")


class ConfigChangeError(ValueError):
    """A resume with a config the checkpoint's state cannot honour (or changes not allowed); exit 2."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = tree
    return out


def _plain(config) -> dict:
    """The config as the checkpoint stores it (JSON types: tuples as lists, other objects as text)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=str))


def config_changes(saved: dict, config) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, new value)}`` for every leaf that differs; keys the checkpoint does not know
    (added by a later version) are not changes."""
    old, new = _flat(saved), _flat(_plain(config))
    return {k: (old[k], new[k]) for k in sorted(new) if k in old and old[k] != new[k]}


def _free(key: str) -> bool:
    return key in FREE or key.startswith(FREE_PREFIXES)


def _show(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())


def checkpoint_config(ckpt, step: int | None = None) -> tuple[int, dict] | None:
    """``(step, config dict)`` of the newest step (or ``step``) of the checkpointer ``ckpt``
    (:class:`~awm_jax.checkpoint.Checkpointer`) whose ``config`` item reads; None when none does."""
    steps = [int(step)] if step is not None else list(reversed(ckpt.all_steps()))
    for s in steps:
        try:
            if "config" not in ckpt.items_at(s):
                continue
            return s, dict(ckpt.restore(s, ["config"])["config"])
        except Exception:  # noqa: BLE001 - an unreadable item: try an older step (restore reports it)
            continue
    return None


def check_resume(ckpt, config, workdir: str) -> dict[str, tuple[Any, Any]]:
    """Compare ``config`` with the config of the newest checkpoint in ``ckpt``; raise
    :class:`ConfigChangeError` (refused meaning keys, or changes without ``checkpoint.allow_config_change``),
    else return the allowed changes (to :func:`record_changes` once the run resumes). No checkpoint: {}."""
    found = checkpoint_config(ckpt)
    if found is None:
        return {}
    step, saved = found
    changes = {k: v for k, v in config_changes(saved, config).items() if not _free(k)}
    where = f"resume of {workdir} from checkpoint {step}"
    meaning = {k: v for k, v in changes.items() if k in MEANING}
    if meaning:
        raise ConfigChangeError(
            f"{where} refused: the checkpoint's state was trained with other values of keys that change what "
            f"it means ({_show(meaning)}); resume with the saved values, or start a new --workdir")
    allow = bool(config.checkpoint.allow_config_change)
    if changes and not allow:
        raise ConfigChangeError(
            f"{where}: the config differs from the checkpoint's in {len(changes)} key(s) ({_show(changes)}); "
            f"rerun with {ALLOW_FLAG} (= --config.{ALLOW_KEY}=true) to resume with them (recorded in "
            f"{HISTORY}), or with the saved values")
    return changes


def saved_config(workdir: str, step: int | None = None) -> dict | None:
    """The ``config`` item of checkpoint ``step`` (default: the newest) of the trainer ``workdir``; None when
    the workdir has no such checkpoint or the checkpoint keeps no config (then ``config.json`` is all there
    is). What export and ``sample --run`` read: a resumed run's ``config.json`` holds its first config."""
    from awm_jax.checkpoint import CheckpointLookupError, restore_item

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    try:
        return dict(restore_item(directory, "config", step)[1])
    except (CheckpointLookupError, FileNotFoundError):
        return None


def check_workdir(workdir: str, config) -> dict[str, tuple[Any, Any]]:
    """:func:`check_resume` on ``workdir/checkpoints`` (read-only; nothing there: {}), before any model
    loads."""
    from awm_jax.checkpoint import Checkpointer

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return {}
    ckpt = Checkpointer(directory, read_only=True)
    try:
        return check_resume(ckpt, config, workdir)
    finally:
        ckpt.close()


def record_changes(workdir: str, step: int, changes: dict[str, tuple[Any, Any]]) -> str | None:
    """Append the allowed ``changes`` of a resume at ``step`` to ``workdir/config_history.jsonl``; returns
    the message to print (None: no change)."""
    if not changes:
        return None
    path = os.path.join(workdir, HISTORY)
    rec = {"resumed_at_step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()}}
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return f"resumed with {len(changes)} config change(s) ({_show(changes)}), recorded in {path}"
