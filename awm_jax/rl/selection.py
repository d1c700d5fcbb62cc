"""Rollout selection (Sol-RL, arXiv 2604.06916; docs/selection.md): the pure parts.

Per prompt, ``select.num_seeds`` candidate seeds are previewed with a cheap deterministic sampler
(``select.preview_sampler``, ``select.preview_steps`` steps, weights optionally rounded to
``select.preview_dtype``), the previews are scored, and only the seeds of the ``select.top_k`` best and
``select.bottom_k`` worst previews are regenerated with the normal rollout and trained on
(``top_k + bottom_k = data.group_size``: the train batch and the advantage groups keep their shape).
The orchestration (preview blocks, scoring, regeneration) is :func:`awm_jax.rl.collect.rollout_epoch`.

A *seed* is a candidate's id in the step's candidate list (prompt-major: candidate ``c`` belongs to the
step's prompt ``c // num_seeds``); its initial noise is ``N(0, I)`` drawn from ``fold_in(noise_key, seed)``
(:func:`seed_noise`), so a seed's preview and its regeneration start from the same latent whatever the
batch it sits in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

__all__ = ["PREVIEW_SAMPLERS", "PREVIEW_DTYPES", "enabled", "config_problems", "preview_config",
           "preview_key", "seed_key",
           "candidate_seeds", "seed_noise", "select_extremes", "kept_seeds", "preview_fpe", "cast_floating",
           "rank_correlation"]

PREVIEW_SAMPLERS = ("ode", "dpm2")  # deterministic: a preview's ranking must depend on its seed only
PREVIEW_DTYPES = ("float32", "bfloat16", "float16")


def enabled(config) -> bool:
    """Whether ``config`` turns rollout selection on (``select.enabled``)."""
    return "select" in config and bool(config.select.enabled)


def config_problems(config) -> list[str]:
    """The problems of the ``select.*`` keys (empty when selection is off or the keys are consistent)."""
    if not enabled(config):
        return []
    s, out = config.select, []
    for key, low in (("num_seeds", 1), ("top_k", 0), ("bottom_k", 0), ("preview_steps", 1)):
        v = s[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            out.append(f"config key 'select.{key}' must be an int >= {low}, got {v!r}")
    if out:
        return out
    g = int(config.data.group_size)
    if s.top_k + s.bottom_k != g:
        out.append(f"config keys 'select.top_k' + 'select.bottom_k' = {s.top_k} + {s.bottom_k} must equal "
                   f"'data.group_size' = {g} (the kept seeds are the advantage group)")
    if s.num_seeds < g:
        out.append(f"config key 'select.num_seeds' = {s.num_seeds} must be >= 'data.group_size' = {g}")
    if s.preview_sampler not in PREVIEW_SAMPLERS:
        out.append(f"config key 'select.preview_sampler' = {s.preview_sampler!r} is not one of "
                   f"{PREVIEW_SAMPLERS} (a preview must be deterministic)")
    if s.preview_dtype not in PREVIEW_DTYPES:
        out.append(f"config key 'select.preview_dtype' = {s.preview_dtype!r} is not one of {PREVIEW_DTYPES}")
    return out


def preview_config(config) -> ml_collections.ConfigDict:
    """The rollout config of the previews: ``config`` with the preview sampler and step count, no noise, and
    ``algorithm = "awm"`` (a preview returns ``x0`` only, whatever the objective)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.algorithm = "awm"
    c.sample.sampler = str(config.select.preview_sampler)
    c.sample.num_steps = int(config.select.preview_steps)
    c.sample.noise_level = 0.0
    return c


def preview_key(step_key):
    """The key of a step's preview blocks (block i: ``fold_in(preview_key, i)``, as the rollout blocks)."""
    return jax.random.fold_in(step_key, 1 << 21)


def seed_key(step_key):
    """The key of a step's seeds: seed ``s``'s initial noise is drawn from ``fold_in(seed_key, s)``."""
    return jax.random.fold_in(step_key, 1 << 22)


def candidate_seeds(num_prompts: int, num_seeds: int) -> np.ndarray:
    """The step's candidate seeds ``(num_prompts * num_seeds,)``, prompt-major: ``0 .. P N - 1``."""
    return np.arange(int(num_prompts) * int(num_seeds), dtype=np.int32)


@functools.partial(jax.jit, static_argnames=("shape",))
def _noise(key, seeds, shape):
    return jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(key, s), shape, jnp.float32))(seeds)


def seed_noise(key, seeds, shape) -> jax.Array:
    """The initial latents ``(len(seeds), *shape)`` of ``seeds``: row j is ``N(0, I)`` from
    ``fold_in(key, seeds[j])`` (independent of the other rows)."""
    return _noise(key, jnp.asarray(np.asarray(seeds, np.int32)), tuple(int(d) for d in shape))


def select_extremes(rewards, top_k: int, bottom_k: int) -> np.ndarray:
    """Per row of ``rewards`` (P, N): the column indices of the ``top_k`` highest then the ``bottom_k`` lowest
    rewards, ``(P, top_k + bottom_k)``.

    Deterministic ties: the candidates are ranked by a stable sort on descending reward, so of equal rewards
    the lower index ranks higher; the top-k are the first ``top_k`` of that ranking (best first), the
    bottom-k its last ``bottom_k`` (worst first). NaN ranks below every number. ``top_k + bottom_k <= N``:
    the two sets are disjoint."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2:
        raise ValueError(f"select_extremes needs rewards of shape (prompts, seeds), got {r.shape}")
    n = r.shape[1]
    if top_k < 0 or bottom_k < 0 or top_k + bottom_k > n:
        raise ValueError(f"select_extremes: top_k {top_k} + bottom_k {bottom_k} must be within the {n} seeds")
    key = np.where(np.isnan(r), np.inf, -r)  # ascending key = descending reward, NaN last
    order = np.argsort(key, axis=1, kind="stable")
    top = order[:, :top_k]
    bottom = order[:, n - bottom_k:][:, ::-1] if bottom_k else order[:, :0]
    return np.concatenate([top, bottom], axis=1)


def kept_seeds(preview_rewards, num_prompts: int, num_seeds: int, top_k: int, bottom_k: int):
    """``(seeds, columns)``: the kept seeds ``(P * (top_k + bottom_k),)`` in the train batch's prompt-major
    row order, and the kept columns ``(P, top_k + bottom_k)`` of :func:`select_extremes` over the global
    preview rewards ``(P * N,)`` (in :func:`candidate_seeds` order)."""
    r = np.asarray(preview_rewards).reshape(int(num_prompts), int(num_seeds))
    cols = select_extremes(r, top_k, bottom_k)
    seeds = candidate_seeds(num_prompts, num_seeds).reshape(r.shape)
    return np.take_along_axis(seeds, cols, axis=1).reshape(-1), cols


def preview_fpe(config) -> int:
    """Transformer forward-pass equivalents of one step's previews (0 when selection is off):
    ``prompts_per_step x num_seeds x preview_steps``, doubled with classifier-free guidance."""
    if not enabled(config):
        return 0
    cfg = 2 if float(config.sample.guidance_scale) != 1.0 else 1
    s = config.select
    return int(config.data.prompts_per_step) * int(s.num_seeds) * int(s.preview_steps) * cfg


def cast_floating(tree, dtype):
    """``tree`` with every floating-point leaf cast to ``dtype`` (the previews' lower-precision weights; the
    model computes in its own compute dtype, so this rounds the stored weights)."""
    dt = jnp.dtype(dtype)

    def cast(x):
        return x.astype(dt) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def rank_correlation(a, b) -> float:
    """Spearman rank correlation of two equal-length vectors (ties ranked by position; NaN if either is
    constant or shorter than 2): how well the previews' ranking predicts the regenerated rewards."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        return float("nan")
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(np.float64)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
