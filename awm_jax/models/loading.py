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

from awm_jax.convert import ConversionError, folder_config, read_flax_params
from awm_jax.models.family import ModelFamily, family_for_weights, family_of, get_family
from awm_jax.models.lora import LoRAParam
from awm_jax.models.stacking import flatten, nest, stack_state, unstack_state

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
                     family: str | ModelFamily | None = None, **model_kwargs: Any) -> nnx.Module:
    """Load a transformer with its weights.

    Args:
      path: a diffusers transformer folder, a pipeline folder (``transformer/`` inside) or an awm-jax Flax
        folder (``tools/convert_weights.py to-flax``).
      dtype: compute dtype (None: float32).
      param_dtype: parameter storage dtype (None: float32, i.e. checkpoint values upcast exactly).
      seed: PRNG seed for variables the checkpoint doesn't hold (LoRA adapters when ``lora=`` is given).
      family: the model family (name or object); None: recognised from ``config.json``.
      **model_kwargs: forwarded to the family's ``build`` (``scan_layers``, ``remat_policy``, ``lora``).

    Raises:
      ConversionError: missing / unexpected / mis-shaped tensors (naming key, shapes and file).
    """
    fam = get_family(family) if isinstance(family, str) else (family or detect_family(path))
    config, _, tensors = read_flax_params(path, fam.converter)
    cfg = fam.config_from_dict(config, source=f"{path}")
    pdt = jnp.dtype(jnp.float32 if param_dtype is None else param_dtype)
    kwargs = dict(dtype=jnp.float32 if dtype is None else dtype, param_dtype=pdt, **model_kwargs)

    def build():
        return fam.build(cfg, rngs=nnx.Rngs(seed), **kwargs)

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    flat = list(nnx.to_flat_state(abstract))

    values: dict[tuple, jax.Array] = {}
    for key, arr in tensors:
        if fam.skip_tensor(key, arr, cfg, str(path)):
            continue
        values[_path(key)] = jnp.asarray(arr, dtype=pdt)
    if kwargs.get("scan_layers"):
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


def _init_missing(build, missing: list[tuple], flat) -> dict[tuple, jax.Array]:
    """Real initial values of the variables no checkpoint provides (only LoRA adapters are allowed).

    Computed under ``jit`` returning only those variables, so the base weights' init is dead code."""
    kinds = {p: v for p, v in flat}
    bad = [_key(p) for p in missing if not isinstance(kinds[p], LoRAParam)]
    if bad:
        more = " ..." if len(bad) > 5 else ""
        raise ConversionError(f"checkpoint lacks model parameters {bad[:5]}{more}")

    @jax.jit
    def init():
        state = nnx.state(build(), LoRAParam)
        return {p: v[...] for p, v in nnx.to_flat_state(state)}

    return init()


def transformer_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's base weights as Flax per-layer ``{dot.path: numpy array}`` (LoRA adapters excluded),
    e.g. for ``awm_jax.convert.save_flax(params, model.config.to_dict(), dst, family.converter)``."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
    if getattr(model, "scan_layers", False):
        state = unstack_state(state, family_of(model).stacks(model.config))
    return {_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}
