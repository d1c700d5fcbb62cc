"""SD3 / SD3.5 MMDiT key map: diffusers ``SD3Transformer2DModel`` <-> ``awm_jax.models.mmdit``.

:func:`module_map` lists every module of the network as (diffusers prefix, Flax prefix, kind, dims),
generated from the config: patch embedding (conv, + the persistent sin-cos ``pos_embed`` buffer when
``pos_embed_max_size`` is set), timestep / pooled-text embedders, caption projection, the joint blocks
(AdaLayerNormZero or, for ``dual_attention_layers``, SD35AdaLayerNormZeroX; optional ``attn2``;
``qk_norm`` None / ``"rms_norm"`` / ``"layer_norm"`` / ``"fp32_layer_norm"`` (no parameters); the
last block is context-pre-only: its context norm is AdaLayerNormContinuous and it has no
``to_add_out`` / ``ff_context``), the final AdaLayerNormContinuous and ``proj_out``. The Flax module
tree mirrors diffusers' names, so prefixes coincide; :func:`key_map` expands the modules into
per-tensor rules (see ``awm_jax.convert.keymap``).

Flax keys are *per-layer* paths (``transformer_blocks.3.attn.to_q.kernel``); a model built with
``scan_layers=True`` is filled through the model's own stack helpers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from awm_jax.convert.keymap import ConversionError, KeyMap, Module, same
from awm_jax.posembed import sincos_2d_table

NAME = "sd3"
SUBFOLDER = "transformer"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
CLASS_NAMES = ("SD3Transformer2DModel",)
QK_NORMS = (None, "rms_norm", "layer_norm", "fp32_layer_norm")

# diffusers' SD3Transformer2DModel defaults (used for fields a config.json leaves out)
DEFAULTS: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (),
    "qk_norm": None,
}
TIMESTEP_CHANNELS = 256  # diffusers' Timesteps(num_channels=256) feeding the timestep embedder


@dataclasses.dataclass(frozen=True)
class _Dims:
    sample_size: int
    patch_size: int
    in_channels: int
    num_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    caption_projection_dim: int
    pooled_projection_dim: int
    out_channels: int | None
    pos_embed_max_size: int | None
    dual_attention_layers: tuple[int, ...]
    qk_norm: str | None


def _dims(config: Mapping[str, Any] | Any) -> _Dims:
    """Read the network-defining fields from a diffusers config dict or an ``SD3Config``-like object."""
    get = config.get if isinstance(config, Mapping) else (lambda k, d: getattr(config, k, d))
    vals = {k: get(k, v) for k, v in DEFAULTS.items()}
    vals["dual_attention_layers"] = tuple(int(i) for i in (vals["dual_attention_layers"] or ()))
    d = _Dims(**vals)
    if d.qk_norm not in QK_NORMS:
        raise ConversionError(f"sd3 config: qk_norm={d.qk_norm!r} unsupported; expected one of {QK_NORMS}")
    bad = [i for i in d.dual_attention_layers if not 0 <= i < d.num_layers]
    if bad:
        raise ConversionError(f"sd3 config: dual_attention_layers {bad} outside 0..{d.num_layers - 1}")
    return d


def _qk_norm(prefix: str, kind: str | None, head_dim: int) -> list[Module]:
    if kind in (None, "fp32_layer_norm"):  # fp32_layer_norm has no affine parameters
        return []
    if kind == "rms_norm":
        return [same(prefix, "rms_norm", dim=head_dim)]
    return [same(prefix, "norm", dim=head_dim, bias=True)]


def _ff(prefix: str, dim: int) -> list[Module]:
    # FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate"): net[0] = GELU(proj), net[2] = Linear
    return [
        same(f"{prefix}.net.0.proj", "linear", in_features=dim, out_features=4 * dim),
        same(f"{prefix}.net.2", "linear", in_features=4 * dim, out_features=dim),
    ]


def _block(i: int, d: _Dims) -> list[Module]:
    dim = d.num_attention_heads * d.attention_head_dim
    hd = d.attention_head_dim
    p = f"transformer_blocks.{i}"
    pre_only = i == d.num_layers - 1
    dual = i in d.dual_attention_layers
    lin = lambda name, fi, fo: same(f"{p}.{name}", "linear", in_features=fi, out_features=fo)
    mods = [
        lin("norm1.linear", dim, (9 if dual else 6) * dim),  # SD35AdaLayerNormZeroX / AdaLayerNormZero
        lin("norm1_context.linear", dim, (2 if pre_only else 6) * dim),  # AdaLayerNormContinuous / Zero
    ]
    # joint attention: sample q/k/v, context add_q/k/v, outputs
    mods += [lin(f"attn.{n}", dim, dim) for n in ("to_q", "to_k", "to_v")]
    mods += _qk_norm(f"{p}.attn.norm_q", d.qk_norm, hd) + _qk_norm(f"{p}.attn.norm_k", d.qk_norm, hd)
    mods += [lin(f"attn.{n}", dim, dim) for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
    mods += _qk_norm(f"{p}.attn.norm_added_q", d.qk_norm, hd)
    mods += _qk_norm(f"{p}.attn.norm_added_k", d.qk_norm, hd)
    mods.append(lin("attn.to_out.0", dim, dim))
    if not pre_only:
        mods.append(lin("attn.to_add_out", dim, dim))
    if dual:  # MMDiT-X: a second, sample-only self attention
        mods += [lin(f"attn2.{n}", dim, dim) for n in ("to_q", "to_k", "to_v")]
        mods += _qk_norm(f"{p}.attn2.norm_q", d.qk_norm, hd) + _qk_norm(f"{p}.attn2.norm_k", d.qk_norm, hd)
        mods.append(lin("attn2.to_out.0", dim, dim))
    mods += _ff(f"{p}.ff", dim)
    if not pre_only:
        mods += _ff(f"{p}.ff_context", dim)
    return mods


def module_map(config: Mapping[str, Any] | Any) -> list[Module]:
    """The declarative module list of an SD3/SD3.5 transformer with this config."""
    d = _dims(config)
    dim = d.num_attention_heads * d.attention_head_dim
    out_channels = d.out_channels if d.out_channels is not None else d.in_channels
    mods = [same("pos_embed.proj", "conv2d", in_channels=d.in_channels, out_channels=dim,
                 kernel_size=d.patch_size)]
    if d.pos_embed_max_size:
        # persistent fixed sin-cos table; the Flax model recomputes it, so Flax folders may omit it
        table = (1, d.pos_embed_max_size**2, dim)
        mods.append(same("pos_embed.pos_embed", "tensor", optional=True, shape=table))
    te, tx = "time_text_embed.timestep_embedder", "time_text_embed.text_embedder"
    mods += [
        same(f"{te}.linear_1", "linear", in_features=TIMESTEP_CHANNELS, out_features=dim),
        same(f"{te}.linear_2", "linear", in_features=dim, out_features=dim),
        same(f"{tx}.linear_1", "linear", in_features=d.pooled_projection_dim, out_features=dim),
        same(f"{tx}.linear_2", "linear", in_features=dim, out_features=dim),
        same("context_embedder", "linear", in_features=d.joint_attention_dim,
             out_features=d.caption_projection_dim),
    ]
    for i in range(d.num_layers):
        mods += _block(i, d)
    mods += [
        same("norm_out.linear", "linear", in_features=dim, out_features=2 * dim),
        same("proj_out", "linear", in_features=dim, out_features=d.patch_size**2 * out_channels),
    ]
    return mods


def key_map(config: Mapping[str, Any] | Any) -> KeyMap:
    """The per-tensor, invertible key map of an SD3/SD3.5 transformer with this config."""
    return KeyMap.from_modules(module_map(config), name=NAME)


def pos_embed_table(config: Mapping[str, Any] | Any) -> np.ndarray:
    """diffusers' ``pos_embed.pos_embed`` buffer ``(1, N, inner_dim)`` float32 of this config."""
    d = _dims(config)
    base = d.sample_size // d.patch_size
    n = d.pos_embed_max_size or int(base)
    return sincos_2d_table(d.num_attention_heads * d.attention_head_dim, n, n, float(base))[None]


def default_tensor(config: Mapping[str, Any], diffusers_key: str):
    """Values of optional tensors a Flax folder may omit: the ``pos_embed.pos_embed`` sin-cos table."""
    if diffusers_key != "pos_embed.pos_embed":
        return None
    return pos_embed_table(config)
