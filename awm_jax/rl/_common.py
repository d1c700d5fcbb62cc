"""Private helpers shared by ``awm_jax.rl.train_step`` and ``awm_jax.rl.rollout``.

Config accessors, the transformer wrapped as a velocity closure (timestep = 1000 t, optional CFG) and the
placement of states / batches on a mesh (including the one shared device copy of the frozen base state).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from awm_jax import parallel
from awm_jax.sampling.samplers import classifier_free_guidance

ALGORITHMS = ("awm", "flow_grpo")


# ------------------------------------------------------------------------------------------ config


def _get(cfg, key: str, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _full(config) -> bool:
    return bool(_get(config.lora, "full_finetune", False))


def _algorithm(config) -> str:
    a = str(config.algorithm)
    if a not in ALGORITHMS:
        raise ValueError(f"config key algorithm = {a!r}: expected one of {ALGORITHMS}")
    return a


# ------------------------------------------------------------------------------------------ model


def _model_fn(graphdef, full: bool) -> Callable:
    """``fn(params, base, x, t01, embeds, pooled) -> v`` (timestep = 1000 t)."""

    def fn(params, base, x, t, emb, pooled):
        model = nnx.merge(graphdef, params) if full else nnx.merge(graphdef, params, base)
        return model(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                     timestep=jnp.asarray(t, jnp.float32) * 1000.0)

    return fn


def _velocity(model_fn, params, base, cond, neg, scale: float) -> Callable:
    """2-argument velocity closure ``(x, t) -> v`` with classifier-free guidance when ``scale != 1``."""
    def cond_fn(x, t, c):
        return model_fn(params, base, x, t, *c)

    if scale == 1.0:
        return lambda x, t: cond_fn(x, t, cond)
    if neg is None:
        raise ValueError(f"guidance_scale={scale} needs the empty-prompt embeddings: "
                         "pass negative=(embeds, pooled)")
    b = cond[0].shape[0]
    uncond = tuple(jnp.broadcast_to(u, (b, *u.shape[1:])).astype(c.dtype) for u, c in zip(neg, cond))
    cfg = classifier_free_guidance(cond_fn, scale)
    return lambda x, t: cfg(x, t, (cond, uncond))


# ------------------------------------------------------------------------------------------ sharding


def _state_shardings(tree, mesh: Mesh | None):
    if mesh is None:
        return None
    return parallel.logical_to_mesh_sharding(tree, mesh)


def _batch_spec(mesh: Mesh, x) -> NamedSharding:
    return parallel.batch_sharding(mesh, np.ndim(x))


def _n_shards(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])


def _place(tree, shardings):
    """``device_put`` the leaves whose sharding differs (no copy for already-placed leaves)."""
    if shardings is None:
        return tree

    def one(x, s):
        return x if getattr(x, "sharding", None) == s else jax.device_put(x, s)

    return jax.tree.map(one, tree, shardings)


_PLACED: list = []  # [(source tree, shardings, placed tree)], most recent first


def _place_cached(tree, shardings):
    """``_place`` for the unchanging base state: one device copy shared by every step / rollout function."""
    if shardings is None:
        return tree
    leaves = jax.tree.leaves(shardings)
    for src, sh, out in _PLACED:
        if src is tree and sh == leaves:
            return out
    out = _place(tree, shardings)
    _PLACED.insert(0, (tree, leaves, out))
    del _PLACED[4:]
    return out


def _constrain(x, mesh: Mesh | None, axis: int = 0):
    """Shard ``x``'s ``axis`` over (data, fsdp) (inside jit), if a mesh is given."""
    if mesh is None:
        return x
    spec = [None] * x.ndim
    spec[axis] = ("data", "fsdp")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))
