"""The trainer: ``python -m awm_jax.train --config configs/NAME.py --workdir DIR [--config.a.b=V ...]``.

One "step" of the loop is an epoch: pick ``prompts_per_step`` prompts, repeat each ``group_size`` times
over all devices and hosts, roll out, decode, score through the reward bridge, compute group advantages
over the globally gathered rewards, and make ``train.steps_per_epoch`` optimizer steps on shuffled disjoint
parts of the rollouts (1 = one step on all of them, as the public AWM code; Flow-GRPO's reference: 2;
micro-batching inside). ``max_steps``, ``eval.every``, checkpoints and ``metrics.jsonl`` lines count epochs;
each line's ``opt_steps`` counts optimizer steps. Every random draw derives from ``(seed, step)``, so a run
resumed from a checkpoint logs exactly the steps of an uninterrupted one.

Workdir outputs: ``config.json``, ``metrics.jsonl``, ``eval.jsonl``, ``tb/`` (TensorBoard),
``samples/eval_*.png`` (grids with prompts), ``checkpoints/`` (orbax, keep-last-k). Running the same
command again resumes. SIGTERM / SIGINT save a checkpoint and exit 0.

Failure behaviour: bad input (config keys and values, prompt files, the mesh shape, the workdir) is checked
before anything is written and stops with one ``error: ...`` line, exit 2; so does a workdir whose checkpoints
are all unusable (``--fresh`` / ``checkpoint.allow_fresh_start`` starts again from step 0 on purpose);
``train.max_nonfinite`` non-finite updates in a row save a checkpoint and exit 3.

The model, train step and reward come from a *components factory* (``config.components``,
"module:function", default :func:`default_components`, which asks the model family of ``config.model.kind``
for its pipeline) so the loop is independent of the model family. Checkpoints hold named items
(``awm_jax.checkpoint``): resume and export read them by name.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from awm_jax import config_lib, parallel
from awm_jax.checkpoint import Checkpointer, CheckpointFormatError, NoUsableCheckpointError
from awm_jax.data import GroupedSampler, PromptFileError, load_dataset
from awm_jax.logging_lib import TrainLogger
from awm_jax.models.family import get_family
from awm_jax.rewards.bridge import RewardBridge
from awm_jax.rl.advantages import reward_stats, step_advantages
from awm_jax.text.base import CachedTextEncoder

__all__ = ["Components", "default_components", "run", "main", "NonFiniteError", "TrainError"]

log = logging.getLogger("awm_jax.train")


class NonFiniteError(RuntimeError):
    """Too many non-finite (skipped) updates in a row."""


class TrainError(RuntimeError):
    """Bad input found by the trainer (prompt files, mesh shape, workdir, checkpoints that do not fit the
    config): the CLI prints ``error: <message>`` and exits 2."""


@dataclasses.dataclass
class Components:
    """What the loop needs from a model family.

    ``rollout`` / ``eval_rollout``: ``(params, base_state, prompt_embeds, pooled, key) -> dict`` with at
    least ``"x0"`` (B,C,H,W) and, for Flow-GRPO, the trajectory fields the train step consumes.
    ``train_step``: ``(state, base_state, batch, key) -> (state, metrics)``; ``metrics["finite"]`` False
    means the update was skipped inside the step (state unchanged).
    """

    pipeline: Any  # text_encoder.encode, decode, latent_shape
    state: Any  # initial TrainState pytree
    base_state: Any  # frozen base weights
    train_step: Callable
    rollout: Callable
    eval_rollout: Callable
    scorer: Any  # reward scorer (images, prompts, metadata) -> (B,)
    trainable_of: Callable[[Any], Any] = lambda s: s.trainable
    # the sampling policy's weights (None: trainable_of); off-policy AWM samples with the kl-EMA adapter
    rollout_params_of: Callable[[Any], Any] | None = None
    eval_params_of: Callable[[Any], Any] | None = None  # eval-EMA weights (None: trainable_of)


# ----------------------------------------------------------------------------- components


def default_components(config: ml_collections.ConfigDict) -> Components:
    """The model family's pipeline + ``awm_jax.rl.train_step`` + the configured reward, per the contracts."""
    from awm_jax import rewards
    from awm_jax.rl import train_step as ts

    pipeline = get_family(config.model.kind).load_pipeline(config)
    mesh = parallel.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor)
    graphdef, base_state, state = ts.create_train_state(pipeline.transformer, config)
    negative = None
    if config.sample.guidance_scale != 1.0 or config.eval.guidance_scale != 1.0:  # CFG: empty-prompt embeds
        neg_e, neg_p = pipeline.text_encoder.encode([""])
        negative = (jnp.asarray(neg_e[:1]), jnp.asarray(neg_p[:1]))
    shape = tuple(pipeline.latent_shape)
    step = ts.make_train_step(graphdef, config, mesh, negative=negative)
    rollout = ts.make_rollout_fn(graphdef, config, mesh, latent_shape=shape, negative=negative)
    eval_cfg = ml_collections.ConfigDict(config.to_dict())
    eval_cfg.algorithm = "awm"  # the evaluation sampler returns x0 only: a deterministic 40-step ODE
    eval_cfg.sample.sampler = "ode"
    eval_cfg.sample.num_steps = config.eval.num_steps
    eval_cfg.sample.noise_level = 0.0
    eval_cfg.sample.guidance_scale = config.eval.guidance_scale
    eval_rollout = ts.make_rollout_fn(graphdef, eval_cfg, mesh, latent_shape=shape,
                                      negative=negative if config.eval.guidance_scale != 1.0 else None)
    scorer = rewards.get(config.reward.name, **config.reward.kwargs.to_dict())

    def eval_params(s):
        ema = getattr(s, "eval_ema", None)
        return ema if (config.eval.use_ema and ema is not None) else s.trainable

    rollout_params = None
    if config.algorithm == "awm" and not config.awm.on_policy:  # as the reference: roll out with kl_ema
        def rollout_params(s):
            ema = getattr(s, "kl_ema", None)
            return s.trainable if ema is None else ema

    return Components(pipeline, state, base_state, step, rollout, eval_rollout, scorer,
                      rollout_params_of=rollout_params, eval_params_of=eval_params)


def epoch_parts(batch: dict, parts: int, key) -> list[dict]:
    """The epoch's rollouts shuffled (by ``key``) and split into ``parts`` disjoint equal parts, one optimizer
    step each (``train.steps_per_epoch``); 1 = the whole batch, unshuffled. Old log-probs stay the rollout's,
    so a Flow-GRPO step after the first is off-policy (its ratio moves and the clip binds)."""
    if parts < 1:
        raise ValueError(f"config key train.steps_per_epoch = {parts} must be >= 1")
    if parts == 1:
        return [batch]
    n = int(np.asarray(batch["advantages"]).shape[0])
    if n % parts:
        raise ValueError(f"config key train.steps_per_epoch = {parts} does not divide the {n} rollouts of an "
                         "epoch on this process (data.prompts_per_step x data.group_size / processes)")
    perm = np.asarray(jax.random.permutation(key, n))
    size = n // parts
    out = []
    for j in range(parts):
        idx = jnp.asarray(np.sort(perm[j * size:(j + 1) * size]))
        out.append({k: (v[idx] if hasattr(v, "shape") and v.ndim and v.shape[0] == n else v)
                    for k, v in batch.items()})
    return out


def drift_stats(state, adv) -> dict[str, float]:
    """What moves during training: the adapter's global L2 norm (``lora_norm``; the whole trainable state
    without LoRA), that of the ``B`` factors only (``lora_b_norm``, zero at the start) and the epoch's
    advantage statistics (``adv_abs_mean``, ``adv_pos_frac``, ``adv_zero_frac``). The KL to the reference
    is the step's ``kl``; per-tag held-out accuracy is in ``eval.jsonl``."""
    sq = {"all": 0.0, "b": 0.0}
    for path, x in jax.tree_util.tree_leaves_with_path(getattr(state, "trainable", None)):
        v = float(jnp.sum(jnp.square(x.astype(jnp.float32))))
        sq["all"] += v
        sq["b"] += v if "lora_b" in jax.tree_util.keystr(path) else 0.0
    a = np.asarray(adv, np.float64)
    return {"lora_norm": float(np.sqrt(sq["all"])), "lora_b_norm": float(np.sqrt(sq["b"])),
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


def _resolve_factory(spec: str):
    if ":" not in spec:
        raise config_lib.ConfigError(f"config key 'components' = {spec!r}: expected 'module:function'")
    mod, fn = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise config_lib.ConfigError(f"config key 'components' = {spec!r} cannot be imported: {e}") from e


# ----------------------------------------------------------------------------- helpers


def _embedding_cache(encoder, config) -> CachedTextEncoder:
    """The run's one prompt-embedding cache: an LRU over the encoder's uncached ``encode``, bounded by
    ``model.text_cache_mb`` MiB of cached arrays."""
    fn = getattr(encoder, "encode_uncached", None) or encoder.encode
    return CachedTextEncoder(fn, max_entries=None, max_bytes=int(float(config.model.text_cache_mb) * 2**20))


def _gather(x: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _chunks(n: int, size: int) -> list[slice]:
    size = max(1, min(size, n))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _concat(outs: list[dict]) -> dict:
    return {k: jnp.concatenate([jnp.asarray(o[k]) for o in outs], axis=0) for k in outs[0]}


def _scalar(x) -> float:
    return float(np.asarray(x).mean())


class _Stop:
    """SIGTERM/SIGINT -> finish the current step, checkpoint, exit 0."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def threading_main() -> bool:
    """True when running on the main thread (signal handlers can be installed)."""
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------- the loop


def _rollout_epoch(comp, config, params, embed, sampler, dataset, bridge, step, key):
    """Rollouts of one step on this process; returns (batch pieces, rewards, groups, timings)."""
    idx, groups = sampler.local_indices(step, jax.process_index(), jax.process_count())
    prompts, metadata = dataset.take(idx)
    emb, pooled = embed.encode(prompts)
    chunk = config.sample.batch_size * jax.local_device_count()
    outs, futures = [], []
    base = jax.process_index() * len(idx)
    for i, sl in enumerate(_chunks(len(idx), chunk)):
        k = jax.random.fold_in(key, base // max(chunk, 1) + i)
        out = comp.rollout(params, comp.base_state, jnp.asarray(emb[sl]), jnp.asarray(pooled[sl]), k)
        images = np.asarray(comp.pipeline.decode(out["x0"]))
        futures.append(bridge.submit(images, prompts[sl], metadata[sl]))  # scoring overlaps next chunk
        outs.append(out)
    rewards = np.concatenate([np.asarray(f.result(), np.float32) for f in futures])
    batch = _concat(outs)
    batch["prompt_embeds"], batch["pooled"] = jnp.asarray(emb), jnp.asarray(pooled)
    return batch, rewards, groups


def evaluate(comp, config, state, embed, eval_set, step: int):
    """40-step ODE samples on held-out prompts; returns (record, images, captions)."""
    n = config.eval.num_prompts or len(eval_set)
    idx = np.repeat(np.arange(min(n, len(eval_set))), config.eval.samples_per_prompt)
    prompts, metadata = eval_set.take(idx)
    emb, pooled = embed.encode(prompts)
    params = (comp.eval_params_of or comp.trainable_of)(state)
    key = jax.random.key(config.seed + 7919)  # same noise at every evaluation
    images = []
    for i, sl in enumerate(_chunks(len(idx), config.sample.batch_size * jax.local_device_count())):
        out = comp.eval_rollout(params, comp.base_state, jnp.asarray(emb[sl]), jnp.asarray(pooled[sl]),
                                jax.random.fold_in(key, i))
        images.append(np.asarray(comp.pipeline.decode(out["x0"])))
    images = np.concatenate(images)
    rec: dict = {"step": step, "num_images": len(idx)}
    rewards = np.asarray(comp.scorer(images, prompts, metadata), np.float32)
    rec["reward_mean"] = float(rewards.mean())
    captions = [f"{p} [{r:.2f}]" for p, r in zip(prompts, rewards)]
    if hasattr(comp.scorer, "evaluate"):
        res = comp.scorer.evaluate(images, prompts, metadata)
        acc = np.asarray(res["accuracy"], np.float32)
        captions = [("OK " if a else "x ") + c for a, c in zip(acc, captions)]
        rec["accuracy"] = float(acc.mean())  # per image
        tags = res.get("tag")
        if tags is not None:
            per_tag = {}
            for t in sorted(set(tags)):
                m = np.asarray([x == t for x in tags])
                per_tag[t] = rec[f"accuracy/{t}"] = float(acc[m].mean())
            rec["accuracy/overall"] = float(np.mean(list(per_tag.values())))  # GenEval score: mean of tags
    # the grid: evenly spaced over the eval set (which is often sorted by tag), verdict and reward in captions
    pick = np.unique(np.linspace(0, len(images) - 1, min(config.eval.grid_images, len(images))).astype(int))
    return rec, images[pick], [captions[i] for i in pick]


def _eval_logged(workdir: str, step: int) -> bool:
    """Whether ``eval.jsonl`` in ``workdir`` already holds an evaluation of ``step``."""
    import json

    path = os.path.join(workdir, "eval.jsonl")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step") == step:
                    return True
            except ValueError:
                continue
    return False


def _uncommit(template, x):
    """Restored arrays come back committed to a device; keep only a mesh sharding the template had."""
    sh = getattr(template, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding):
        return x
    return jnp.asarray(np.asarray(x))


_STATE_ITEMS = ("trainable", "opt_state", "kl_ema", "eval_ema")


def checkpoint_items(state, rng, meta: dict, config) -> dict:
    """The named checkpoint items of the train state, the run's RNG, metadata and config."""
    items = {name: getattr(state, name, None) for name in _STATE_ITEMS}
    plain = json.loads(json.dumps(config.to_dict(), default=str))
    items.update(rng={"key_data": jax.random.key_data(rng)}, meta=meta, config=plain)
    return items


def restore_checkpoint(ckpt: Checkpointer, state, rng, allow_fresh: bool = False):
    """``(step, state, rng, meta)`` from the newest restorable checkpoint, or None (no checkpoint, or none
    usable and ``allow_fresh``); raises :class:`NoUsableCheckpointError` when none is usable otherwise."""
    templates = {n: getattr(state, n) for n in _STATE_ITEMS if getattr(state, n, None) is not None}
    templates["rng"] = {"key_data": jax.random.key_data(rng)}
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
        raise TrainError(f"checkpoint {step} in {ckpt.directory} lacks items {missing} that this config "
                           "keeps (was it written with another config?)")
    fixed = {n: jax.tree.map(_uncommit, templates[n], items[n]) for n in templates if n != "rng"}
    opt_steps = int(dict(items["meta"]).get("opt_steps", step))  # optimizer steps (train.steps_per_epoch)
    state = state.replace(step=jnp.asarray(opt_steps, jnp.int32), **fixed)
    rng = jax.random.wrap_key_data(jnp.asarray(np.asarray(items["rng"]["key_data"])))
    return step, state, rng, dict(items["meta"])


def _check_workdir(workdir: str) -> None:
    """The workdir is a directory (or can be created as one) this process may write."""
    if not workdir or not str(workdir).strip():
        raise TrainError("--workdir is empty")
    path = os.path.abspath(workdir)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise TrainError(f"--workdir {workdir!r} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise TrainError(f"--workdir {workdir!r} is not writable")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise TrainError(f"--workdir {workdir!r} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainError(f"--workdir {workdir!r} cannot be created: {parent} is not writable")


def _check_mesh(config) -> None:
    """``mesh.data x mesh.fsdp x mesh.tensor`` must fit the devices (``parallel.make_mesh``'s rule)."""
    m = config.mesh
    try:
        parallel.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor)
    except ValueError as e:
        raise TrainError(f"config keys 'mesh.data' = {m.data}, 'mesh.fsdp' = {m.fsdp}, 'mesh.tensor' = "
                         f"{m.tensor} do not fit the {jax.device_count()} devices ({e}; mesh.data=-1 takes "
                         "all the remaining devices)") from None


def _load_prompts(which: str, spec: str, fmt: str):
    try:
        return load_dataset(spec, fmt)
    except PromptFileError as e:
        raise TrainError(f"config key 'data.{which}_prompts' = {spec!r}: {e}") from e


def preflight(config: ml_collections.ConfigDict, workdir: str):
    """Every check of the run's input that needs no model: config values, the workdir, the mesh shape, the
    prompt files (parsed). Runs before anything is written; returns ``(train_set, eval_set or None)``."""
    config_lib.validate(config)
    _check_workdir(workdir)
    _check_mesh(config)
    dataset = _load_prompts("train", config.data.train_prompts, config.data.train_format)
    eval_set = None
    if config.eval.every > 0 and config.data.eval_prompts:
        eval_set = _load_prompts("eval", config.data.eval_prompts, config.data.eval_format)
    return dataset, eval_set


def _set_aside_logs(workdir: str, logger_msg: list[str]) -> None:
    """A fresh start over unusable checkpoints keeps the old run's logs as ``*.jsonl.before-fresh``."""
    for name in ("metrics.jsonl", "eval.jsonl"):
        src = os.path.join(workdir, name)
        if os.path.isfile(src):
            dst, n = src + ".before-fresh", 0
            while os.path.exists(dst):
                n += 1
                dst = f"{src}.before-fresh{n}"
            os.rename(src, dst)
            logger_msg.append(f"the old {name} was kept as {dst}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train per ``config`` in ``workdir`` (resuming if it holds checkpoints); return the final record.

    Bad input raises :class:`TrainError` / ``ConfigError`` before anything is written; checkpoints that all
    fail to restore raise :class:`NoUsableCheckpointError` before any log or config file is touched.
    """
    dataset, eval_set = preflight(config, workdir)
    comp = _resolve_factory(config.components)(config)
    sampler = GroupedSampler(len(dataset), config.data.prompts_per_step, config.data.group_size, config.seed)
    embed = _embedding_cache(comp.pipeline.text_encoder, config)
    bridge = RewardBridge(comp.scorer, retries=config.reward.retries, gather=False)  # gathered below
    rng = jax.random.key(config.seed)

    # ---- resume (before config.json and the logs are written: an unusable workdir is left as it was)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                        async_save=config.checkpoint.async_save)
    state = comp.state
    start, wall_prev, nonfinite = 0, 0.0, 0
    try:
        restored = restore_checkpoint(ckpt, state, rng, allow_fresh=config.checkpoint.allow_fresh_start)
    except BaseException:
        ckpt.close()
        raise
    notes = [f"removed the partial checkpoint save {p}" for p in ckpt.removed_partial]
    if restored is not None:
        start, state, rng, meta = restored
        wall_prev, nonfinite = float(meta.get("wall_s", 0.0)), int(meta.get("nonfinite_in_a_row", 0))
        if int(meta.get("data_position", start)) != start:
            raise RuntimeError(f"checkpoint {start}: data position {meta['data_position']} != step {start}")
    elif ckpt.quarantined:  # a fresh start on purpose over unusable checkpoints
        notes.append(f"no usable checkpoint (kept as {', '.join(ckpt.quarantined)}): starting from step 0 "
                     "(checkpoint.allow_fresh_start)")
        if jax.process_index() == 0:
            _set_aside_logs(workdir, notes)
    config_lib.save_config(config, workdir)
    logger = TrainLogger(workdir, start, config.max_steps, tensorboard=config.log.tensorboard,
                         progress=config.log.progress, is_main=jax.process_index() == 0)
    for note in notes:
        logger.message(note)
    if restored is not None:
        logger.message(f"resumed from step {start} in {workdir}")

    def save(step, force=False):
        meta = {"step": step, "data_position": step, "wall_s": wall_prev + time.time() - t_run,
                "nonfinite_in_a_row": nonfinite, "seed": config.seed,
                "opt_steps": int(np.asarray(state.step))}
        ckpt.save(step, checkpoint_items(state, rng, meta, config), force=force)

    t_run = time.time()
    if eval_set is not None and start == 0 and not _eval_logged(workdir, 0):
        rec_e, imgs, caps = evaluate(comp, config, state, embed, eval_set, 0)  # the base model
        logger.log_eval(rec_e, imgs, caps)
    guarded: bool | None = None  # does the train step report metrics["finite"]?
    last: dict = {}
    step = start
    try:
        with _Stop() as stop:
            for step in range(start + 1, config.max_steps + 1):
                t0 = time.time()
                key = jax.random.fold_in(rng, step)
                k_roll, k_train = jax.random.split(key)
                params = (comp.rollout_params_of or comp.trainable_of)(state)
                batch, rewards_local, groups_local = _rollout_epoch(
                    comp, config, params, embed, sampler, dataset, bridge, step, k_roll)
                rewards = _gather(rewards_local)
                groups = _gather(groups_local)
                adv = step_advantages(rewards, groups, config)
                n_local = len(rewards_local)
                batch["advantages"] = jnp.asarray(adv[jax.process_index() * n_local:][:n_local])
                parts, finite = [], True
                k_perm = jax.random.fold_in(k_train, 1 << 20)  # the shuffle; part j > 0: fold_in(k_train, j)
                for j, part in enumerate(epoch_parts(batch, int(config.train.steps_per_epoch), k_perm)):
                    backup = None
                    if guarded is not True:  # keep a copy until we know the step skips non-finite updates
                        backup = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
                    state, pm = comp.train_step(state, comp.base_state, part,
                                                 k_train if j == 0 else jax.random.fold_in(k_train, j))
                    pm = {k: np.asarray(v) for k, v in pm.items()}
                    if "finite" in pm:
                        guarded = True
                        ok = bool(np.asarray(pm["finite"]).all())
                    else:
                        guarded = False
                        ok = math.isfinite(_scalar(pm.get("loss", np.nan)))
                        if not ok:
                            state = backup
                    finite = finite and ok
                    parts.append(pm)
                metrics = merge_part_metrics(parts)
                loss = _scalar(metrics.get("loss", np.nan))
                nonfinite = 0 if finite else nonfinite + 1
                dt = time.time() - t0
                rec = {"step": step, **reward_stats(rewards, groups, config.advantages.correct_threshold),
                       "loss": loss, "policy_loss": _scalar(metrics.get("policy_loss", np.nan)),
                       "kl": _scalar(metrics.get("kl", np.nan)), "skipped": not finite,
                       "samples_per_s": len(rewards) / dt, "wall_s": wall_prev + time.time() - t_run,
                       "opt_steps": int(np.asarray(state.step)), **drift_stats(state, adv)}
                for k, v in metrics.items():
                    if k not in rec and k != "finite" and np.asarray(v).size == 1:
                        rec[k] = _scalar(v)
                logger.log_step(rec)
                last = rec
                if not finite:
                    logger.message(f"step {step}: non-finite loss/gradient, update skipped "
                                   f"({nonfinite} in a row)")
                    if nonfinite >= config.train.max_nonfinite:
                        save(step, force=True)
                        raise NonFiniteError(
                            f"{nonfinite} non-finite updates in a row (train.max_nonfinite="
                            f"{config.train.max_nonfinite}); stopped at step {step}")
                if eval_set is not None and (step % config.eval.every == 0 or step == config.max_steps):
                    rec_e, imgs, caps = evaluate(comp, config, state, embed, eval_set, step)
                    logger.log_eval(rec_e, imgs, caps)
                if step % config.checkpoint.every == 0 or step == config.max_steps:
                    save(step)
                if stop.requested:
                    save(step, force=True)
                    logger.message(f"signal received: checkpoint at step {step} saved, exiting")
                    break
    finally:
        ckpt.close()
        logger.close()
    return last


def main(argv=None) -> int:
    """Command-line entry point; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        path, workdir, overrides = config_lib.parse_args(argv)
        config = config_lib.load_config(path)
        config_lib.apply_overrides(config, overrides)
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run(config, workdir)
    except (config_lib.ConfigError, TrainError, PromptFileError, CheckpointFormatError,
            NoUsableCheckpointError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 3
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
