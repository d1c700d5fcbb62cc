"""Training-time samplers for AWM: which ``t`` each of the K forward passes per sample uses.

All return ``(K, B)`` float32 times in (0, 1] (``permutation`` includes the grid's t = 1), one stratified
K-tuple per sample by default
(``draw="sample"``: the same expected gradient as one shared tuple, lower variance); ``draw="step"`` shares
one K-tuple across the whole batch (awm-jax's former behaviour for ``discrete*`` / ``logit_normal``; the
public code draws one per micro-batch of 3 samples per GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax.sampling.schedules import shift_times

KINDS = ("discrete", "discrete_wo_init", "uniform", "logit_normal", "permutation")
DRAWS = ("sample", "step")


def discrete_strata(num_steps: int, num_times: int, fraction: float,
                    with_init: bool) -> tuple[np.ndarray, np.ndarray]:
    """Integer stratum bounds ``(lower, upper)`` on the sampler grid indices.

    ``linspace(start, int(num_steps * fraction), K + 1)`` truncated to ints, ``start = 0`` for
    ``discrete`` and ``1`` for ``discrete_wo_init``; stratum k draws an index in ``[lower_k, upper_k)``
    (``lower_k`` itself when the stratum is empty).
    """
    top = int(num_steps * fraction)
    start = 0 if with_init else 1
    if top <= start:
        raise ValueError(f"int(num_steps * timestep_fraction) = {top} must exceed {start} "
                         f"(num_steps={num_steps}, timestep_fraction={fraction})")
    b = np.linspace(start, top, num_times + 1, dtype=np.float32).astype(np.int64)
    return b[:-1], b[1:]


def sample_train_timesteps(key, kind: str, num_times: int, batch_size: int, *, grid=None,
                           timestep_fraction: float = 0.9, shift: float = 3.0,
                           uniform_range=(0.2, 1.0), logit_mean: float = 0.0, logit_std: float = 1.0,
                           min_t: float = 0.01, draw: str = "sample") -> jnp.ndarray:
    """Draw K training times per sample ``-> (K, B)`` float32.

    - ``discrete`` / ``discrete_wo_init``: stratified grid indices (:func:`discrete_strata`), ``t = grid[i]``;
      ``grid`` is the *unmodified* sampler grid (e.g. ``shifted_grid(14)``; the AWM code indexes the
      scheduler's timesteps / 1000, not the SA-Solver-tweaked grid).
    - ``uniform``: stratified ``U(uniform_range)`` per (time, sample), strata shuffled over K per sample,
      then the SD3 ``shift`` (the public code's "uniform"; ``uniform_range=(0, 1), shift=1`` is plain U(0,1)).
    - ``logit_normal``: stratified normal quantiles, shuffled, ``sigmoid(m + s u)``, shifted, ``>= min_t``.
    - ``permutation`` (seed 004 / DiffusionNFT): the S sampler times ``grid[:S]`` (``grid`` has S + 1 points
      ending at 0), a random permutation of them per draw, the first ``K = int(S * timestep_fraction)``
      (``num_times`` must equal that count): K distinct grid times per sample, in random order.

    ``draw``: ``"sample"`` (each sample its own K-tuple) or ``"step"`` (one K-tuple for all B samples).
    """
    if kind not in KINDS:
        raise ValueError(f"timestep sampler {kind!r} unknown; expected one of {KINDS}")
    if draw not in DRAWS:
        raise ValueError(f"config key awm.timestep_draw = {draw!r}: expected one of {DRAWS}")
    k_, b_ = int(num_times), int(batch_size)
    if k_ < 1 or b_ < 1:
        raise ValueError(f"num_times and batch_size must be >= 1, got {num_times}, {batch_size}")
    d_ = b_ if draw == "sample" else 1  # independent draws
    ku, kp = jax.random.split(key)
    if kind == "permutation":
        return _permutation_times(kp, grid, k_, b_, d_, timestep_fraction)
    if kind.startswith("discrete"):
        if grid is None:
            raise ValueError(f"timestep sampler {kind!r} needs the sampler grid")
        g = np.asarray(grid, np.float64)
        lo, hi = discrete_strata(g.shape[0] - 1, k_, timestep_fraction, kind == "discrete")
        if hi.max() >= g.shape[0]:
            raise ValueError(f"stratum bound {hi.max()} outside the grid of {g.shape[0]} points")
        u = jax.random.uniform(ku, (k_, d_))
        width = jnp.asarray(hi - lo, jnp.float32)[:, None]
        idx = jnp.asarray(lo)[:, None] + jnp.floor(u * width).astype(jnp.int32)
        t = jnp.asarray(g, jnp.float32)[idx]
        return jnp.broadcast_to(t, (k_, b_))
    # stratified u in [0, 1): stratum k holds (k + U) / K, the strata shuffled over K per draw
    u = (jnp.arange(k_)[:, None] + jax.random.uniform(ku, (k_, d_))) / k_
    u = jax.random.permutation(kp, u, axis=0, independent=True)
    if kind == "uniform":
        lo, hi = uniform_range
        t = shift_times(lo + u * (hi - lo), shift)
    else:
        z = jax.scipy.stats.norm.ppf(jnp.clip(u, 1e-7, 1 - 1e-7))
        t = jnp.maximum(shift_times(jax.nn.sigmoid(logit_mean + logit_std * z), shift), min_t)
    return jnp.broadcast_to(t, (k_, b_)).astype(jnp.float32)


def _permutation_times(key, grid, k_: int, b_: int, d_: int, fraction: float) -> jnp.ndarray:
    if grid is None:
        raise ValueError("timestep sampler 'permutation' needs the sampler grid")
    g = np.asarray(grid, np.float64)[:-1]  # the S times the sampler evaluates (the final 0 dropped)
    s = int(g.shape[0])
    count = int(s * fraction)
    if k_ != count or count < 1:
        raise ValueError(f"timestep sampler 'permutation': awm.train_timesteps = {k_} must equal "
                         f"int(num_steps * awm.timestep_fraction) = int({s} * {fraction}) = {count} (>= 1)")
    idx = jax.vmap(lambda k: jax.random.permutation(k, s)[:k_])(jax.random.split(key, d_))  # (d_, K)
    t = jnp.asarray(g, jnp.float32)[idx.T]
    return jnp.broadcast_to(t, (k_, b_))


def sample_train_noise(key, num_times: int, x0) -> jnp.ndarray:
    """Fresh ``N(0, I)`` noise per (time, sample) ``-> (K, B, C, H, W)`` float32."""
    return jax.random.normal(key, (int(num_times), *x0.shape), jnp.float32)
