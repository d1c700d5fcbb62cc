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

import dataclasses
from collections.abc import Mapping
from typing import Any

from awm_jax.convert.keymap import ConversionError, KeyMap, Module, same
from awm_jax.deprecation import aliases as _deprecated_aliases

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"

NAME = "vae"
SUBFOLDER = "vae"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
CLASS_NAMES = ("AutoencoderKL",)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' ``AutoencoderKL`` config that define the network (names as diffusers)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (_UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("VAEConfig.block_out_channels must not be empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"VAEConfig: down_block_types {self.down_block_types} / up_block_types {self.up_block_types} "
                f"must each have len(block_out_channels)={n} entries")
        bad = [t for t in self.down_block_types if t != _DOWN_BLOCK]
        bad += [t for t in self.up_block_types if t != _UP_BLOCK]
        if bad:
            raise ValueError(f"VAEConfig: unsupported block types {bad}; only {_DOWN_BLOCK}/{_UP_BLOCK}")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"VAEConfig.act_fn={self.act_fn!r} unsupported; only 'silu'")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"VAEConfig: block_out_channels {c} not divisible by norm_num_groups "
                                 f"{self.norm_num_groups}")

    @property
    def shift(self) -> float:
        """``shift_factor`` with diffusers' ``None`` meaning 0."""
        return 0.0 if self.shift_factor is None else float(self.shift_factor)

    @property
    def downsample_factor(self) -> int:
        """Spatial factor between image and latent (8 for the SD/FLUX VAEs)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> VAEConfig:
        """Build from a diffusers ``config.json`` dict; unknown keys (``_class_name``, ...) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if isinstance(kw.get("sample_size"), (list, tuple)):
            kw["sample_size"] = int(kw["sample_size"][0])
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: invalid AutoencoderKL config: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """The diffusers-style config dict (lists for tuples)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def vae_config(config: Mapping[str, Any] | VAEConfig) -> VAEConfig:
    """:class:`VAEConfig` of a diffusers config dict (errors as :class:`ConversionError`)."""
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
    cfg = vae_config(config)
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


# deprecated aliases of names that moved (awm_jax/deprecation.py, CHANGELOG.md)
__getattr__ = _deprecated_aliases(__name__)
