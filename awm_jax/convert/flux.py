"""FLUX.1 key map: diffusers ``FluxTransformer2DModel`` <-> ``awm_jax.models.flux``.

:func:`module_map` lists every module of the network as (diffusers prefix, Flax prefix, kind, dims),
generated from the config: ``x_embedder`` and ``context_embedder`` (linears), the time / [guidance] /
pooled-text embedders of ``time_text_embed`` (the ``guidance_embedder`` only when ``guidance_embeds``), the
double-stream blocks ``transformer_blocks.{i}`` (two AdaLayerNormZero linears, joint attention with
``norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k`` RMSNorm weights, ``to_out.0`` and
``to_add_out``, the two feed-forwards), the single-stream blocks ``single_transformer_blocks.{i}``
(AdaLayerNormZeroSingle linear, ``proj_mlp``, ``proj_out`` on ``[attention, mlp]``, attention q/k/v with
RMSNorms and no output projection), the final AdaLayerNormContinuous ``norm_out.linear`` and ``proj_out``.
FLUX has no buffers (its rotary tables are computed from the position ids on every call).

The Flax module tree mirrors diffusers' names, so prefixes coincide; linear ``weight (out, in)`` <->
``kernel (in, out)``, RMSNorm ``weight`` <-> ``scale``. Flax keys are *per-layer* paths
(``single_transformer_blocks.3.proj_mlp.kernel``); a model built with ``scan_layers=True`` is filled through
:mod:`awm_jax.models.stacking` with the family's stacks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from awm_jax.convert.keymap import ConversionError, KeyMap, Module, same

NAME = "flux"
SUBFOLDER = "transformer"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
CLASS_NAMES = ("FluxTransformer2DModel",)

# diffusers' FluxTransformer2DModel defaults (used for fields a config.json leaves out)
DEFAULTS: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
TIMESTEP_CHANNELS = 256  # diffusers' Timesteps(num_channels=256) feeding the timestep / guidance embedders
MLP_RATIO = 4  # FeedForward(mult=4) and FluxSingleTransformerBlock(mlp_ratio=4.0)


@dataclasses.dataclass(frozen=True)
class _Dims:
    patch_size: int
    in_channels: int
    out_channels: int | None
    num_layers: int
    num_single_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    pooled_projection_dim: int
    guidance_embeds: bool
    axes_dims_rope: tuple[int, ...]

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        # diffusers: out_channels = out_channels or in_channels; proj_out has patch_size**2 * out_channels
        return self.patch_size**2 * (self.out_channels or self.in_channels)


def _dims(config: Mapping[str, Any] | Any) -> _Dims:
    """Read the network-defining fields from a diffusers config dict or a ``FluxConfig``-like object."""
    get = config.get if isinstance(config, Mapping) else (lambda k, d: getattr(config, k, d))
    vals = {k: get(k, v) for k, v in DEFAULTS.items()}
    vals["axes_dims_rope"] = tuple(int(a) for a in (vals["axes_dims_rope"] or ()))
    vals["guidance_embeds"] = bool(vals["guidance_embeds"])
    d = _Dims(**vals)
    for k in ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
              "pooled_projection_dim"):
        if int(getattr(d, k)) < 1:
            raise ConversionError(f"flux config: {k}={getattr(d, k)!r} must be a positive integer")
    for k in ("num_layers", "num_single_layers"):
        if int(getattr(d, k)) < 0:
            raise ConversionError(f"flux config: {k}={getattr(d, k)!r} must be >= 0")
    return d


def _lin(prefix: str, fi: int, fo: int) -> Module:
    return same(prefix, "linear", in_features=fi, out_features=fo)


def _ff(prefix: str, dim: int) -> list[Module]:
    # FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate"): net[0] = GELU(proj), net[2] = Linear
    return [_lin(f"{prefix}.net.0.proj", dim, MLP_RATIO * dim), _lin(f"{prefix}.net.2", MLP_RATIO * dim, dim)]


def _qk(prefix: str, names: tuple[str, ...], head_dim: int) -> list[Module]:
    return [same(f"{prefix}.{n}", "rms_norm", dim=head_dim) for n in names]


def _double_block(i: int, d: _Dims) -> list[Module]:
    p, dim, hd = f"transformer_blocks.{i}", d.dim, d.attention_head_dim
    mods = [_lin(f"{p}.norm1.linear", dim, 6 * dim), _lin(f"{p}.norm1_context.linear", dim, 6 * dim)]
    mods += [_lin(f"{p}.attn.{n}", dim, dim) for n in ("to_q", "to_k", "to_v")]
    mods += _qk(f"{p}.attn", ("norm_q", "norm_k"), hd)
    mods += [_lin(f"{p}.attn.{n}", dim, dim) for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
    mods += _qk(f"{p}.attn", ("norm_added_q", "norm_added_k"), hd)
    mods += [_lin(f"{p}.attn.to_out.0", dim, dim), _lin(f"{p}.attn.to_add_out", dim, dim)]
    return mods + _ff(f"{p}.ff", dim) + _ff(f"{p}.ff_context", dim)


def _single_block(i: int, d: _Dims) -> list[Module]:
    p, dim, hd = f"single_transformer_blocks.{i}", d.dim, d.attention_head_dim
    mlp = MLP_RATIO * dim
    mods = [_lin(f"{p}.norm.linear", dim, 3 * dim), _lin(f"{p}.proj_mlp", dim, mlp),
            _lin(f"{p}.proj_out", dim + mlp, dim)]
    mods += [_lin(f"{p}.attn.{n}", dim, dim) for n in ("to_q", "to_k", "to_v")]
    return mods + _qk(f"{p}.attn", ("norm_q", "norm_k"), hd)


def module_map(config: Mapping[str, Any] | Any) -> list[Module]:
    """The declarative module list of a FLUX.1 transformer with this config."""
    d = _dims(config)
    dim = d.dim
    mods = [_lin("x_embedder", d.in_channels, dim)]
    embedders = ["timestep_embedder"] + (["guidance_embedder"] if d.guidance_embeds else [])
    for name in embedders:
        mods += [_lin(f"time_text_embed.{name}.linear_1", TIMESTEP_CHANNELS, dim),
                 _lin(f"time_text_embed.{name}.linear_2", dim, dim)]
    mods += [_lin("time_text_embed.text_embedder.linear_1", d.pooled_projection_dim, dim),
             _lin("time_text_embed.text_embedder.linear_2", dim, dim),
             _lin("context_embedder", d.joint_attention_dim, dim)]
    for i in range(d.num_layers):
        mods += _double_block(i, d)
    for i in range(d.num_single_layers):
        mods += _single_block(i, d)
    return mods + [_lin("norm_out.linear", dim, 2 * dim), _lin("proj_out", dim, d.out_dim)]


def key_map(config: Mapping[str, Any] | Any) -> KeyMap:
    """The per-tensor, invertible key map of a FLUX.1 transformer with this config."""
    return KeyMap.from_modules(module_map(config), name=NAME)
