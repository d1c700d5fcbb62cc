"""One step's rollouts on the host side of the loop (``awm_jax.train``): which prompts this host rolls out and
their text embeddings (:func:`prepare`), the rollout blocks pipelined with decoding and reward scoring
(:func:`rollout_epoch`; with rollout selection, the previews first), and the advantages back as global arrays
in the batch's row order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax import distributed
from awm_jax.rl import selection
from awm_jax.timeline import Timeline

__all__ = ["prepare", "rollout_epoch", "local_advantages"]


def _concat(outs: list[dict]) -> dict:
    return {k: jnp.concatenate([jnp.asarray(o[k]) for o in outs], axis=0) for k in outs[0]}


def prepare(config, sampler, dataset, embed, step):
    """The prompts of ``step`` this host rolls out (its slice of every rollout block) and their text
    embeddings: host work the loop does for step n + 1 while the devices run step n's train step."""
    idx_all, _ = sampler.global_indices(step)
    block = config.sample.batch_size * jax.device_count()
    pos = distributed.local_positions(len(idx_all), block)
    prompts, metadata = dataset.take(idx_all[pos])
    emb, pooled = embed.encode(prompts)
    return {"n": len(idx_all), "block": block, "pos": pos, "prompts": prompts, "metadata": metadata,
            "emb": emb, "pooled": pooled}


def rollout_epoch(comp, config, mesh, params, embed, sampler, dataset, bridge, step, key, tl=None,
                   prepared=None, stats: dict | None = None):
    """This host's rollouts of one step (``awm_jax.distributed``: its slice of every rollout block); returns
    (the train batch as global arrays, local rewards, local positions in the global batch). Per-phase wall
    time goes to the :class:`Timeline` ``tl``; ``prepared``: :func:`prepare` of this step, if done.

    The device pipeline: rollout block i + 1 and its decode are dispatched before the host waits for block
    i's images, so the devices sample block i + 1 while the host copies, scores (the reward bridge's
    thread) and books block i. A scorer with ``on_device = True`` is instead dispatched on block i's decoded
    device images (``score_device``), so they never reach the host.

    With rollout selection (``select.enabled``, :mod:`awm_jax.rl.selection`) the step's prompts are first
    previewed with ``select.num_seeds`` seeds each (``comp.preview_rollout``, timed as ``preview``), and the
    rollouts regenerate the kept seeds; ``stats`` (a dict, if given) receives the ``select/*`` metrics."""
    tl = tl or Timeline()
    if prepared is None:
        with tl.phase("text_encode"):
            prepared = prepare(config, sampler, dataset, embed, step)
    x_init_of = None
    if selection.enabled(config):
        x_init_of, preview_kept = _preview_and_select(comp, config, mesh, params, embed, sampler, dataset,
                                                      bridge, step, key, tl, prepared, stats)
    outs, embs, pools, rewards = _rollout_blocks(comp.rollout, comp, mesh, params, prepared, bridge, key, tl,
                                                 ("rollout", "decode", "score"), x_init_of)
    if x_init_of is not None and stats is not None:
        full = distributed.gather_rows(rewards, prepared["pos"], prepared["n"])
        stats["select/kept_reward_mean"] = float(np.mean(full))
        stats["select/preview_spearman"] = selection.rank_correlation(preview_kept, full)
    batch = _concat(outs)
    batch["prompt_embeds"], batch["pooled"] = _concat_rows(embs), _concat_rows(pools)
    return batch, rewards, prepared["pos"]


def _rollout_blocks(rollout, comp, mesh, params, prepared, bridge, key, tl, phases, x_init_of=None,
                    keep: bool = True):
    """Roll out, decode and score ``prepared``'s rows block by block (the pipeline of :func:`rollout_epoch`);
    ``x_init_of(local slice)``: the blocks' initial latents (else noise from the block key). Returns
    ``(outputs, embeddings, pooled, local rewards)`` (no outputs / embeddings unless ``keep``)."""
    prompts, metadata, emb, pooled = (prepared[k] for k in ("prompts", "metadata", "emb", "pooled"))
    slices = distributed.block_slices(prepared["n"], prepared["block"])
    ph_roll, ph_dec, ph_score = phases

    def launch(i: int):  # dispatch only: nothing here waits for the devices
        sl = slices[i]
        e, p = distributed.to_global(emb[sl], mesh), distributed.to_global(pooled[sl], mesh)
        k = jax.random.fold_in(key, i)
        if x_init_of is None:
            out = rollout(params, comp.base_state, jnp.asarray(e), jnp.asarray(p), k)
        else:
            out = rollout(params, comp.base_state, jnp.asarray(e), jnp.asarray(p), k, x_init=x_init_of(sl))
        return out, comp.pipeline.decode(out["x0"]), e, p

    outs, futures, embs, pools = [], [], [], []
    nxt = launch(0)
    for i, sl in enumerate(slices):
        out, images, e, p = nxt
        if i + 1 < len(slices):
            nxt = launch(i + 1)  # queued on the devices behind block i's decode
        with tl.phase(ph_roll):
            jax.block_until_ready(out)
        scorer = getattr(bridge, "scorer", None)
        if getattr(scorer, "on_device", False):  # scored on the devices right after the decode: no host copy
            futures.append(bridge.submit_device(scorer.score_device(images, prompts[sl], metadata[sl]),
                                                  prompts[sl]))
        else:
            with tl.phase(ph_dec):
                images = np.asarray(distributed.local_rows(images))
            # scored on the bridge's thread while block i + 1 samples
            futures.append(bridge.submit(images, prompts[sl], metadata[sl]))
        if keep:
            outs.append(out)
            embs.append(e)
            pools.append(p)
    with tl.phase(ph_score):  # the wait for the scores not already overlapped with the next block
        rewards = np.concatenate([np.asarray(f.result(), np.float32) for f in futures])
    return outs, embs, pools, rewards


def _preview_and_select(comp, config, mesh, params, embed, sampler, dataset, bridge, step, key, tl, prepared,
                        stats):
    """Preview ``select.num_seeds`` seeds per prompt of the step, score them, keep the extremes; returns
    (``x_init_of`` for the rollout blocks of ``prepared``, the kept seeds' preview rewards in row order)."""
    preview = getattr(comp, "preview_rollout", None)
    if preview is None:
        raise ValueError("config key select.enabled = True needs components with a preview_rollout "
                         "(awm_jax.train.default_components builds one)")
    sel, g = config.select, int(config.data.group_size)
    idx_all, _ = sampler.global_indices(step)
    prompts_of_step = np.asarray(idx_all)[::g]
    num_p, num_n = len(prompts_of_step), int(sel.num_seeds)
    idx = np.repeat(prompts_of_step, num_n)
    block = prepared["block"]
    pos = distributed.local_positions(len(idx), block)
    with tl.phase("text_encode"):
        prompts, metadata = dataset.take(idx[pos])
        emb, pooled = embed.encode(prompts)
    cand = {"n": len(idx), "block": block, "pos": pos, "prompts": prompts, "metadata": metadata, "emb": emb,
            "pooled": pooled}
    seeds = selection.candidate_seeds(num_p, num_n)
    noise_key = selection.seed_key(key)
    shape = tuple(comp.pipeline.latent_shape)

    def x_init_from(seeds_global, positions):
        def of(sl):  # this host's rows of a block: their seeds' noise, as a global array
            noise = selection.seed_noise(noise_key, seeds_global[positions[sl]], shape)
            return distributed.to_global(noise, mesh)
        return of

    _, _, _, local = _rollout_blocks(preview, comp, mesh, params, cand, bridge,
                                     selection.preview_key(key), tl, ("preview",) * 3,
                                     x_init_from(seeds, pos), keep=False)
    rewards = distributed.gather_rows(local, pos, len(idx))
    kept, cols = selection.kept_seeds(rewards, num_p, num_n, int(sel.top_k), int(sel.bottom_k))
    if len(kept) != prepared["n"]:
        raise ValueError(f"rollout selection keeps {len(kept)} seeds for a train batch of {prepared['n']} "
                         "rows: select.top_k + select.bottom_k must equal data.group_size")
    preview_kept = np.take_along_axis(rewards.reshape(num_p, num_n), cols, axis=1).reshape(-1)
    if stats is not None:
        stats.update({"select/preview_reward_mean": float(np.mean(rewards)),
                      "select/kept_preview_reward_mean": float(np.mean(preview_kept)),
                      "select/preview_samples": int(len(idx)),
                      "select/preview_fpe": selection.preview_fpe(config)})
    return x_init_from(kept, prepared["pos"]), preview_kept


def _concat_rows(xs: list):
    return jnp.concatenate([jnp.asarray(x) for x in xs], axis=0)


def local_advantages(adv: np.ndarray, pos: np.ndarray, n: int, block: int, mesh) -> jax.Array:
    """The global advantages in the train batch's row order (block by block, as the rollouts)."""
    mine = adv[pos]
    return _concat_rows([distributed.to_global(mine[sl], mesh) for sl in distributed.block_slices(n, block)])
