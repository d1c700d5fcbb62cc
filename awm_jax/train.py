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

Failure behaviour: bad input (config keys and values, the model, prompt and reward files, the mesh shape,
the workdir; :mod:`awm_jax.check`, alone with ``--check``) is checked before any model loads or anything is
written and stops with ``error: ...`` listing every problem, exit 2 (a failed start leaves no empty
workdir); so does a workdir whose checkpoints are all unusable (``--fresh`` /
``checkpoint.allow_fresh_start`` starts again from step 0 on purpose);
``train.max_nonfinite`` non-finite updates in a row save a checkpoint and exit 3; a scorer that keeps failing
or timing out (``reward.timeout_s``), in training or evaluation, saves the last finished step and exits 4
(:mod:`awm_jax.run_faults`); a full disk is one line, exit 5; a second trainer on the workdir exits 2
(:mod:`awm_jax.workdir_lock`); so does a resume the checkpoint's config cannot honour
(:mod:`awm_jax.resume_check`). The README's "Failure behaviour" table lists every case.

The model, train step and reward come from a *components factory* (``config.components``,
"module:function", default :func:`default_components`, which asks the model family of ``config.model.kind``
for its pipeline) so the loop is independent of the model family. Checkpoints hold named items
(``awm_jax.checkpoint``): resume and export read them by name.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
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

from awm_jax import (
    accel_env,
    compile_cache,
    config_lib,
    distributed,
    logging_wandb,
    parallel,
    resume_check,
    run_faults,
)
from awm_jax.check import CheckError, check_run, resolve_factory
from awm_jax.check import report as check_report
from awm_jax.checkpoint import Checkpointer, CheckpointFormatError, NoUsableCheckpointError
from awm_jax.checkpoint_items import checkpoint_items, restore_checkpoint
from awm_jax.data import GroupedSampler, PromptFileError
from awm_jax.logging_lib import TrainLogger, run_summary
from awm_jax.models.family import get_family
from awm_jax.rewards.bridge import RewardBridge, RewardError
from awm_jax.rl import selection
from awm_jax.rl.advantages import reward_stats, step_advantages
from awm_jax.rl.collect import local_advantages, prepare, rollout_epoch
from awm_jax.rl.epoch import drift_stats, epoch_parts, merge_part_metrics
from awm_jax.rl.policy import rolls_out_with_old
from awm_jax.rl.rollout import make_preview_rollout_fn
from awm_jax.text.base import CachedTextEncoder
from awm_jax.timeline import Timeline, format_summary
from awm_jax.workdir_lock import WorkdirLock, WorkdirLockedError

__all__ = ["Components", "default_components", "run", "main", "NonFiniteError", "TrainError", "epoch_parts"]

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
    # rollout selection's previews (select.enabled): the rollout signature plus x_init (awm_jax.rl.selection)
    preview_rollout: Callable | None = None


# ----------------------------------------------------------------------------- components


def default_components(config: ml_collections.ConfigDict) -> Components:
    """The model family's pipeline + ``awm_jax.rl.train_step`` + the configured reward, per the contracts."""
    from awm_jax import rewards
    from awm_jax.rl import train_step as ts

    mesh = parallel.config_mesh(config)
    pipeline = get_family(config.model.kind).load_pipeline(config, mesh=mesh)  # weights born sharded
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
    scorer = rewards.from_config(config)
    preview = None
    if selection.enabled(config):  # cheap deterministic previews of select.num_seeds seeds per prompt
        preview = make_preview_rollout_fn(graphdef, config, mesh, latent_shape=shape, negative=negative)

    def eval_params(s):
        ema = getattr(s, "eval_ema", None)
        return ema if (config.eval.use_ema and ema is not None) else s.trainable

    rollout_params = None
    if rolls_out_with_old(config):  # AWM off-policy (as the reference), nft, elbo_grpo: roll out with kl_ema
        def rollout_params(s):
            ema = getattr(s, "kl_ema", None)
            return s.trainable if ema is None else ema

    return Components(pipeline, state, base_state, step, rollout, eval_rollout, scorer,
                      rollout_params_of=rollout_params, eval_params_of=eval_params, preview_rollout=preview)


# ----------------------------------------------------------------------------- helpers


def _embedding_cache(encoder, config) -> CachedTextEncoder:
    """The run's one prompt-embedding cache: an LRU over the encoder's uncached ``encode``, bounded by
    ``model.text_cache_mb`` MiB of cached arrays."""
    fn = getattr(encoder, "encode_uncached", None) or encoder.encode
    return CachedTextEncoder(fn, max_entries=None, max_bytes=int(float(config.model.text_cache_mb) * 2**20))


def _scalar(x) -> float:
    return float(np.asarray(x).mean())


class _Stop:
    """SIGTERM/SIGINT -> finish the current step, checkpoint, exit 0; ``on_signal()`` ends a wait for the
    scorer at once (the reward bridge's ``interrupt``)."""

    def __init__(self, on_signal: Callable[[], None] | None = None):
        self.requested = False
        self._old = {}
        self._on_signal = on_signal

    def __enter__(self):
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        if self._on_signal is not None:
            self._on_signal()

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def threading_main() -> bool:
    """True when running on the main thread (signal handlers can be installed)."""
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------- the loop


def evaluate(comp, config, state, embed, eval_set, step: int, mesh=None, bridge=None):
    """40-step ODE samples on held-out prompts (each host: its slice of every block, padded on several
    hosts to whole blocks), scored through the reward ``bridge`` (retries, ``reward.timeout_s``, finiteness;
    every host stops with the same error when one host's scorer fails); returns (record, images, captions)
    on every host."""
    n = config.eval.num_prompts or len(eval_set)
    idx = np.repeat(np.arange(min(n, len(eval_set))), config.eval.samples_per_prompt)
    n_eval = len(idx)
    if jax.process_count() > 1:  # every block a whole number of batch shards per host: pad, drop after
        unit = math.lcm(parallel.num_batch_shards(mesh), jax.process_count())
        idx = np.concatenate([idx, np.repeat(idx[-1:], -len(idx) % unit)])
    block = config.sample.batch_size * jax.device_count()
    pos = distributed.local_positions(len(idx), block)
    prompts, metadata = eval_set.take(idx[pos])
    emb, pooled = embed.encode(prompts)
    params = (comp.eval_params_of or comp.trainable_of)(state)
    key = jax.random.key(config.seed + 7919)  # same noise at every evaluation
    images = []
    for i, sl in enumerate(distributed.block_slices(len(idx), block)):
        e, p = distributed.to_global(emb[sl], mesh), distributed.to_global(pooled[sl], mesh)
        k = jax.random.fold_in(key, i)
        out = comp.eval_rollout(params, comp.base_state, jnp.asarray(e), jnp.asarray(p), k)
        images.append(np.asarray(comp.pipeline.decode(distributed.local_rows(out["x0"]))))
    images = np.concatenate(images)
    bridge = bridge or RewardBridge(comp.scorer, retries=config.reward.retries, gather=False,
                                    timeout_s=config.reward.timeout_s)
    local_rewards, res = run_faults.agreed(run_faults.eval_scores, bridge, images, prompts, metadata)
    rewards = distributed.gather_rows(local_rewards, pos, len(idx))[:n_eval]
    all_prompts, _ = eval_set.take(idx[:n_eval])
    rec: dict = {"step": step, "num_images": n_eval}
    rec["reward_mean"] = float(rewards.mean())
    captions = [f"{p} [{r:.2f}]" for p, r in zip(all_prompts, rewards)]
    if res is not None:
        acc = distributed.gather_rows(np.asarray(res["accuracy"], np.float32), pos, len(idx))[:n_eval]
        captions = [("OK " if a else "x ") + c for a, c in zip(acc, captions)]
        rec["accuracy"] = float(acc.mean())  # per image
        tags = res.get("tag")
        if tags is not None:
            tags = distributed.gather_strings(tags, pos, len(idx))[:n_eval]
            per_tag = {}
            for t in sorted(set(tags)):
                m = np.asarray([x == t for x in tags])
                per_tag[t] = rec[f"accuracy/{t}"] = float(acc[m].mean())
            rec["accuracy/overall"] = float(np.mean(list(per_tag.values())))  # GenEval score: mean of tags
    # the grid: evenly spaced over the eval set (which is often sorted by tag), verdict and reward in captions
    pick = np.unique(np.linspace(0, n_eval - 1, min(config.eval.grid_images, n_eval)).astype(int))
    grid = np.zeros((len(pick),) + images.shape[1:], images.dtype)
    where = {int(g): i for i, g in enumerate(pos)}
    for j, g in enumerate(pick):
        if int(g) in where:
            grid[j] = images[where[int(g)]]
    return rec, distributed.gather_padded(grid), [captions[i] for i in pick]


def _evaluate_and_log(logger, *args) -> None:
    logger.log_eval(*evaluate(*args))


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


def preflight(config: ml_collections.ConfigDict, workdir: str):
    """Every check of the run's input that needs no model (:func:`awm_jax.check.check_run`: config values, the
    workdir, the mesh shape, the model, prompt and reward files), all problems at once, before anything is
    written; returns ``(train_set, eval_set or None)``."""
    inputs = check_run(config, workdir)
    return inputs.train_set, inputs.eval_set


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
    fail to restore raise :class:`NoUsableCheckpointError` before any log or config file is touched; a
    workdir another trainer holds raises :class:`WorkdirLockedError` (:mod:`awm_jax.workdir_lock`).
    """
    inputs = preflight(config, workdir)
    with WorkdirLock(workdir, primary=jax.process_index() == 0, agree=distributed.broadcast_flag) as lock:
        changes = resume_check.check_workdir(workdir, config)  # the checkpoint's own config, before loading
        return _run_locked(config, workdir, inputs, lock.messages, changes)


def _run_locked(config: ml_collections.ConfigDict, workdir: str, inputs, lock_notes: list[str],
                changes: dict) -> dict:
    """:func:`run` once the workdir is held and its checkpoint's config checked against ``config``."""
    dataset, eval_set = inputs
    compile_cache.enable(config.compile.cache_dir)
    comp = resolve_factory(config.components)(config)
    sampler = GroupedSampler(len(dataset), config.data.prompts_per_step, config.data.group_size, config.seed)
    embed = _embedding_cache(comp.pipeline.text_encoder, config)
    bridge = RewardBridge(comp.scorer, retries=config.reward.retries, gather=False,  # gathered below
                          timeout_s=config.reward.timeout_s)
    rng = jax.random.key(config.seed)
    mesh = parallel.config_mesh(config)
    block = config.sample.batch_size * jax.device_count()  # samples per rollout call, all hosts together

    # ---- resume (before config.json and the logs are written: an unusable workdir is left as it was)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                        async_save=config.checkpoint.async_save)
    state = comp.state
    start, wall_prev, nonfinite = 0, 0.0, 0
    try:
        restored = restore_checkpoint(ckpt, state, rng, allow_fresh=config.checkpoint.allow_fresh_start,
                                      mesh=mesh)
    except BaseException:
        ckpt.close()
        raise
    notes = lock_notes + [f"removed the partial checkpoint save {p}" for p in ckpt.removed_partial]
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
    if jax.process_index() == 0:  # config.json: the run's first config; allowed changes: config_history.jsonl
        notes += [] if restored is None else [resume_check.record_changes(workdir, start, changes) or ""]
        if restored is None:
            config_lib.save_config(config, workdir)
    logger = TrainLogger(workdir, start, config.max_steps, tensorboard=config.log.tensorboard,
                         progress=config.log.progress, is_main=jax.process_index() == 0,
                         wandb=logging_wandb.settings(config))
    for note in filter(None, notes):
        logger.message(note)
    if restored is not None:
        logger.message(f"resumed from step {start} in {workdir}")

    def save(step, force=False):
        meta = {"step": step, "data_position": step, "wall_s": wall_prev + time.time() - t_run,
                "nonfinite_in_a_row": nonfinite, "seed": config.seed,
                "opt_steps": int(np.asarray(state.step))}
        ckpt.save(step, checkpoint_items(state, rng, meta, config, mesh), force=force)

    t_run = time.time()
    tl = Timeline()  # per-phase wall time: logged with each step (time/*), summarised at the end
    if eval_set is not None and start == 0 and not distributed.broadcast_flag(_eval_logged(workdir, 0)):
        with tl.phase("eval"):  # the base model
            run_faults.guarded_eval(config.eval.on_error, logger, 0, None, _evaluate_and_log, logger,
                                    comp, config, state, embed, eval_set, 0, mesh, bridge)
    guarded: bool | None = None  # does the train step report metrics["finite"]?
    last: dict = {}
    step = start
    prepared = pending = None  # the next step's prompts and embeddings, made while the devices train
    prefetch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="awm-prefetch")
    try:
        with _Stop(bridge.interrupt) as stop:
            for step in range(start + 1, config.max_steps + 1):
                t0 = time.time()
                key = jax.random.fold_in(rng, step)
                k_roll, k_train = jax.random.split(key)
                params = (comp.rollout_params_of or comp.trainable_of)(state)
                select_stats: dict = {}  # rollout selection's select/* metrics (select.enabled)
                try:  # every host learns whether every host's scorer answered (run_faults.agreed)
                    batch, rewards_local, pos = run_faults.agreed(
                        functools.partial(rollout_epoch, stats=select_stats), comp, config, mesh, params,
                        embed, sampler, dataset, bridge, step, k_roll, tl, prepared)
                except (RewardError, run_faults.ScorerFailedError) as e:  # save the last finished step
                    if run_faults.stop_after_scoring(e, save, step - 1, logger):
                        break
                prepared = None
                _, groups = sampler.global_indices(step)
                rewards = distributed.gather_rows(rewards_local, pos, len(groups))  # once per step
                adv = step_advantages(rewards, groups, config)  # the same on every host
                batch["advantages"] = local_advantages(adv, pos, len(groups), block, mesh)
                parts, finite = [], True
                k_perm = jax.random.fold_in(k_train, 1 << 20)  # the shuffle; part j > 0: fold_in(k_train, j)
                parts_of_epoch = epoch_parts(batch, int(config.train.steps_per_epoch), k_perm, mesh, step)
                for j, part in enumerate(parts_of_epoch):
                    backup = None
                    if guarded is not True:  # keep a copy until we know the step skips non-finite updates
                        backup = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
                    with tl.phase("train"):
                        state, pm = comp.train_step(state, comp.base_state, part,
                                                     k_train if j == 0 else jax.random.fold_in(k_train, j))
                        if j == len(parts_of_epoch) - 1 and step < config.max_steps:
                            # the next step's prompts, encoded on a host thread while the devices train
                            pending = prefetch.submit(prepare, config, sampler, dataset, embed, step + 1)
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
                if pending is not None:  # before anything else touches the text encoder (evaluation)
                    with tl.phase("text_encode"):  # what the train step did not hide of it
                        prepared, pending = pending.result(), None
                metrics = merge_part_metrics(parts)
                loss = _scalar(metrics.get("loss", np.nan))
                nonfinite = 0 if finite else nonfinite + 1
                dt = time.time() - t0
                rec = {"step": step, **reward_stats(rewards, groups, config.advantages.correct_threshold),
                       "loss": loss, "policy_loss": _scalar(metrics.get("policy_loss", np.nan)),
                       "kl": _scalar(metrics.get("kl", np.nan)), "skipped": not finite,
                       "samples_per_s": len(rewards) / dt, "wall_s": wall_prev + time.time() - t_run,
                       "opt_steps": int(np.asarray(state.step)), **drift_stats(state, adv), **select_stats}
                for k, v in metrics.items():
                    if k not in rec and k != "finite" and np.asarray(v).size == 1:
                        rec[k] = _scalar(v)
                rec.update(tl.lap())
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
                if step % config.checkpoint.every == 0 or step == config.max_steps:
                    with tl.phase("checkpoint"):  # before the evaluation: a failing one loses no step
                        save(step)
                if eval_set is not None and (step % config.eval.every == 0 or step == config.max_steps):
                    with tl.phase("eval"):
                        args = (logger, comp, config, state, embed, eval_set, step, mesh, bridge)
                        if run_faults.guarded_eval(config.eval.on_error, logger, step, save,
                                                   _evaluate_and_log, *args):
                            break
                if distributed.gather_status(not stop.requested, "signal") or stop.requested:  # any host's
                    save(step, force=True)
                    logger.message(f"signal received: checkpoint at step {step} saved, exiting")
                    break
        if tl.laps:
            tl.lap(count=False)  # the final evaluation and checkpoint
            summary = tl.summary()
            logger.message(format_summary(summary))
            if jax.process_index() == 0:
                with open(os.path.join(workdir, "timeline.json"), "w") as f:
                    json.dump(summary, f, indent=1)
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
        bridge.close()
        ckpt.close()
        logger.close()
    return last


def main(argv=None) -> int:
    """Command-line entry point; returns the process exit code. ``--check``: the pre-flight checks only."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    check_only = "--check" in argv
    argv = [a for a in argv if a != "--check"]
    try:
        argv, cluster = distributed.pop_distributed_flags(argv)
        distributed.initialize(**cluster)  # several hosts: flags given, or a cluster jax detects
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        path, workdir, overrides = config_lib.parse_args(argv)
        config = config_lib.load_config(path)
        config_lib.apply_overrides(config, overrides)  # values: checked with everything else (check_run)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        note = accel_env.configure_from_config(config)  # before JAX starts its GPU backend
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if note and jax.process_index() == 0:
        print(note, flush=True)
    if check_only:
        return check_report(config, workdir, path)
    existed = os.path.exists(workdir)
    code = 0
    try:
        last = run(config, workdir)
    except (config_lib.ConfigError, TrainError, PromptFileError, CheckpointFormatError,
            NoUsableCheckpointError, CheckError, WorkdirLockedError, resume_check.ConfigChangeError) as e:
        _print_error(e)
        code = 2
    except (NonFiniteError, run_faults.ScorerFailedError) as e:  # a checkpoint was saved first
        print(f"error: {_one_line(e)}", file=sys.stderr)
        code = run_faults.EXIT_NONFINITE if isinstance(e, NonFiniteError) else run_faults.EXIT_SCORER
    except BaseException as e:
        full = run_faults.disk_full_message(e, workdir)
        if full is None:
            if not existed:
                _remove_empty_tree(workdir)
            raise
        print(f"error: {full}", file=sys.stderr)
        code = run_faults.EXIT_DISK_FULL
    if code and not existed:
        _remove_empty_tree(workdir)
    if code == 0 and jax.process_index() == 0:
        print(run_summary(workdir, last, config.max_steps), flush=True)
    return code


def _print_error(e: BaseException) -> None:
    """``error: ...``: one line, or the problem list of a :class:`CheckError` one per line."""
    if isinstance(e, CheckError) and len(e.problems) > 1:
        print(f"error: {e}", file=sys.stderr)
    else:
        print(f"error: {_one_line(e)}", file=sys.stderr)


def _remove_empty_tree(path: str) -> None:
    """A failed start leaves no empty workdir: remove ``path`` and its sub-folders when they hold no file."""
    if not os.path.isdir(path):
        return
    for root, _dirs, _files in os.walk(path, topdown=False):
        try:
            os.rmdir(root)  # fails (kept) when it still holds a file
        except OSError:
            pass


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
