"""Rollout sampling over the model: the jitted AWM / Flow-GRPO rollout and evaluation sampler.

``rollout = make_rollout_fn(graphdef, config, mesh)`` gives
``rollout(trainable, base_state, prompt_embeds, pooled, key) -> dict`` (``graphdef`` / ``base_state`` from
``awm_jax.rl.train_step.create_train_state``; evaluation uses the same factory with an ``ode`` sampler
config).  Also importable from ``awm_jax.rl.train_step``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from awm_jax.rl import _common as common
from awm_jax.sampling import samplers
from awm_jax.sampling.samplers import init_latents
from awm_jax.sampling.schedules import awm_sa_solver_grid, sd3_grid

ROLLOUT_SAMPLERS = ("sa_solver", "euler_maruyama", "ode", "sde", "cps")


def _graph_config(graphdef):
    """The model's static ``config`` attribute recorded in ``graphdef`` (first one found), or None."""
    for item in getattr(graphdef, "attributes", ()):
        if isinstance(item, tuple) and len(item) == 2 and item[0] == "config":
            value = getattr(item[1], "value", None)
            if value is not None and hasattr(value, "in_channels"):
                return value
    return None


def _latent_shape(graphdef, config, latent_shape):
    if latent_shape is not None:
        return tuple(int(x) for x in latent_shape)
    model_cfg = _graph_config(graphdef)
    if model_cfg is None:
        raise ValueError("make_rollout_fn: cannot infer the latent shape; pass latent_shape=(C, h, w)")
    if str(common._get(config.model, "kind", "sd35")) == "toy":
        return (int(model_cfg.in_channels), int(model_cfg.sample_size), int(model_cfg.sample_size))
    side = int(config.model.resolution) // 8
    return (int(model_cfg.in_channels), side, side)


def make_rollout_fn(graphdef, config, mesh: Mesh | None = None, *, latent_shape=None,
                    negative=None) -> Callable:
    """Jitted sampler ``rollout(trainable, base_state, prompt_embeds, pooled, key) -> dict``.

    ``config.sample.sampler``: ``sa_solver`` (AWM code: 14-step AWM SA-Solver grid, ``noise_level`` in
    ``[noise_t_min, noise_t_max]``), ``euler_maruyama`` / ``sde`` (Flow-GRPO SDE), ``cps``, ``ode`` (e.g. the
    40-step evaluation sampler).  AWM returns ``{"x0"}``; Flow-GRPO (``sde``/``cps``) also returns the
    trajectory ``latents (B,S+1,C,H,W), log_probs, timesteps, next_timesteps (B,S)``.  CFG when
    ``sample.guidance_scale != 1`` (needs ``negative``).  ``latent_shape`` defaults to the toy model's
    ``(C, sample_size, sample_size)`` or ``(C, resolution/8, resolution/8)``.
    """
    algo = common._algorithm(config)
    s = config.sample
    sampler = str(s.sampler)
    if sampler not in ROLLOUT_SAMPLERS:
        raise ValueError(f"config key sample.sampler = {sampler!r}: expected one of {ROLLOUT_SAMPLERS}")
    if algo == "flow_grpo" and sampler not in ("sde", "cps"):
        raise ValueError(f"Flow-GRPO rollouts need sample.sampler 'sde' or 'cps', got {sampler!r}")
    full = common._full(config)
    shape = _latent_shape(graphdef, config, latent_shape)
    grid = sd3_grid(int(s.num_steps), float(s.shift))
    level, scale = float(s.noise_level), float(s.guidance_scale)
    model_fn = common._model_fn(graphdef, full)

    def velocity_fn(x, t, ctx):  # one object for the samplers' static argument (no re-trace)
        params, base, cond, neg = ctx
        return common._velocity(model_fn, params, base, cond, neg, scale)(x, t)

    def core(params, base, emb, pooled, key, neg, m):
        emb, pooled = common._constrain(emb, m), common._constrain(pooled, m)
        k0, k1 = jax.random.split(key)
        x = common._constrain(init_latents(k0, emb.shape[0], shape), m)
        ctx = (params, base, (emb, pooled), neg)
        if sampler == "sa_solver":
            window = (float(s.noise_t_min), float(s.noise_t_max))
            sa_grid = awm_sa_solver_grid(grid)
            return {"x0": samplers.sample_sa_solver(velocity_fn, k1, x, sa_grid, level, window, context=ctx)}
        if sampler == "ode" or level == 0.0:
            return {"x0": samplers.sample_ode(velocity_fn, x, grid, context=ctx)}
        fn = samplers.sample_cps if sampler == "cps" else samplers.sample_sde
        traj = fn(velocity_fn, k1, x, grid, level, context=ctx)
        if algo == "awm":
            return {"x0": traj["final"]}
        return {"x0": traj["final"], "latents": traj["latents"], "log_probs": traj["log_probs"],
                "timesteps": traj["timesteps"], "next_timesteps": traj["next_timesteps"]}

    cache: dict = {}

    def rollout(trainable, base_state, prompt_embeds, pooled, key):
        emb, pooled = jnp.asarray(prompt_embeds), jnp.asarray(pooled)
        shard_batch = mesh is not None and emb.shape[0] % common._n_shards(mesh) == 0
        m = mesh if shard_batch else None
        if "sh" not in cache:
            cache["sh"] = (common._state_shardings(trainable, mesh),
                           common._state_shardings(base_state, mesh))
        p_sh, b_sh = cache["sh"]
        if m not in cache:
            cache[m] = jax.jit(lambda *a, _m=m: core(*a, _m))
        params = common._place(trainable, p_sh)
        base = common._place_cached(base_state, b_sh)
        if m is not None:
            emb = common._place(emb, common._batch_spec(m, emb))
            pooled = common._place(pooled, common._batch_spec(m, pooled))
        neg = None if negative is None else tuple(jnp.asarray(x) for x in negative)
        return cache[m](params, base, emb, pooled, key, neg)

    return rollout
