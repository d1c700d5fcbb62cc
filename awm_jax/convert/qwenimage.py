"""Qwen-Image key map: diffusers ``QwenImageTransformer2DModel`` <-> ``awm_jax.models.qwenimage``.

:func:`module_map` lists every module of the network (diffusers 0.42
``models/transformers/transformer_qwenimage.py``): ``img_in``, ``txt_in`` (linears), ``txt_norm`` (RMSNorm
over ``joint_attention_dim``), ``time_text_embed.timestep_embedder.linear_{1,2}``, the blocks
``transformer_blocks.{i}`` (``img_mod.1`` / ``txt_mod.1`` modulation linears, joint attention q/k/v +
``add_{q,k,v}_proj`` with RMSNorm ``norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k``,
``to_out.0`` and ``to_add_out``, feed-forwards ``img_mlp`` / ``txt_mlp``), ``norm_out.linear`` and
``proj_out``. The model has no buffers (``pos_embed`` holds only non-persistent tensors: its rotary tables
are recomputed).

Prefixes coincide on both sides; linear ``weight (out, in)`` <-> ``kernel (in, out)``, RMSNorm ``weight``
<-> ``scale``. Flax keys are per-layer paths; ``scan_layers=True`` models are filled through
:mod:`awm_jax.models.stacking`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from awm_jax.convert.keymap import ConversionError, KeyMap, Module, same

NAME = "qwenimage"
SUBFOLDER = "transformer"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
CLASS_NAMES = ("QwenImageTransformer2DModel",)

# diffusers' QwenImageTransformer2DModel defaults (for fields a config.json leaves out)
DEFAULTS: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "use_additional_t_cond": False,
}
TIMESTEP_CHANNELS = 256  # Timesteps(num_channels=256)
MLP_RATIO = 4  # FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate") default mult


def _get(config, key):
    if isinstance(config, Mapping):
        v = config.get(key, DEFAULTS[key])
    else:
        v = getattr(config, key, DEFAULTS[key])
    return DEFAULTS[key] if v is None and key != "out_channels" else v


def _int(config, key: str, minimum: int) -> int:
    v = _get(config, key)
    try:
        iv = int(v)
    except (TypeError, ValueError):
        raise ConversionError(f"qwenimage config: {key}={v!r} must be an integer") from None
    if iv < minimum:
        raise ConversionError(f"qwenimage config: {key}={v!r} must be >= {minimum}")
    return iv


def _lin(prefix: str, fi: int, fo: int) -> Module:
    return same(prefix, "linear", in_features=fi, out_features=fo)


def _block(i: int, dim: int, hd: int) -> list[Module]:
    p = f"transformer_blocks.{i}"
    mods = [_lin(f"{p}.img_mod.1", dim, 6 * dim), _lin(f"{p}.txt_mod.1", dim, 6 * dim)]
    mods += [
        _lin(f"{p}.attn.{n}", dim, dim)
        for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")
    ]
    mods += [
        same(f"{p}.attn.{n}", "rms_norm", dim=hd)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
    ]
    for ff in ("img_mlp", "txt_mlp"):
        mods += [
            _lin(f"{p}.{ff}.net.0.proj", dim, MLP_RATIO * dim),
            _lin(f"{p}.{ff}.net.2", MLP_RATIO * dim, dim),
        ]
    return mods


def module_map(config: Mapping[str, Any] | Any) -> list[Module]:
    """The declarative module list of a Qwen-Image transformer with this config."""
    for k in ("guidance_embeds", "use_additional_t_cond"):
        if _get(config, k):
            raise ConversionError(f"qwenimage config: {k}=True is not supported")
    hd, heads = _int(config, "attention_head_dim", 1), _int(config, "num_attention_heads", 1)
    dim, joint = hd * heads, _int(config, "joint_attention_dim", 1)
    patch, cin = _int(config, "patch_size", 1), _int(config, "in_channels", 1)
    cout = _get(config, "out_channels") or cin
    mods = [
        _lin("img_in", cin, dim),
        _lin("txt_in", joint, dim),
        same("txt_norm", "rms_norm", dim=joint),
        _lin("time_text_embed.timestep_embedder.linear_1", TIMESTEP_CHANNELS, dim),
        _lin("time_text_embed.timestep_embedder.linear_2", dim, dim),
    ]
    for i in range(_int(config, "num_layers", 0)):
        mods += _block(i, dim, hd)
    return mods + [_lin("norm_out.linear", dim, 2 * dim), _lin("proj_out", dim, patch * patch * int(cout))]


def key_map(config: Mapping[str, Any] | Any) -> KeyMap:
    """The per-tensor, invertible key map of a Qwen-Image transformer with this config."""
    return KeyMap.from_modules(module_map(config), name=NAME)
