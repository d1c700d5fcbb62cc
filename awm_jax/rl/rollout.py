"""Rollout sampling over the model: the jitted AWM / Flow-GRPO rollout and evaluation sampler.

``rollout = make_rollout_fn(graphdef, config, mesh)`` gives
``rollout(trainable, base_state, prompt_embeds, pooled, key) -> dict`` (``graphdef`` / ``base_state`` from
``awm_jax.rl.train_step.create_train_state``; evaluation uses the same factory with an ``ode`` sampler
config).  The model family (``config.model.kind``) supplies the velocity, the latent shape and the time
grid; ``awm_jax.sampling.sample`` dispatches the sampler.  Also importable from ``awm_jax.rl.train_step``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from awm_jax import parallel
from awm_jax.models.family import graph_config
from awm_jax.rl import policy
from awm_jax.sampling import samplers
from awm_jax.sampling.samplers import init_latents

ROLLOUT_SAMPLERS = samplers.SAMPLERS


def latent_shape_of(graphdef, config, latent_shape=None) -> tuple[int, ...]:
    """``latent_shape`` if given, else the family's latent shape at ``config.model.resolution``."""
    if latent_shape is not None:
        return tuple(int(x) for x in latent_shape)
    model_cfg = graph_config(graphdef)
    if model_cfg is None:
        raise ValueError("make_rollout_fn: cannot infer the latent shape; pass latent_shape=(C, h, w)")
    res = int(config.model.resolution)
    return tuple(policy.model_family(graphdef, config).latent_shape(model_cfg, res, res))


def make_rollout_fn(graphdef, config, mesh: Mesh | None = None, *, latent_shape=None,
                    negative=None) -> Callable:
    """Jitted sampler ``rollout(trainable, base_state, prompt_embeds, pooled, key) -> dict``.

    ``config.sample.sampler``: ``sa_solver`` (AWM code: 14-step AWM SA-Solver grid, ``noise_level`` in
    ``[noise_t_min, noise_t_max]``), ``euler_maruyama`` / ``sde`` (Flow-GRPO SDE), ``cps``, ``ode`` (e.g. the
    40-step evaluation sampler).  AWM returns ``{"x0"}``; Flow-GRPO (``sde``/``cps``) also returns the
    trajectory ``latents (B,S+1,...), log_probs, timesteps, next_timesteps (B,S)``.  CFG when
    ``sample.guidance_scale != 1`` (needs ``negative``).  ``latent_shape`` defaults to the family's.
    ``x_init`` (optional, ``(B, *latent_shape)``): the initial latents instead of noise drawn from ``key``
    (rollout selection regenerates chosen seeds; the key still drives a stochastic sampler's step noise).
    """
    algo = policy.algorithm(config)
    s = config.sample
    sampler = str(s.sampler)
    if sampler not in ROLLOUT_SAMPLERS:
        raise ValueError(f"config key sample.sampler = {sampler!r}: expected one of {ROLLOUT_SAMPLERS}")
    if algo == "flow_grpo" and sampler not in ("sde", "cps"):
        raise ValueError(f"Flow-GRPO rollouts need sample.sampler 'sde' or 'cps', got {sampler!r}")
    shape = latent_shape_of(graphdef, config, latent_shape)
    grid = policy.model_family(graphdef, config).time_grid(int(s.num_steps), float(s.shift), shape)
    level, scale = float(s.noise_level), float(s.guidance_scale)
    window = (float(s.noise_t_min), float(s.noise_t_max))
    model_fn = policy.velocity_model(graphdef, config)

    def velocity_fn(x, t, ctx):  # one object for the samplers' static argument (no re-trace)
        params, base, cond, neg = ctx
        return policy.guided(model_fn, params, base, cond, neg, scale)(x, t)

    def core(params, base, emb, pooled, key, neg, x_init, m):
        emb, pooled = parallel.constrain_batch(emb, m), parallel.constrain_batch(pooled, m)
        k0, k1 = jax.random.split(key)
        x = init_latents(k0, emb.shape[0], shape) if x_init is None else x_init.astype(jnp.float32)
        x = parallel.constrain_batch(x, m)
        ctx = (params, base, (emb, pooled), neg)
        return samplers.sample(sampler, velocity_fn, k1, x, grid, noise_level=level, t_window=window,
                               context=ctx, trajectory=algo == "flow_grpo")

    cache: dict = {}

    def rollout(trainable, base_state, prompt_embeds, pooled, key, x_init=None):
        emb, pooled = jnp.asarray(prompt_embeds), jnp.asarray(pooled)
        if x_init is not None:
            x_init = jnp.asarray(x_init)
            want = (emb.shape[0], *shape)
            if x_init.shape != want:
                raise ValueError(f"rollout: x_init of shape {x_init.shape}, expected {want}")
        shard_batch = mesh is not None and emb.shape[0] % parallel.num_batch_shards(mesh) == 0
        m = mesh if shard_batch else None
        if "sh" not in cache:
            cache["sh"] = (parallel.state_shardings(trainable, mesh),
                           parallel.state_shardings(base_state, mesh))
        p_sh, b_sh = cache["sh"]
        if m not in cache:
            cache[m] = jax.jit(lambda *a, _m=m: core(*a, _m))
        params = parallel.place(trainable, p_sh)
        base = parallel.place_once(base_state, b_sh)
        if m is not None:
            emb = parallel.place(emb, parallel.batch_sharding(m, emb.ndim))
            pooled = parallel.place(pooled, parallel.batch_sharding(m, pooled.ndim))
            if x_init is not None:
                x_init = parallel.place(x_init, parallel.batch_sharding(m, x_init.ndim))
        neg = None if negative is None else tuple(jnp.asarray(x) for x in negative)
        with parallel.activation_mesh(mesh, bool(config.mesh.constrain_activations)):  # at trace
            return cache[m](params, base, emb, pooled, key, neg, x_init)

    def trace(trainable, base_state, prompt_embeds, pooled, key):
        """``jax.jit(...).trace`` of the rollout on abstract inputs (``jax.ShapeDtypeStruct``), batch sharded
        over (data, fsdp) of ``mesh``: its jaxpr (FLOP count) and ``.lower()`` (AOT compiles for another
        topology; ``awm_jax.plan``)."""
        rep = None if mesh is None else parallel.replicated(mesh)

        def spec(x, sh):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

        def bsh(x):
            return None if mesh is None else parallel.batch_sharding(mesh, len(x.shape))

        args = (jax.tree.map(spec, trainable, parallel.state_shardings(trainable, mesh)),
                jax.tree.map(spec, base_state, parallel.state_shardings(base_state, mesh)),
                spec(prompt_embeds, bsh(prompt_embeds)), spec(pooled, bsh(pooled)), spec(key, rep))
        neg = None if negative is None else tuple(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)
                                                  for x in negative)
        with parallel.activation_mesh(mesh, bool(config.mesh.constrain_activations)):
            return jax.jit(lambda *a: core(*a, None, mesh)).trace(*args, neg)

    rollout.trace = trace
    return rollout


def make_preview_rollout_fn(graphdef, config, mesh: Mesh | None = None, *, latent_shape=None,
                            negative=None) -> Callable:
    """The previews of rollout selection (``select.*``, :mod:`awm_jax.rl.selection`): the rollout of
    :func:`make_rollout_fn` on :func:`awm_jax.rl.selection.preview_config` (deterministic preview sampler,
    ``select.preview_steps`` steps, ``x0`` only), with the weights rounded to ``select.preview_dtype``
    (the frozen base cast once per base-state object and kept: one extra low-precision copy)."""
    from awm_jax.rl import selection

    fn = make_rollout_fn(graphdef, selection.preview_config(config), mesh, latent_shape=latent_shape,
                         negative=negative)
    dtype = str(config.select.preview_dtype)
    if dtype == "float32":
        return fn
    cast: dict = {}

    def preview(trainable, base_state, prompt_embeds, pooled, key, x_init=None):
        if cast.get("src") is not base_state:
            cast["src"], cast["base"] = base_state, selection.cast_floating(base_state, dtype)
        return fn(selection.cast_floating(trainable, dtype), cast["base"], prompt_embeds, pooled, key,
                  x_init=x_init)

    return preview
