"""Flax NNX ``AutoencoderKL``, numerically equal to diffusers' ``AutoencoderKL``.

Covers the KL VAEs of SD1/SDXL (4 latent channels, ``quant_conv``/``post_quant_conv``) and of
SD3/SD3.5/FLUX (16 latent channels, no quant convs). Submodules are named like diffusers'
(``encoder.down_blocks[i].resnets[j].conv1``, ``decoder.mid_block.attentions[0].to_q``, ...), so
the key map in ``awm_jax/convert/vae.py`` is a plain rename plus layout transposes.

Public shapes mirror diffusers: images ``(B, 3, H, W)`` in ``[-1, 1]``, latents ``(B, C, h, w)``.
Internally activations are NHWC. Parameters: conv ``kernel`` HWIO + ``bias``, linear ``kernel``
``(in, out)`` + ``bias``, group norm ``scale`` + ``bias``; every parameter carries logical axis names.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from awm_jax.convert import ConversionError, read_flax_params
from awm_jax.convert.vae import NAME as _CONVERTER
from awm_jax.convert.vae import VAEConfig, vae_config

_CONV_AXES = (None, None, "conv_in", "conv_out")
_EPS = 1e-6  # diffusers' Encoder/Decoder fix resnet and norm eps at 1e-6


# ----------------------------------------------------------------------------------------------
# layers


def _conv(cin: int, cout: int, k: int, *, rngs, dtype, param_dtype, stride=1, padding=None) -> nnx.Conv:
    if padding is None:
        padding = ((k // 2, k // 2), (k // 2, k // 2))
    return nnx.Conv(
        cin, cout, (k, k), strides=stride, padding=padding, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_metadata={"sharding_names": _CONV_AXES}, bias_metadata={"sharding_names": ("conv_out",)})


class GroupNorm(nnx.Module):
    """GroupNorm over NHWC activations like ``torch.nn.GroupNorm`` (two-pass fp32 statistics)."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = _EPS, dtype=None,
                 param_dtype=jnp.float32):
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype), sharding_names=("norm",))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype), sharding_names=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = self.dtype or x.dtype
        b, h, w, c = x.shape
        xg = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
        mean = xg.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(out_dtype)


class ResnetBlock2D(nnx.Module):
    """diffusers ``ResnetBlock2D`` without time embedding (norm-silu-conv twice + shortcut)."""

    def __init__(self, cin: int, cout: int, groups: int, *, rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(groups, cin, **kw)
        self.conv1 = _conv(cin, cout, 3, rngs=rngs, **kw)
        self.norm2 = GroupNorm(groups, cout, **kw)
        self.conv2 = _conv(cout, cout, 3, rngs=rngs, **kw)
        self.conv_shortcut = _conv(cin, cout, 1, rngs=rngs, **kw) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv after zero-padding right/bottom by one (diffusers ``padding=0`` variant)."""

    def __init__(self, channels: int, *, rngs, dtype=None, param_dtype=jnp.float32):
        self.conv = _conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, *, rngs, dtype=None, param_dtype=jnp.float32):
        self.conv = _conv(channels, channels, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Attention(nnx.Module):
    """The VAE mid-block self-attention: group norm, one head of width C, residual."""

    def __init__(self, channels: int, groups: int, *, rngs, dtype=None, param_dtype=jnp.float32):
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qkv_meta = dict(kernel_metadata={"sharding_names": ("embed", "heads")},
                        bias_metadata={"sharding_names": ("heads",)})
        self.group_norm = GroupNorm(groups, channels, dtype=dtype, param_dtype=param_dtype)
        self.to_q = nnx.Linear(channels, channels, **kw, **qkv_meta)
        self.to_k = nnx.Linear(channels, channels, **kw, **qkv_meta)
        self.to_v = nnx.Linear(channels, channels, **kw, **qkv_meta)
        self.to_out = nnx.List([nnx.Linear(channels, channels, **kw,
                                           kernel_metadata={"sharding_names": ("heads", "embed")},
                                           bias_metadata={"sharding_names": ("embed",)})])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        s = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(s), self.to_k(s), self.to_v(s)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("bqk,bkc->bqc", p, v)
        return x + self.to_out[0](o).reshape(b, h, w, c)


class MidBlock2D(nnx.Module):
    """diffusers ``UNetMidBlock2D`` (resnet, [attention], resnet)."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *, rngs, dtype=None,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, **kw) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, groups, **kw)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    """``num_layers`` resnets then an optional stride-2 downsampler."""

    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_downsample: bool, *, rngs,
                 dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw)
                                 for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample2D(cout, **kw)] if add_downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.resnets:
            x = layer(x)
        for layer in self.downsamplers:
            x = layer(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """``num_layers`` resnets then an optional nearest-2x upsampler."""

    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_upsample: bool, *, rngs,
                 dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw)
                                 for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(cout, **kw)] if add_upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.resnets:
            x = layer(x)
        for layer in self.upsamplers:
            x = layer(x)
        return x


class Encoder(nnx.Module):
    """Image (NHWC) -> ``2 * latent_channels`` moments (NHWC)."""

    def __init__(self, cfg: VAEConfig, *, rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, ch[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1, **kw)
            for i in range(len(ch))])
        self.mid_block = MidBlock2D(ch[-1], g, cfg.mid_block_add_attention, **kw)
        self.conv_norm_out = GroupNorm(g, ch[-1], dtype=dtype, param_dtype=param_dtype)
        self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent (NHWC) -> image (NHWC)."""

    def __init__(self, cfg: VAEConfig, *, rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, ch[0], 3, **kw)
        self.mid_block = MidBlock2D(ch[0], g, cfg.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < len(ch) - 1, **kw)
            for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(g, ch[-1], dtype=dtype, param_dtype=param_dtype)
        self.conv_out = _conv(ch[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


@struct.dataclass
class DiagonalGaussian:
    """The posterior returned by ``AutoencoderKL.encode`` (diffusers' ``DiagonalGaussianDistribution``).

    ``mean`` and ``logvar`` (clamped to [-30, 20]) have shape (B, C, h, w).
    """

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def mode(self) -> jax.Array:
        """The posterior mean."""
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """``mean + std * N(0, 1)`` drawn with ``key``."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def kl(self) -> jax.Array:
        """KL to the standard normal, summed over (C, h, w) -> (B,)."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class AutoencoderKL(nnx.Module):
    """diffusers-compatible KL autoencoder. ``encode``/``decode`` take and return (B, C, H, W) arrays."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        lc = config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = _conv(2 * lc, 2 * lc, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = _conv(lc, lc, 1, **kw) if config.use_post_quant_conv else None

    def _check(self, x: jax.Array, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"AutoencoderKL.{what}: expected (B, {channels}, H, W), got {tuple(x.shape)}")

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images (B, in_channels, H, W) in [-1, 1] -> posterior over latents (B, C, H/f, W/f)."""
        self._check(x, self.config.in_channels, "encode")
        if self.dtype is not None:
            x = x.astype(self.dtype)
        h = self.encoder(jnp.transpose(x, (0, 2, 3, 1)))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        h = jnp.transpose(h, (0, 3, 1, 2))
        mean, logvar = jnp.split(h, 2, axis=1)
        return DiagonalGaussian(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, latent_channels, h, w), as diffusers' ``vae.decode`` -> (B, 3, H, W)."""
        self._check(z, self.config.latent_channels, "decode")
        if self.dtype is not None:
            z = z.astype(self.dtype)
        z = jnp.transpose(z, (0, 2, 3, 1))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return jnp.transpose(self.decoder(z), (0, 3, 1, 2))

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruct: encode, take the mode (or a sample with ``key``), decode."""
        post = self.encode(x)
        return self.decode(post.mode() if key is None else post.sample(key))


# ----------------------------------------------------------------------------------------------
# pure helpers (jittable, shardable)


def images_from_decoded(x: jax.Array) -> jax.Array:
    """Decoded (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounding like diffusers' image processor."""
    x = jnp.clip(x.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)
    return jnp.round(jnp.transpose(x, (0, 2, 3, 1)) * 255.0).astype(jnp.uint8)


def latents_to_images_uint8(vae: AutoencoderKL, latents: jax.Array) -> jax.Array:
    """Model-space latents (B, C, h, w) -> uint8 images (B, H, W, 3): ``z / scaling + shift``, decode, clip.

    Works eagerly or inside ``jax.jit`` / ``nnx.jit``; for a jitted, batch-sharded closure use
    ``make_decode_fn``.
    """
    cfg = vae.config
    z = latents.astype(jnp.float32) / cfg.scaling_factor + cfg.shift
    return images_from_decoded(vae.decode(z))


def images_uint8_to_latents(vae: AutoencoderKL, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """uint8 (B, H, W, 3) -> model-space latents ``(z - shift) * scaling`` (mode, or a sample with key)."""
    x = jnp.transpose(images.astype(jnp.float32) / 127.5 - 1.0, (0, 3, 1, 2))
    post = vae.encode(x)
    z = post.mode() if key is None else post.sample(key)
    return ((z.astype(jnp.float32) - vae.config.shift) * vae.config.scaling_factor)


def make_decode_fn(vae: AutoencoderKL, mesh: jax.sharding.Mesh | None = None,
                   data_axes: str | Sequence[str] | None = None):
    """A jitted pure ``decode(latents (B,C,h,w)) -> uint8 (B,H,W,3)`` closed over the VAE's state.

    With ``mesh``, the batch dimension of latents and images is sharded over ``data_axes`` (default: every
    mesh axis whose name is not ``"model"``/``"tensor"``), parameters are replicated. B must then be a
    multiple of the data-parallel size. The returned function can also be called inside another jit.
    """
    graphdef, state = nnx.split(vae)

    def _decode(state, latents):
        return latents_to_images_uint8(nnx.merge(graphdef, state), latents)

    if mesh is None:
        fn = jax.jit(_decode)
        return functools.partial(fn, state)
    if data_axes is None:
        data_axes = tuple(a for a in mesh.axis_names if a not in ("model", "tensor"))
    elif isinstance(data_axes, str):
        data_axes = (data_axes,)
    missing = [a for a in data_axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"make_decode_fn: data axes {missing} not in mesh axes {mesh.axis_names}")
    P = jax.sharding.PartitionSpec
    batch = jax.sharding.NamedSharding(mesh, P(tuple(data_axes)))
    repl = jax.sharding.NamedSharding(mesh, P())
    state = jax.device_put(state, repl)
    fn = jax.jit(_decode, in_shardings=(repl, batch), out_shardings=batch)
    return functools.partial(fn, state)


# ----------------------------------------------------------------------------------------------
# loading


def abstract_vae(config: VAEConfig, *, dtype=None, param_dtype=jnp.float32) -> AutoencoderKL:
    """The model with ``ShapeDtypeStruct`` parameters (no weights materialised)."""
    return nnx.eval_shape(
        lambda: AutoencoderKL(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))


def load_vae(path: str | pathlib.Path, dtype=None, param_dtype=None) -> AutoencoderKL:
    """Load a VAE from a diffusers ``vae/`` folder, a pipeline folder, or a converted Flax folder.

    ``dtype`` is the compute dtype (None: the parameters' dtype); ``param_dtype`` casts stored weights
    (None keeps them as stored).
    """
    return load(path, dtype=dtype, param_dtype=param_dtype)


def model_from_flax_params(config: VAEConfig, params: Mapping[str, Any], *, dtype=None,
                           param_dtype=None, source: str = "params") -> AutoencoderKL:
    """Build the NNX model from ``{flax.key: array}`` without materialising a random init.

    ``dtype``: compute dtype (None: follow the parameters); ``param_dtype``: cast the stored weights
    (None keeps them as stored).
    """
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
    config, _, tensors = read_flax_params(src, _CONVERTER)
    params = dict(tensors)
    return model_from_flax_params(vae_config(config), params, dtype=dtype, param_dtype=param_dtype,
                                  source=str(src))


def model_params(model: AutoencoderKL) -> dict[str, Any]:
    """The model's parameters as ``{flax.key: numpy array}`` (for ``awm_jax.convert.save_flax``)."""
    import numpy as np

    return {".".join(str(p) for p in path): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

