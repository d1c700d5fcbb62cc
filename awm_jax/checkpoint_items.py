"""The train state <-> orbax's named checkpoint items (``trainable``, ``opt_state``, ``kl_ema``, ``eval_ema``,
``rng``, ``meta``, ``config``; :mod:`awm_jax.checkpoint` writes and reads them): what the trainer saves, and
the state it resumes from, read straight onto a mesh when one is given."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax import distributed, parallel
from awm_jax.checkpoint import Checkpointer, CheckpointFormatError, NoUsableCheckpointError

__all__ = ["checkpoint_items", "restore_checkpoint"]


def _uncommit(template, x):
    """Restored arrays come back committed to a device; keep only a mesh sharding the template had."""
    sh = getattr(template, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding):
        return x
    return jnp.asarray(np.asarray(x))


def _on_mesh(tree, mesh):
    """Abstract arrays of ``tree`` with the mesh shardings of its logical axis names."""
    shardings = parallel.state_shardings(tree, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


_STATE_ITEMS = ("trainable", "opt_state", "kl_ema", "eval_ema")


def checkpoint_items(state, rng, meta: dict, config, mesh=None) -> dict:
    """The named checkpoint items of the train state, the run's RNG (a replicated array on ``mesh``: every
    host holds it, as multi-host orbax requires), metadata and config."""
    items = {name: getattr(state, name, None) for name in _STATE_ITEMS}
    plain = json.loads(json.dumps(config.to_dict(), default=str))
    key_data = distributed.replicate(jax.random.key_data(rng), mesh)
    items.update(rng={"key_data": key_data}, meta=meta, config=plain)
    return items


def restore_checkpoint(ckpt: Checkpointer, state, rng, allow_fresh: bool = False, mesh=None):
    """``(step, state, rng, meta)`` from the newest restorable checkpoint, or None (no checkpoint, or none
    usable and ``allow_fresh``); raises :class:`NoUsableCheckpointError` when none is usable otherwise.

    With a ``mesh``, every array is read straight into its sharding on that mesh (whatever mesh wrote it:
    orbax reshards), each host reading only the pieces its devices hold."""
    templates = {n: getattr(state, n) for n in _STATE_ITEMS if getattr(state, n, None) is not None}
    if mesh is not None:
        templates = {n: _on_mesh(t, mesh) for n, t in templates.items()}
    templates["rng"] = {"key_data": distributed.replicate(jax.random.key_data(rng), mesh)}
    try:
        found = ckpt.restore_latest(templates, allow_fresh=allow_fresh)
    except NoUsableCheckpointError as e:
        raise NoUsableCheckpointError(
            f"{e}; to start again from step 0 on purpose, rerun with --fresh (= --config.checkpoint."
            "allow_fresh_start=true): the bad checkpoints are then kept as <step>.corrupt and the old logs "
            "as *.jsonl.before-fresh", e.failures) from None
    if found is None:
        return None
    step, items = found
    missing = sorted(set(templates) - set(items))
    if missing:
        raise CheckpointFormatError(f"checkpoint {step} in {ckpt.directory} lacks items {missing} that this "
                                    "config keeps (was it written with another config?)")
    fixed = {n: jax.tree.map(_uncommit, templates[n], items[n]) for n in templates if n != "rng"}
    opt_steps = int(dict(items["meta"]).get("opt_steps", step))  # optimizer steps (train.steps_per_epoch)
    state = state.replace(step=jnp.asarray(opt_steps, jnp.int32), **fixed)
    rng = jax.random.wrap_key_data(jnp.asarray(np.asarray(distributed.local_rows(items["rng"]["key_data"]))))
    return step, state, rng, dict(items["meta"])
