"""Whole samplers as ``jax.lax.scan`` under ``jax.jit``.

Every sampler takes ``velocity_fn`` and an optional ``context`` pytree: the velocity is
``velocity_fn(x, t)`` when ``context is None`` else ``velocity_fn(x, t, context)``, with ``x`` (B, C, H, W)
and ``t`` (B,) in [0, 1].  ``velocity_fn`` is a static (hashed) argument of the jitted core: pass the same
function object and put traced things (parameters, text embeddings) in ``context`` to avoid retracing.
Grids are concrete numpy arrays (see :mod:`awm_jax.sampling.schedules`).  Per-step noise is drawn from
``jax.random.fold_in(key, step)``, so results are deterministic given ``key``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax.deprecation import aliases as _deprecated_aliases
from awm_jax.sampling import steps as S
from awm_jax.sampling.schedules import check_grid


def _velocity(velocity_fn, x, t, context):
    tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    v = velocity_fn(x, tb) if context is None else velocity_fn(x, tb, context)
    return v.astype(jnp.float32)


def _step_noise(key, i, shape):
    return jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)


def init_latents(key, batch_size: int, latent_shape, dtype=jnp.float32):
    """Initial noise ``N(0, I)`` of shape ``(batch_size, *latent_shape)``."""
    return jax.random.normal(key, (batch_size, *tuple(latent_shape)), jnp.float32).astype(dtype)


def classifier_free_guidance(model_fn: Callable, guidance_scale: float,
                             detach_uncond: bool = False) -> Callable:
    """Wrap ``model_fn(x, t, cond) -> v`` into ``velocity_fn(x, t, (cond, uncond))`` with CFG.

    ``v = v_uncond + guidance_scale (v_cond - v_uncond)``, both halves in one batched call
    (``[uncond; cond]`` concatenated on the batch axis of ``x``, ``t`` and every context leaf).
    ``guidance_scale == 1`` calls the model once on ``cond`` only. ``detach_uncond``: no gradient through
    ``v_uncond`` (Flow-GRPO's training forward, ``noise_pred_uncond.detach()``); values are unchanged.
    """
    scale = float(guidance_scale)

    def velocity_fn(x, t, context):
        cond, uncond = context
        if scale == 1.0:
            return model_fn(x, t, cond)
        both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
        v = model_fn(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), both).astype(jnp.float32)
        v_u, v_c = jnp.split(v, 2, axis=0)
        if detach_uncond:
            v_u = jax.lax.stop_gradient(v_u)
        return v_u + scale * (v_c - v_u)

    return velocity_fn


# ----------------------------------------------------------------------------------------------- ODE


@functools.partial(jax.jit, static_argnames=("velocity_fn",))
def _ode_core(velocity_fn, x, ts, context):
    def body(x, tt):
        t, t_next = tt[0], tt[1]
        return S.euler_step(x, _velocity(velocity_fn, x, t, context), t, t_next), None

    x, _ = jax.lax.scan(body, x.astype(jnp.float32), jnp.stack([ts[:-1], ts[1:]], axis=1))
    return x


def sample_ode(velocity_fn: Callable, x_init, grid, context: Any = None):
    """Euler ODE from ``grid[0]`` to ``grid[-1]``; returns the final latents (float32)."""
    ts = jnp.asarray(check_grid(grid), jnp.float32)
    return _ode_core(velocity_fn, x_init, ts, context)


# ------------------------------------------------------------------------------- SDE (Flow-GRPO), CPS


@functools.partial(jax.jit, static_argnames=("velocity_fn", "kind"))
def _stochastic_core(velocity_fn, kind, key, x, ts, noise_levels, t1, context):
    def body(x, inp):
        i, t, t_next, a = inp
        v = _velocity(velocity_fn, x, t, context)
        z = _step_noise(key, i, x.shape)
        if kind == "sde":
            x_next, lp, mean, std = S.flow_grpo_sde_step(x, v, t, t_next, z, a, t1)
        else:
            x_next, lp, mean, std = S.cps_step(x, v, t, t_next, z, a)
        return x_next, (x_next, lp, mean, std)

    n = ts.shape[0] - 1
    inputs = (jnp.arange(n), ts[:-1], ts[1:], noise_levels)
    x = x.astype(jnp.float32)
    _, (xs, lps, means, stds) = jax.lax.scan(body, x, inputs)
    b = x.shape[0]
    bm = lambda a: jnp.moveaxis(a, 0, 1)  # noqa: E731  time-major -> batch-major
    return {
        "latents": jnp.concatenate([x[:, None], bm(xs)], axis=1),
        "log_probs": bm(lps),
        "means": bm(means),
        "stds": jnp.broadcast_to(stds, (b, n)),
        "timesteps": jnp.broadcast_to(ts[:-1], (b, n)),
        "next_timesteps": jnp.broadcast_to(ts[1:], (b, n)),
        "final": xs[-1],
    }


def _noise_levels(noise_level, n: int, sde_steps: int | None):
    lv = np.full((n,), float(noise_level), np.float32)
    if sde_steps is not None:
        lv[int(sde_steps):] = 0.0
    return jnp.asarray(lv)


def sample_sde(velocity_fn: Callable, key, x_init, grid, noise_level: float, context: Any = None):
    """Flow-GRPO SDE sampler (Euler-Maruyama of the reverse SDE) with per-step log-probs.

    Returns a dict of batch-major arrays: ``latents`` (B, N+1, C, H, W) (entry i is the latent before
    step i, the last one the sample), ``log_probs`` (B, N), ``means`` (B, N, C, H, W), ``stds`` (B, N)
    (std_t without sqrt(-dt)), ``timesteps`` / ``next_timesteps`` (B, N) and ``final`` (B, C, H, W).
    ``t1 = grid[1]`` replaces t in the std at ``t == 1``.
    """
    g = check_grid(grid)
    if noise_level <= 0:
        raise ValueError(f"sample_sde needs noise_level > 0 (log-probs), got {noise_level}")
    n = g.shape[0] - 1
    ts = jnp.asarray(g, jnp.float32)
    return _stochastic_core(velocity_fn, "sde", key, x_init, ts, _noise_levels(noise_level, n, None),
                            jnp.float32(g[1]), context)


def sample_cps(velocity_fn: Callable, key, x_init, grid, noise_level: float, context: Any = None):
    """Coefficient-preserving sampler (Flow-GRPO CPS); same outputs as :func:`sample_sde`."""
    g = check_grid(grid)
    n = g.shape[0] - 1
    ts = jnp.asarray(g, jnp.float32)
    return _stochastic_core(velocity_fn, "cps", key, x_init, ts, _noise_levels(noise_level, n, None),
                            jnp.float32(g[1]), context)


# -------------------------------------------------------------------------------------------- SA-Solver


@functools.partial(jax.jit, static_argnames=("velocity_fn",))
def _sa_core(velocity_fn, key, x, t0, coeffs, context):
    x = x.astype(jnp.float32)

    def d_at(t):
        return lambda xx: S.data_prediction(xx, _velocity(velocity_fn, xx, t, context), t)

    d0 = d_at(t0)(x)

    def body(carry, inp):
        x, d_prev, d_prev2 = carry
        i, row = inp
        z = _step_noise(key, i, x.shape)
        x_new, d_new = S.sa_solver_step(x, d_prev, d_prev2, row, z, d_at(row["t"]))
        return (x_new, d_new, d_prev), None

    n = coeffs["t"].shape[0]
    (x, d_last, _), _ = jax.lax.scan(body, (x, d0, jnp.zeros_like(x)), (jnp.arange(1, n + 1), coeffs))
    return d_last


def sample_sa_solver(velocity_fn: Callable, key, x_init, grid, noise_level: float,
                     t_window=(0.3, 0.9), context: Any = None):
    """SA-Solver (stochastic Adams, data prediction; predictor 2, corrector 2, PEC, first corrector off).

    ``grid`` (N+1 points, ``grid[0] < 1``, ``grid[-1] = 0``; use
    :func:`awm_jax.sampling.schedules.awm_sa_solver_grid`).  Uses N model evaluations and returns the data
    prediction ``x - t v`` at ``grid[-2]`` (the final x0 estimate, float32).  ``tau(t) = noise_level`` for
    ``t_window[0] <= t <= t_window[1]`` else 0 (``noise_level = 0``: deterministic).
    """
    g = check_grid(grid)
    co = S.sa_solver_coefficients(g, noise_level, t_window)
    coeffs = {k: jnp.asarray(v) for k, v in co.items()}
    return _sa_core(velocity_fn, key, x_init, jnp.float32(g[0]), coeffs, context)


# --------------------------------------------------------------------------------------------------- DPM2


@functools.partial(jax.jit, static_argnames=("velocity_fn",))
def _dpm2_core(velocity_fn, x, coeffs, context):
    def body(carry, row):
        x, d_prev = carry
        d = S.data_prediction(x, _velocity(velocity_fn, x, row["t"], context), row["t"])
        return (S.dpm2_step(x, d, d_prev, row), d), None

    x = x.astype(jnp.float32)
    (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), coeffs)
    return x


def sample_dpm2(velocity_fn: Callable, x_init, grid, context: Any = None):
    """DiffusionNFT's deterministic DPM2 rollout solver (multistep DPM-Solver++(2M), data prediction) from
    ``grid[0]`` to ``grid[-1]``: N model calls, returns the final latents (float32; with ``grid[-1] = 0`` the
    last data prediction).  Coefficients from :func:`awm_jax.sampling.steps.dpm2_coefficients` (float64 on
    the host), sample in float32; docs/samplers.md."""
    g = check_grid(grid)
    coeffs = {k: jnp.asarray(v) for k, v in S.dpm2_coefficients(g).items()}
    return _dpm2_core(velocity_fn, x_init, coeffs, context)


SAMPLERS = ("sa_solver", "euler_maruyama", "sde", "ode", "cps", "dpm2")


def sample(sampler: str, velocity_fn: Callable, key, x_init, grid, *, noise_level: float = 0.0,
           t_window=(0.3, 0.9), context: Any = None, trajectory: bool = False) -> dict:
    """Run the named sampler on ``grid`` (the one dispatch used by rollouts, evaluation and pipelines).

    ``sa_solver``: :func:`sample_sa_solver` on ``awm_sa_solver_grid(grid)`` (the AWM rollout grid tweaks;
    training times index the *untweaked* grid); ``euler_maruyama`` / ``sde``: the Flow-GRPO SDE
    (:func:`sample_sde`); ``cps``: :func:`sample_cps`; ``ode`` (or any sampler with ``noise_level == 0``
    except SA-Solver): :func:`sample_ode`.  Returns ``{"x0": final latents}`` and, with ``trajectory`` for
    ``sde`` / ``cps``, the trajectory fields ``latents, log_probs, timesteps, next_timesteps``.  ``dpm2``:
    :func:`sample_dpm2` (deterministic; ``noise_level`` and ``key`` are not used).
    """
    from awm_jax.sampling.schedules import awm_sa_solver_grid

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} unknown; expected one of {SAMPLERS}")
    if sampler == "sa_solver":
        g = awm_sa_solver_grid(grid)
        return {"x0": sample_sa_solver(velocity_fn, key, x_init, g, noise_level, t_window, context)}
    if sampler == "dpm2":
        return {"x0": sample_dpm2(velocity_fn, x_init, grid, context)}
    if sampler == "ode" or (noise_level == 0.0 and not trajectory):
        return {"x0": sample_ode(velocity_fn, x_init, grid, context)}
    fn = sample_cps if sampler == "cps" else sample_sde
    traj = fn(velocity_fn, key, x_init, grid, noise_level, context)
    out = {"x0": traj["final"]}
    if trajectory:
        out.update({k: traj[k] for k in ("latents", "log_probs", "timesteps", "next_timesteps")})
    return out


# deprecated aliases of names that moved (awm_jax/deprecation.py, CHANGELOG.md)
__getattr__ = _deprecated_aliases(__name__)
