"""Z-Image key map: diffusers ``ZImageTransformer2DModel`` <-> ``awm_jax.models.zimage``.

:func:`module_map` lists every module (diffusers prefix, Flax prefix, kind, dims) from the config: the
single-patch embedder ``all_x_embedder.{p}-{pf}`` and final layer ``all_final_layer.{p}-{pf}`` (``linear``
and ``adaLN_modulation.1``), the time embedder ``t_embedder.mlp.{0,2}``, the caption embedder
``cap_embedder.0`` (RMSNorm) and ``cap_embedder.1`` (Linear), the pad tokens
``x_pad_token`` / ``cap_pad_token`` (bare ``(1, dim)`` tensors), and the blocks of ``noise_refiner``,
``context_refiner`` (no ``adaLN_modulation``) and ``layers``: attention q/k/v/out without biases and RMSNorm
``norm_q`` / ``norm_k`` (when ``qk_norm``), SwiGLU ``feed_forward.w{1,2,3}`` without biases and the four
block RMSNorms. The Flax tree mirrors diffusers' names (prefixes coincide). Linear ``weight (out, in)``
<-> ``kernel (in, out)``, RMSNorm ``weight`` <-> ``scale``. Z-Image has no buffers (RoPE tables are
recomputed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from awm_jax.convert.keymap import ConversionError, KeyMap, Module, same

NAME = "zimage"
SUBFOLDER = "transformer"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
CLASS_NAMES = ("ZImageTransformer2DModel",)

DEFAULTS: dict[str, Any] = {  # diffusers' ZImageTransformer2DModel defaults
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "qk_norm": True, "cap_feat_dim": 2560, "siglip_feat_dim": None,
}
ADALN_EMBED_DIM = 256
T_EMBED_MID = 1024
FREQ_DIM = 256


def _get(config, key):
    get = config.get if isinstance(config, Mapping) else (lambda k, d: getattr(config, k, d))
    return get(key, DEFAULTS[key])


def _lin(prefix: str, fi: int, fo: int, bias: bool = True) -> Module:
    return same(prefix, "linear", in_features=fi, out_features=fo, bias=bias)


def _block(p: str, dim: int, heads: int, qk: bool, modulation: bool) -> list[Module]:
    hd, ffn = dim // heads, int(dim / 3 * 8)
    mods = [_lin(f"{p}.attention.{n}", dim, dim, bias=False) for n in ("to_q", "to_k", "to_v")]
    if qk:
        mods += [same(f"{p}.attention.{n}", "rms_norm", dim=hd) for n in ("norm_q", "norm_k")]
    mods += [_lin(f"{p}.attention.to_out.0", dim, dim, bias=False),
             _lin(f"{p}.feed_forward.w1", dim, ffn, bias=False),
             _lin(f"{p}.feed_forward.w2", ffn, dim, bias=False),
             _lin(f"{p}.feed_forward.w3", dim, ffn, bias=False)]
    mods += [same(f"{p}.{n}", "rms_norm", dim=dim)
             for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2")]
    if modulation:
        mods.append(_lin(f"{p}.adaLN_modulation.0", min(dim, ADALN_EMBED_DIM), 4 * dim))
    return mods


def module_map(config: Mapping[str, Any] | Any) -> list[Module]:
    """The declarative module list of a Z-Image transformer with this config."""
    ps, fps = tuple(_get(config, "all_patch_size")), tuple(_get(config, "all_f_patch_size"))
    if len(ps) != 1 or len(fps) != 1:
        raise ConversionError(f"zimage config: all_patch_size={list(ps)}, all_f_patch_size={list(fps)}: only "
                              "one patch size is supported")
    if _get(config, "siglip_feat_dim") is not None:
        raise ConversionError("zimage config: siglip_feat_dim is set (omni variant): not supported")
    p, pf = int(ps[0]), int(fps[0])
    c, dim, heads = int(_get(config, "in_channels")), int(_get(config, "dim")), int(_get(config, "n_heads"))
    cap, qk = int(_get(config, "cap_feat_dim")), bool(_get(config, "qk_norm"))
    if min(c, dim, heads, cap) < 1 or dim % heads:
        raise ConversionError(f"zimage config: in_channels={c}, dim={dim}, n_heads={heads}, "
                              f"cap_feat_dim={cap} must be positive with dim a multiple of n_heads")
    adaln, key = min(dim, ADALN_EMBED_DIM), f"{p}-{pf}"
    patch = p * p * pf * c
    mods = [_lin(f"all_x_embedder.{key}", patch, dim), _lin(f"all_final_layer.{key}.linear", dim, patch),
            _lin(f"all_final_layer.{key}.adaLN_modulation.1", adaln, dim),
            _lin("t_embedder.mlp.0", FREQ_DIM, T_EMBED_MID), _lin("t_embedder.mlp.2", T_EMBED_MID, adaln),
            same("cap_embedder.0", "rms_norm", dim=cap), _lin("cap_embedder.1", cap, dim),
            same("x_pad_token", "tensor", shape=(1, dim)), same("cap_pad_token", "tensor", shape=(1, dim))]
    refiners = int(_get(config, "n_refiner_layers"))
    for name, n, modulation in (("noise_refiner", refiners, True), ("context_refiner", refiners, False),
                                ("layers", int(_get(config, "n_layers")), True)):
        for i in range(n):
            mods += _block(f"{name}.{i}", dim, heads, qk, modulation)
    return mods


def key_map(config: Mapping[str, Any] | Any) -> KeyMap:
    """The per-tensor, invertible key map of a Z-Image transformer with this config."""
    return KeyMap.from_modules(module_map(config), name=NAME)
