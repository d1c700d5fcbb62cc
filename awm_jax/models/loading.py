"""Loading a transformer of any registered family from weights, and reading its weights back out.

``load_transformer(path)`` recognises the family from the folder's ``config.json`` (diffusers
``_class_name`` or the awm-jax Flax folder's model name), builds the model abstractly with
``nnx.eval_shape`` (no random init of the base weights) and fills every parameter from the checkpoint,
tensor by tensor, through the family's key map.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from awm_jax import parallel
from awm_jax.convert import ConversionError, folder_config, open_flax_slices, read_flax_params
from awm_jax.models.family import ModelFamily, family_for_weights, family_of, get_family
from awm_jax.models.lora import LoRAParam
from awm_jax.models.stacking import flatten, layer_paths, nest, stack_state, unstack_state

__all__ = ["load_transformer", "transformer_params", "detect_family"]


def _path(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def _key(path) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def detect_family(path: str | os.PathLike) -> ModelFamily:
    """The model family of the transformer stored at ``path`` (diffusers, pipeline or Flax folder)."""
    model_dir, config = folder_config(path)
    return family_for_weights(config, str(model_dir))


def load_transformer(path: str | os.PathLike, dtype: Any = None, *, param_dtype: Any = None, seed: int = 0,
                     family: str | ModelFamily | None = None, mesh: Mesh | None = None,
                     **model_kwargs: Any) -> nnx.Module:
    """Load a transformer with its weights.

    Args:
      path: a diffusers transformer folder, a pipeline folder (``transformer/`` inside) or an awm-jax Flax
        folder (``tools/convert_weights.py to-flax``).
      dtype: compute dtype (None: float32).
      param_dtype: parameter storage dtype (None: float32, i.e. checkpoint values upcast exactly).
      seed: PRNG seed for variables the checkpoint doesn't hold (LoRA adapters when ``lora=`` is given).
      family: the model family (name or object); None: recognised from ``config.json``.
      mesh: place every parameter straight onto this mesh with the sharding of its logical axis names
        (``awm_jax.parallel``): each global array is built with ``jax.make_array_from_callback`` from the
        slices its (addressable) devices hold, read from the safetensors files slice by slice (stacked
        layers are stacked per shard on the host), so no device -- and, where the layout allows, no host
        -- ever holds a full copy of a sharded parameter. None: the parameters land on the default device.
      **model_kwargs: forwarded to the family's ``build`` (``scan_layers``, ``remat_policy``, ``lora``).

    Raises:
      ConversionError: missing / unexpected / mis-shaped tensors (naming key, shapes and file).
    """
    fam = get_family(family) if isinstance(family, str) else (family or detect_family(path))
    if mesh is not None:
        return _load_on_mesh(path, fam, mesh, dtype, param_dtype, seed, model_kwargs)
    config, _, tensors = read_flax_params(path, fam.converter)
    cfg, pdt, build, graphdef, abstract = _abstract_model(fam, config, path, dtype, param_dtype, seed,
                                                          model_kwargs)
    flat = list(nnx.to_flat_state(abstract))

    values: dict[tuple, jax.Array] = {}
    for key, arr in tensors:
        if fam.skip_tensor(key, arr, cfg, str(path)):
            continue
        values[_path(key)] = jnp.asarray(arr, dtype=pdt)
    if model_kwargs.get("scan_layers"):
        values = dict(flatten(stack_state(nest(values), fam.stacks(cfg))))

    missing = [p for p, v in flat if p not in values]
    init = _init_missing(build, missing, flat) if missing else {}
    out = []
    for p, var in flat:
        value = values.pop(p) if p in values else init[p]
        if tuple(value.shape) != tuple(var.shape):
            raise ConversionError(f"{path}: tensor {_key(p)} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(var.shape)}")
        out.append((p, var.replace(value=value)))
    if values:
        raise ConversionError(f"{path}: tensors not used by the model: {sorted(map(_key, values))[:5]}")
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def _abstract_model(fam: ModelFamily, config: dict, path, dtype, param_dtype, seed: int, model_kwargs: dict):
    """``(cfg, param dtype, build, graphdef, abstract state)`` of the model ``config.json`` describes."""
    cfg = fam.config_from_dict(config, source=f"{path}")
    pdt = jnp.dtype(jnp.float32 if param_dtype is None else param_dtype)
    kwargs = dict(dtype=jnp.float32 if dtype is None else dtype, param_dtype=pdt, **model_kwargs)

    def build():
        return fam.build(cfg, rngs=nnx.Rngs(seed), **kwargs)

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    return cfg, pdt, build, graphdef, abstract


def _load_on_mesh(path, fam: ModelFamily, mesh: Mesh, dtype, param_dtype, seed: int, model_kwargs: dict):
    """:func:`load_transformer` with ``mesh``: every parameter born sharded, read shard by shard."""
    config, _, reader, tensors = open_flax_slices(path, fam.converter)
    with reader:
        cfg, pdt, build, graphdef, abstract = _abstract_model(fam, config, path, dtype, param_dtype, seed,
                                                              model_kwargs)
        flat = list(nnx.to_flat_state(abstract))
        shardings = dict(nnx.to_flat_state(parallel.state_shardings(abstract, mesh)))
        stacks = fam.stacks(cfg) if model_kwargs.get("scan_layers") else ()
        source = {_path(k): (tuple(shape), read) for k, shape, _, read in tensors}
        used: set[tuple] = set()
        out, missing = [], []
        for p, var in flat:
            parts = layer_paths(p, stacks) if stacks else None
            keys = [p] if parts is None else parts
            if not all(k in source for k in keys):
                missing.append(p)
                out.append((p, var))
                continue
            used.update(keys)
            shape = (source[p][0] if parts is None
                     else (len(parts),) + source[parts[0]][0])
            if parts is not None and any(source[k][0] != shape[1:] for k in parts):
                raise ConversionError(f"{path}: the layers of {_key(p)} differ in shape")
            if shape != tuple(var.shape):
                raise ConversionError(f"{path}: tensor {_key(p)} has shape {shape}, "
                                      f"the model expects {tuple(var.shape)}")
            reads = [source[k][1] for k in keys]
            value = _global_array(shape, shardings[p].get_value(), pdt, reads, stacked=parts is not None)
            out.append((p, var.replace(value=value)))
        for k in [k for k in source if k not in used]:  # e.g. SD3's stored pos_embed buffer: checked
            if not fam.skip_tensor(_key(k), source[k][1](()), cfg, str(path)):
                raise ConversionError(f"{path}: tensors not used by the model: {_key(k)}")
        if missing:
            init = _init_missing(build, missing, flat, {p: shardings[p].get_value() for p in missing})
            out = [(p, var.replace(value=init[p]) if p in init else var) for p, var in out]
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def _global_array(shape: tuple, sharding, dtype, reads: list, stacked: bool) -> jax.Array:
    """One global array of ``sharding`` whose every addressable shard is read on the host from just its
    slice (``reads``: one reader, or one per stacked layer stacked along axis 0) and cast to ``dtype``."""
    cache: dict[tuple, np.ndarray] = {}

    def shard(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in cache:
            if stacked:
                layers = range(len(reads))[index[0]]
                x = np.stack([reads[j](index[1:]) for j in layers])
            else:
                x = reads[0](index)
            cache[key] = np.asarray(x).astype(dtype, copy=False)
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, shard)


def _init_missing(build, missing: list[tuple], flat, shardings: dict | None = None) -> dict[tuple, jax.Array]:
    """Real initial values of the variables no checkpoint provides (only LoRA adapters are allowed).

    Computed under ``jit`` returning only those variables, so the base weights' init is dead code."""
    kinds = {p: v for p, v in flat}
    bad = [_key(p) for p in missing if not isinstance(kinds[p], LoRAParam)]
    if bad:
        more = " ..." if len(bad) > 5 else ""
        raise ConversionError(f"checkpoint lacks model parameters {bad[:5]}{more}")

    def init():
        state = nnx.state(build(), LoRAParam)
        return {p: v[...] for p, v in nnx.to_flat_state(state)}

    if shardings is None:
        return jax.jit(init)()
    return jax.jit(init, out_shardings=shardings)()  # born sharded: no full copy on any device


def transformer_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's base weights as Flax per-layer ``{dot.path: numpy array}`` (LoRA adapters excluded),
    e.g. for ``awm_jax.convert.save_flax(params, model.config.to_dict(), dst, family.converter)``."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
    if getattr(model, "scan_layers", False):
        state = unstack_state(state, family_of(model).stacks(model.config))
    return {_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}
