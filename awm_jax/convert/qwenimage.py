"""Qwen-Image key map: diffusers ``QwenImageTransformer2DModel`` <-> ``awm_jax.models.qwenimage``.

Modules: ``img_in``, ``txt_norm`` (RMSNorm), ``txt_in``, ``time_text_embed.timestep_embedder.linear_{1,2}``,
per block ``transformer_blocks.{i}``: ``img_mod.1`` / ``txt_mod.1`` (Flax ``img_mod.linear`` /
``txt_mod.linear``, the shared adaLN-Zero module), joint attention q/k/v + ``add_{q,k,v}_proj`` with RMSNorm
``norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k``, ``to_out.0``, ``to_add_out``, the
feed-forwards ``img_mlp`` / ``txt_mlp`` (``net.0.proj``, ``net.2``); ``norm_out.linear`` and ``proj_out``.
Linear ``weight (out, in)`` <-> ``kernel (in, out)``, RMSNorm ``weight`` <-> ``scale``; no buffers (the
MSRoPE tables are recomputed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from awm_jax.convert.keymap import ConversionError, KeyMap, Module, same

NAME = "qwenimage"
SUBFOLDER = "transformer"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
CLASS_NAMES = ("QwenImageTransformer2DModel",)
DEFAULTS: dict[str, Any] = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60,
                            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584}
MLP_RATIO = 4


def _get(config, key):
    get = config.get if isinstance(config, Mapping) else (lambda k, d: getattr(config, k, d))
    v = get(key, DEFAULTS[key])
    return DEFAULTS[key] if v is None and key != "out_channels" else v


def _lin(prefix: str, fi: int, fo: int, flax: str | None = None) -> Module:
    dims = dict(in_features=fi, out_features=fo)
    return same(prefix, "linear", **dims) if flax is None else Module(prefix, flax, "linear", dims)


def module_map(config: Mapping[str, Any] | Any) -> list[Module]:
    """The declarative module list of a Qwen-Image transformer with this config."""
    for k in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope", "guidance_embeds"):
        flag = config.get(k) if isinstance(config, Mapping) else getattr(config, k, False)
        if flag:
            raise ConversionError(f"qwenimage config: {k}=True (edit / layered variant) is not supported")
    heads, hd = int(_get(config, "num_attention_heads")), int(_get(config, "attention_head_dim"))
    cin, joint = int(_get(config, "in_channels")), int(_get(config, "joint_attention_dim"))
    p = int(_get(config, "patch_size"))
    out = int(_get(config, "out_channels") or cin)
    if min(heads, hd, cin, joint, p) < 1:
        raise ConversionError(f"qwenimage config: sizes must be positive (heads={heads}, head_dim={hd}, "
                              f"in_channels={cin}, joint_attention_dim={joint}, patch_size={p})")
    dim = heads * hd
    mods = [_lin("img_in", cin, dim), same("txt_norm", "rms_norm", dim=joint), _lin("txt_in", joint, dim),
            _lin("time_text_embed.timestep_embedder.linear_1", 256, dim),
            _lin("time_text_embed.timestep_embedder.linear_2", dim, dim)]
    for i in range(int(_get(config, "num_layers"))):
        b = f"transformer_blocks.{i}"
        mods += [_lin(f"{b}.img_mod.1", dim, 6 * dim, flax=f"{b}.img_mod.linear"),
                 _lin(f"{b}.txt_mod.1", dim, 6 * dim, flax=f"{b}.txt_mod.linear")]
        mods += [_lin(f"{b}.attn.{n}", dim, dim) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                          "add_v_proj", "to_out.0", "to_add_out")]
        mods += [same(f"{b}.attn.{n}", "rms_norm", dim=hd) for n in ("norm_q", "norm_k", "norm_added_q",
                                                                   "norm_added_k")]
        for mlp in ("img_mlp", "txt_mlp"):
            mods += [_lin(f"{b}.{mlp}.net.0.proj", dim, MLP_RATIO * dim),
                     _lin(f"{b}.{mlp}.net.2", MLP_RATIO * dim, dim)]
    return mods + [_lin("norm_out.linear", dim, 2 * dim), _lin("proj_out", dim, p * p * out)]


def key_map(config: Mapping[str, Any] | Any) -> KeyMap:
    """The per-tensor, invertible key map of a Qwen-Image transformer with this config."""
    return KeyMap.from_modules(module_map(config), name=NAME)
