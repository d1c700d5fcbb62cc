"""awm_jax.models: Flax NNX networks and their loaders.

``load_transformer(path)`` builds the SD3/SD3.5 :class:`SD3Transformer2DModel` from a diffusers
``transformer/`` folder, a full pipeline folder or a converted awm-jax Flax folder (see
``awm_jax.convert``), without materialising random init weights: the model is created abstractly with
``nnx.eval_shape`` and every parameter is filled from the checkpoint, tensor by tensor.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awm_jax.convert import ConversionError, read_flax_params
from awm_jax.models.lora import LoRAConfig, LoRAParam
from awm_jax.models.mmdit import SD3Config, SD3Transformer2DModel, pos_embed_table, stack_state, unstack_state
from awm_jax.models.vae import AutoencoderKL, VAEConfig, load_vae

__all__ = [
    "AutoencoderKL",
    "LoRAConfig",
    "LoRAParam",
    "SD3Config",
    "SD3Transformer2DModel",
    "VAEConfig",
    "load_transformer",
    "load_vae",
    "stack_state",
    "transformer_params",
    "unstack_state",
]

_POS_EMBED = "pos_embed.pos_embed"


def _path(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def _key(path) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def _check_pos_embed(table: np.ndarray, cfg: SD3Config, where: str) -> None:
    """The stored buffer must be the table the Flax model recomputes (catches config/weight mismatches)."""
    want = pos_embed_table(cfg)
    got = np.asarray(table, np.float32)
    tol = 1e-4 if table.dtype.itemsize >= 4 else 1e-2
    err = float(np.max(np.abs(got.reshape(want.shape) - want))) if got.size == want.size else np.inf
    if not err <= tol:
        raise ConversionError(
            f"{where}: stored {_POS_EMBED} differs from the sin-cos table of its config "
            f"(max |diff| {err:.3g})"
        )


def load_transformer(path: str | os.PathLike, dtype: Any = None, *, param_dtype: Any = None, seed: int = 0,
                     **model_kwargs: Any) -> SD3Transformer2DModel:
    """Load an SD3/SD3.5 transformer with its weights.

    Args:
      path: diffusers ``SD3Transformer2DModel`` folder, pipeline folder (``transformer/`` inside) or an
        awm-jax Flax folder (``tools/convert_weights.py to-flax``).
      dtype: compute dtype (None: float32).
      param_dtype: parameter storage dtype (None: float32, i.e. checkpoint values upcast exactly).
      seed: PRNG seed for variables the checkpoint doesn't hold (LoRA adapters when ``lora=`` is given).
      **model_kwargs: forwarded to :class:`SD3Transformer2DModel` (``scan_layers``, ``remat_policy``,
        ``lora``).

    Raises:
      ConversionError: missing / unexpected / mis-shaped tensors (naming key, shapes and file).
    """
    config, _, tensors = read_flax_params(path, "sd3")
    cfg = SD3Config.from_dict(config, source=f"{path}")
    pdt = jnp.dtype(jnp.float32 if param_dtype is None else param_dtype)
    kwargs = dict(dtype=jnp.float32 if dtype is None else dtype, param_dtype=pdt, **model_kwargs)

    def build():
        return SD3Transformer2DModel(cfg, rngs=nnx.Rngs(seed), **kwargs)

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    flat = list(nnx.to_flat_state(abstract))

    values: dict[tuple, jax.Array] = {}
    for key, arr in tensors:
        if key == _POS_EMBED:
            _check_pos_embed(arr, cfg, str(path))
            continue
        values[_path(key)] = jnp.asarray(arr, dtype=pdt)
    if kwargs.get("scan_layers"):
        nested = stack_state(_nest(values), cfg)
        values = {tuple(p): v for p, v in _flatten(nested)}

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


def _nest(values: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in values.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _flatten(d: dict, prefix: tuple = ()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def transformer_params(model: SD3Transformer2DModel) -> dict[str, np.ndarray]:
    """The model's base weights as Flax per-layer ``{dot.path: numpy array}`` (LoRA adapters excluded),
    e.g. for ``awm_jax.convert.save_flax(params, model.config.to_dict(), dst, "sd3")``."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
    if model.scan_layers:
        state = unstack_state(state, model.config)
    return {_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}
