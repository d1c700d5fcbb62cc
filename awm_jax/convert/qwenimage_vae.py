"""Qwen-Image VAE key map: diffusers ``AutoencoderKLQwenImage`` <-> ``awm_jax.models.qwenimage_vae``.

The module tree follows diffusers 0.42 ``models/autoencoders/autoencoder_kl_qwenimage.py``: causal 3-D convs
(``weight (O, I, kt, kh, kw)`` <-> ``kernel (kt, kh, kw, I, O)``, all time taps kept so a round trip is
exact although single-frame decoding reads only the last), 2-D convs of the resamplers and attention
(``resample.1``, ``to_qkv``, ``proj``: OIHW <-> HWIO), and the RMS norms' ``gamma`` (diffusers ``(C, 1, 1[,
1])`` <-> Flax ``(C,)``). The temporal convs ``time_conv`` of the 3-D resamplers are mapped (and unused for
one frame). :class:`QwenImageVAEConfig` is the diffusers config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from awm_jax.convert.keymap import ConversionError, KeyMap, Module, Reshape, Transpose, same

NAME = "qwenimage_vae"
SUBFOLDER = "vae"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
CLASS_NAMES = ("AutoencoderKLQwenImage",)
CONV3D_T = Transpose((2, 3, 4, 1, 0))  # OITHW <-> THWIO

LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)


@dataclasses.dataclass(frozen=True)
class QwenImageVAEConfig:
    """diffusers ``AutoencoderKLQwenImage`` config (same field names and defaults)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    input_channels: int = 3
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self):
        for k in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, k, tuple(getattr(self, k)))
        n = len(self.dim_mult)
        if n < 1 or len(self.temperal_downsample) != n - 1:
            raise ValueError(
                f"QwenImageVAEConfig: temperal_downsample {self.temperal_downsample} must have "
                f"len(dim_mult) - 1 = {n - 1} entries"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"QwenImageVAEConfig: latents_mean / latents_std must have z_dim={self.z_dim} entries"
            )
        for k in ("base_dim", "z_dim", "num_res_blocks", "input_channels"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"QwenImageVAEConfig.{k}={getattr(self, k)!r} must be a positive integer")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> QwenImageVAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        # "_"-prefixed diffusers metadata and the Flax folder's "awm_jax" entry are not config fields
        kw = {k: v for k, v in dict(d).items() if not k.startswith("_") and k != "awm_jax"}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ConversionError(f"{source}: unknown AutoencoderKLQwenImage config keys {unknown}")
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ConversionError(f"{source}: invalid AutoencoderKLQwenImage config: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def vae_config(config) -> QwenImageVAEConfig:
    return config if isinstance(config, QwenImageVAEConfig) else QwenImageVAEConfig.from_dict(config)


def encoder_layout(cfg: QwenImageVAEConfig) -> list[tuple]:
    """``encoder.down_blocks`` in order: ``("res", cin, cout)``, ``("attn", c)``,
    ``("down", c, temporal)``."""
    dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
    out, scale = [], 1.0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            out.append(("res", cin, cout))
            if scale in cfg.attn_scales:
                out.append(("attn", cout))
            cin = cout
        if i != len(cfg.dim_mult) - 1:
            out.append(("down", cout, bool(cfg.temperal_downsample[i])))
            scale /= 2.0
    return out


def decoder_layout(cfg: QwenImageVAEConfig) -> list[tuple]:
    """``decoder.up_blocks``: ``(in_dim, out_dim, upsample None | (temporal,))`` per block."""
    dm = cfg.dim_mult
    dims = [cfg.base_dim * u for u in (dm[-1], *dm[::-1])]
    up = tuple(cfg.temperal_downsample)[::-1]
    out = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        cin = cin // 2 if i > 0 else cin
        out.append((cin, cout, None if i == len(dm) - 1 else (bool(up[i]),)))
    return out


def _c3(prefix: str, cin: int, cout: int, k: int, kt: int | None = None) -> list[Module]:
    kt = k if kt is None else kt
    kh = k if kt == k else 1
    return [
        Module(
            f"{prefix}.weight",
            f"{prefix}.kernel",
            "tensor",
            {"shape": (cout, cin, kt, kh, kh), "transform": CONV3D_T},
        ),
        same(f"{prefix}.bias", "tensor", shape=(cout,)),
    ]


def _gamma(prefix: str, c: int, images: bool = False) -> Module:
    shape = (c, 1, 1) if images else (c, 1, 1, 1)
    return Module(
        f"{prefix}.gamma", f"{prefix}.gamma", "tensor", {"shape": shape, "transform": Reshape(shape, (c,))}
    )


def _res(p: str, cin: int, cout: int) -> list[Module]:
    mods = [
        _gamma(f"{p}.norm1", cin),
        *_c3(f"{p}.conv1", cin, cout, 3),
        _gamma(f"{p}.norm2", cout),
        *_c3(f"{p}.conv2", cout, cout, 3),
    ]
    return mods + (_c3(f"{p}.conv_shortcut", cin, cout, 1) if cin != cout else [])


def _attn(p: str, c: int) -> list[Module]:
    return [
        _gamma(f"{p}.norm", c, images=True),
        same(f"{p}.to_qkv", "conv2d", in_channels=c, out_channels=3 * c, kernel_size=1),
        same(f"{p}.proj", "conv2d", in_channels=c, out_channels=c, kernel_size=1),
    ]


def _resample(p: str, c: int, up: bool, temporal: bool) -> list[Module]:
    mods = [same(f"{p}.resample.1", "conv2d", in_channels=c, out_channels=c // 2 if up else c, kernel_size=3)]
    if temporal:
        mods += _c3(f"{p}.time_conv", c, 2 * c if up else c, 1, kt=3)
    return mods


def _mid(p: str, c: int) -> list[Module]:
    return _res(f"{p}.resnets.0", c, c) + _attn(f"{p}.attentions.0", c) + _res(f"{p}.resnets.1", c, c)


def module_map(config) -> list[Module]:
    """Every parameter of the ``AutoencoderKLQwenImage`` of this config."""
    cfg = vae_config(config)
    z, dims = cfg.z_dim, [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
    mods = _c3("encoder.conv_in", cfg.input_channels, dims[0], 3)
    for i, item in enumerate(encoder_layout(cfg)):
        p = f"encoder.down_blocks.{i}"
        mods += (
            _res(p, item[1], item[2])
            if item[0] == "res"
            else _attn(p, item[1])
            if item[0] == "attn"
            else _resample(p, item[1], False, item[2])
        )
    mods += _mid("encoder.mid_block", dims[-1]) + [_gamma("encoder.norm_out", dims[-1])]
    mods += _c3("encoder.conv_out", dims[-1], 2 * z, 3)
    mods += _c3("quant_conv", 2 * z, 2 * z, 1) + _c3("post_quant_conv", z, z, 1)
    top = cfg.base_dim * cfg.dim_mult[-1]
    mods += _c3("decoder.conv_in", z, top, 3) + _mid("decoder.mid_block", top)
    for i, (cin, cout, up) in enumerate(decoder_layout(cfg)):
        for j in range(cfg.num_res_blocks + 1):
            mods += _res(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if up is not None:
            mods += _resample(f"decoder.up_blocks.{i}.upsamplers.0", cout, True, up[0])
    last = decoder_layout(cfg)[-1][1]
    return mods + [_gamma("decoder.norm_out", last)] + _c3("decoder.conv_out", last, cfg.input_channels, 3)


def key_map(config) -> KeyMap:
    return KeyMap.from_modules(module_map(config), name=NAME)
