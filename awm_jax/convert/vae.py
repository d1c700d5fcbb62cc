"""AutoencoderKL key map: diffusers ``AutoencoderKL`` <-> ``awm_jax.models.vae.AutoencoderKL``.

Registered as ``"vae"`` in ``awm_jax.convert.CONVERTERS`` (interface: see that module's docstring).
:func:`module_map` lists every module of the network (encoder / decoder conv_in, the resnets of each
down/up block with their optional ``conv_shortcut``, down/up samplers, the mid blocks with their
optional attention, the output norms and convs, optional ``quant_conv`` / ``post_quant_conv``),
generated from the config. The Flax module tree mirrors diffusers' names, so prefixes coincide;
:func:`key_map` expands the modules into per-tensor rules (conv OIHW <-> HWIO, linear (out, in) <->
(in, out), group norm ``weight`` <-> ``scale``).

Only the current diffusers attention names (``to_q``/``to_k``/``to_v``/``to_out.0``) are mapped: a
legacy checkpoint with ``query``/``key``/``value``/``proj_attn`` must be re-saved with diffusers first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from awm_jax.convert.keymap import ConversionError, KeyMap, Module, same
from awm_jax.models.vae import AutoencoderKL, VAEConfig, abstract_vae

NAME = "vae"
SUBFOLDER = "vae"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
CLASS_NAMES = ("AutoencoderKL",)


def _config(config: Mapping[str, Any] | VAEConfig) -> VAEConfig:
    if isinstance(config, VAEConfig):
        return config
    try:
        return VAEConfig.from_dict(dict(config), source="AutoencoderKL config")
    except ValueError as e:
        raise ConversionError(str(e)) from None


def _conv(prefix: str, cin: int, cout: int, k: int) -> Module:
    return same(prefix, "conv2d", in_channels=cin, out_channels=cout, kernel_size=k)


def _resnet(prefix: str, cin: int, cout: int) -> list[Module]:
    mods = [same(f"{prefix}.norm1", "norm", dim=cin), _conv(f"{prefix}.conv1", cin, cout, 3),
            same(f"{prefix}.norm2", "norm", dim=cout), _conv(f"{prefix}.conv2", cout, cout, 3)]
    if cin != cout:
        mods.append(_conv(f"{prefix}.conv_shortcut", cin, cout, 1))
    return mods


def _mid(prefix: str, c: int, attention: bool) -> list[Module]:
    mods = _resnet(f"{prefix}.resnets.0", c, c)
    if attention:
        a = f"{prefix}.attentions.0"
        mods.append(same(f"{a}.group_norm", "norm", dim=c))
        mods += [same(f"{a}.{n}", "linear", in_features=c, out_features=c)
                 for n in ("to_q", "to_k", "to_v", "to_out.0")]
    return mods + _resnet(f"{prefix}.resnets.1", c, c)


def module_map(config: Mapping[str, Any] | VAEConfig) -> list[Module]:
    """Every parameterised module of the VAE described by the diffusers ``config``."""
    cfg = _config(config)
    ch, n, lc = cfg.block_out_channels, len(cfg.block_out_channels), cfg.latent_channels
    mods = [_conv("encoder.conv_in", cfg.in_channels, ch[0], 3)]
    for i in range(n):
        for j in range(cfg.layers_per_block):
            cin = ch[max(i - 1, 0)] if j == 0 else ch[i]
            mods += _resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin, ch[i])
        if i < n - 1:
            mods.append(_conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", ch[i], ch[i], 3))
    mods += _mid("encoder.mid_block", ch[-1], cfg.mid_block_add_attention)
    mods += [same("encoder.conv_norm_out", "norm", dim=ch[-1]), _conv("encoder.conv_out", ch[-1], 2 * lc, 3)]
    rch = tuple(reversed(ch))
    mods.append(_conv("decoder.conv_in", lc, rch[0], 3))
    mods += _mid("decoder.mid_block", rch[0], cfg.mid_block_add_attention)
    for i in range(n):
        for j in range(cfg.layers_per_block + 1):
            cin = rch[max(i - 1, 0)] if j == 0 else rch[i]
            mods += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin, rch[i])
        if i < n - 1:
            mods.append(_conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", rch[i], rch[i], 3))
    mods += [same("decoder.conv_norm_out", "norm", dim=rch[-1]),
             _conv("decoder.conv_out", rch[-1], cfg.out_channels, 3)]
    if cfg.use_quant_conv:
        mods.append(_conv("quant_conv", 2 * lc, 2 * lc, 1))
    if cfg.use_post_quant_conv:
        mods.append(_conv("post_quant_conv", lc, lc, 1))
    return mods


def key_map(config: Mapping[str, Any] | VAEConfig) -> KeyMap:
    """The per-tensor key map (diffusers key <-> Flax key, transform, shape) for ``config``."""
    return KeyMap.from_modules(module_map(config), name="vae")


def model_from_flax_params(config: VAEConfig, params: Mapping[str, Any], *, dtype=None,
                           param_dtype=None, source: str = "params") -> AutoencoderKL:
    """Build the NNX model from ``{flax.key: array}`` without materialising a random init.

    ``dtype``: compute dtype (None: follow the parameters); ``param_dtype``: cast the stored weights
    (None keeps them as stored).
    """
    import jax.numpy as jnp
    from flax import nnx

    graphdef, abstract = nnx.split(abstract_vae(config, dtype=dtype))
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        key = ".".join(str(p) for p in path)
        if key not in params:
            raise ConversionError(f"{source}: no tensor for model parameter {key!r}")
        a = jnp.asarray(params[key])
        want = tuple(var.get_value().shape)
        if tuple(a.shape) != want:
            raise ConversionError(f"{source}: tensor {key!r} has shape {tuple(a.shape)}, expected {want}")
        flat.append((path, var.replace(a if param_dtype is None else a.astype(param_dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load(src: str | os.PathLike, *, dtype=None, param_dtype=None) -> AutoencoderKL:
    """``AutoencoderKL`` from a diffusers VAE folder, a pipeline folder with ``vae/``, or a Flax folder."""
    from awm_jax.convert import read_flax_params

    config, _, tensors = read_flax_params(src, NAME)
    params = dict(tensors)
    return model_from_flax_params(_config(config), params, dtype=dtype, param_dtype=param_dtype,
                                  source=str(src))


def model_params(model: AutoencoderKL) -> dict[str, Any]:
    """The model's parameters as ``{flax.key: numpy array}`` (for ``awm_jax.convert.save_flax``)."""
    import numpy as np
    from flax import nnx

    return {".".join(str(p) for p in path): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
