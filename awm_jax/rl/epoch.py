"""One epoch's optimizer steps (``train.steps_per_epoch``): the epoch's rollouts split into disjoint parts,
the parts' metrics merged into one record, and the drift statistics logged with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from awm_jax import parallel

__all__ = ["epoch_parts", "merge_part_metrics", "drift_stats"]


def epoch_parts(batch: dict, parts: int, key, mesh=None, epoch: int | None = None) -> list[dict]:
    """The epoch's rollouts shuffled (by ``key``) and split into ``parts`` disjoint equal parts, one optimizer
    step each (``train.steps_per_epoch``); 1 = the whole batch, unshuffled. Old log-probs stay the rollout's,
    so a Flow-GRPO step after the first is off-policy (its ratio moves and the clip binds).

    With several parts each carries two scalars for the train step: ``epoch_end`` (True on the last part
    only) and ``epoch`` (the epoch number, if given): the old policy (the kl-EMA adapter, which sampled these
    rollouts for nft / elbo_grpo / off-policy AWM) then stays fixed through the epoch and moves once after its
    last part, with its decay counted in epochs (DiffusionNFT's per-epoch update)."""
    if parts < 1:
        raise ValueError(f"config key train.steps_per_epoch = {parts} must be >= 1")
    if parts == 1:
        return [batch]
    n = int(batch["advantages"].shape[0])  # the global row count (no fetch: rows may sit on other hosts)
    if n % parts:
        raise ValueError(f"config key train.steps_per_epoch = {parts} does not divide the {n} rollouts of an "
                         "epoch (data.prompts_per_step x data.group_size)")
    perm = np.asarray(jax.random.permutation(key, n))
    size = n // parts
    rep = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    out = []
    for j in range(parts):  # global arrays on several hosts: the same replicated index on every host
        idx = np.sort(perm[j * size:(j + 1) * size])
        idx = parallel.put(idx, rep) if rep is not None else jnp.asarray(idx)
        part = {k: (_take_rows(v, idx) if hasattr(v, "shape") and v.ndim and v.shape[0] == n else v)
                for k, v in batch.items()}
        part["epoch_end"] = np.asarray(j == parts - 1)
        if epoch is not None:
            part["epoch"] = np.asarray(epoch, np.int32)
        out.append(part)
    return out


@jax.jit
def _take_rows(v, idx):
    return jnp.take(v, idx, axis=0)


@jax.jit
def _squared_norms(tree):
    """``(sum of squares of every leaf, of the lora_b leaves only)`` in one device reduction (fp32)."""
    sq_all = sq_b = jnp.zeros((), jnp.float32)
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        v = jnp.sum(jnp.square(x.astype(jnp.float32)))
        sq_all += v
        if "lora_b" in jax.tree_util.keystr(path):
            sq_b += v
    return sq_all, sq_b


def drift_stats(state, adv) -> dict[str, float]:
    """What moves during training: the adapter's global L2 norm (``lora_norm``; the whole trainable state
    without LoRA), that of the ``B`` factors only (``lora_b_norm``, zero at the start) and the epoch's
    advantage statistics (``adv_abs_mean``, ``adv_pos_frac``, ``adv_zero_frac``). The KL to the reference
    is the step's ``kl``; per-tag held-out accuracy is in ``eval.jsonl``."""
    sq_all, sq_b = (float(v) for v in _squared_norms(getattr(state, "trainable", None)))
    a = np.asarray(adv, np.float64)
    return {"lora_norm": float(np.sqrt(sq_all)), "lora_b_norm": float(np.sqrt(sq_b)),
            "adv_abs_mean": float(np.abs(a).mean()), "adv_pos_frac": float(np.mean(a > 0)),
            "adv_zero_frac": float(np.mean(a == 0))}


def merge_part_metrics(parts: list[dict]) -> dict:
    """One record of an epoch's optimizer steps: the mean of each scalar metric (min / max for the ratio
    extrema), ``finite`` all-of, and the last step's ``step``; the Flow-GRPO ratio of the last (most
    off-policy) step also as ``*_last``."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for k in parts[-1]:
        vals = [np.asarray(p[k]) for p in parts if k in p]
        if k == "finite":
            out[k] = np.asarray(all(bool(v.all()) for v in vals))
        elif k == "step" or vals[0].size != 1:
            out[k] = vals[-1]
        elif k.endswith("_min"):
            out[k] = np.min(vals)
        elif k.endswith("_max"):
            out[k] = np.max(vals)
        else:
            out[k] = np.mean([float(v) for v in vals])
    for k in ("ratio_mean", "ratio_min", "ratio_max", "clip_frac"):
        if k in parts[-1]:
            out[k + "_last"] = np.asarray(parts[-1][k])
    return out
