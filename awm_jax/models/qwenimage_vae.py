"""Flax NNX ``AutoencoderKLQwenImage`` for single-frame images (Qwen-Image's causal 3-D VAE).

diffusers 0.42 ``models/autoencoders/autoencoder_kl_qwenimage.py`` decodes / encodes a video frame by frame
with a feature cache; for the first (here: only) frame every cache entry is empty, so:

- a causal 3-D conv (time padding ``2 * p`` zeros in front, none behind) sees the frame only through its
  last time tap: it is the 2-D conv ``weight[:, :, -1]`` with the same spatial padding;
- ``upsample3d`` / ``downsample3d`` resamplers skip their ``time_conv`` on the first chunk (the cache is set
  to ``"Rep"`` / the frame) and act like their 2-D versions (nearest-exact x2 + conv to ``dim // 2``;
  zero pad right/bottom + stride-2 conv);
- the RMS norm is ``F.normalize(x, dim=channels) * sqrt(C) * gamma``; the attention block is one head over
  the ``h * w`` positions (q, k, v = thirds of ``to_qkv``'s channels).

So this module computes exactly diffusers' single-frame result (``num_frame = 1``), with the full 3-D
kernels stored (the key map :mod:`awm_jax.convert.qwenimage_vae` round-trips every tensor). Multi-frame
video is not supported (named error). Down-path attention blocks (``attn_scales``) are built as the
architecture describes but untested: diffusers' own encoder cannot run them (it passes them the feature
cache). Public shapes mirror diffusers: images ``(B, 3, 1, H, W)`` or ``(B, 3, H, W)`` in [-1, 1], latents
``(B, z_dim, 1, h, w)`` or ``(B, z_dim, h, w)``; internally NHWC.

Latent normalisation as ``QwenImagePipeline`` applies it: decode ``z = latents * std + mean``
(``latents / (1 / std) + latents_mean``); encode ``(z - mean) / std`` (the edit / img2img pipelines).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awm_jax.convert import read_flax_params
from awm_jax.convert.qwenimage_vae import NAME as _CONVERTER
from awm_jax.convert.qwenimage_vae import QwenImageVAEConfig, decoder_layout, encoder_layout, vae_config

__all__ = ["AutoencoderKLQwenImage", "QwenImageVAEConfig", "load_qwenimage_vae", "latents_to_images_uint8"]


def _param(rngs, shape, names, dtype, scale=None):
    scale = scale if scale is not None else 1.0 / math.sqrt(max(1, int(np.prod(shape[:-1]))))
    return nnx.Param(scale * jax.random.normal(rngs.params(), shape, dtype), sharding_names=names)


def _conv2d(x, kernel, bias, stride=1, padding=((0, 0), (0, 0))):
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + bias.astype(x.dtype)


class CausalConv3d(nnx.Module):
    """``QwenImageCausalConv3d`` on one frame: kernel ``(kt, kh, kw, I, O)``, only its last time tap used."""

    def __init__(self, cin, cout, k, *, rngs, dtype, param_dtype, kt=None):
        kt = k if kt is None else kt
        kh = k if kt == k else 1
        self.pad, self.dtype = kh // 2, dtype
        self.kernel = _param(
            rngs, (kt, kh, kh, cin, cout), (None, None, None, "conv_in", "conv_out"), param_dtype
        )
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype), sharding_names=("conv_out",))

    def __call__(self, x):
        p = self.pad
        return _conv2d(x, self.kernel[...][-1], self.bias[...], padding=((p, p), (p, p)))


class Conv2d(nnx.Module):
    """``nn.Conv2d`` (HWIO kernel)."""

    def __init__(self, cin, cout, k, *, rngs, dtype, param_dtype):
        self.kernel = _param(rngs, (k, k, cin, cout), (None, None, "conv_in", "conv_out"), param_dtype)
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype), sharding_names=("conv_out",))

    def __call__(self, x, stride=1, padding=None):
        k = self.kernel.shape[0]
        padding = ((k // 2, k // 2),) * 2 if padding is None else padding
        return _conv2d(x, self.kernel[...], self.bias[...], stride, padding)


class RMSNormC(nnx.Module):
    """``QwenImageRMS_norm``: ``x / max(||x||_C, 1e-12) * sqrt(C) * gamma`` (statistics in float32)."""

    def __init__(self, c, *, param_dtype, **_):
        self.gamma = nnx.Param(jnp.ones((c,), param_dtype), sharding_names=("norm",))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        n = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        y = (xf / jnp.maximum(n, 1e-12)).astype(x.dtype)
        return y * math.sqrt(x.shape[-1]) * self.gamma[...].astype(x.dtype)


class ResidualBlock(nnx.Module):
    def __init__(self, cin, cout, **kw):
        self.norm1, self.conv1 = RMSNormC(cin, **kw), CausalConv3d(cin, cout, 3, **kw)
        self.norm2, self.conv2 = RMSNormC(cout, **kw), CausalConv3d(cout, cout, 3, **kw)
        self.conv_shortcut = CausalConv3d(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x):
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(jax.nn.silu(self.norm1(x)))
        return self.conv2(jax.nn.silu(self.norm2(x))) + h


class AttentionBlock(nnx.Module):
    """``QwenImageAttentionBlock``: one-head self attention over the frame's positions."""

    def __init__(self, c, **kw):
        self.norm = RMSNormC(c, **kw)
        self.to_qkv, self.proj = Conv2d(c, 3 * c, 1, **kw), Conv2d(c, c, 1, **kw)

    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, h * w, 1, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        o = jax.nn.dot_product_attention(q, k, v).reshape(b, h, w, c)
        return self.proj(o) + x


class Resample(nnx.Module):
    """``QwenImageResample`` (2-D path; ``time_conv`` held for the weights, unused for one frame)."""

    def __init__(self, c, up: bool, temporal: bool, **kw):
        self.up = up
        self.resample = nnx.List([None, Conv2d(c, c // 2 if up else c, 3, **kw)])
        self.time_conv = CausalConv3d(c, 2 * c if up else c, 1, kt=3, **kw) if temporal else None

    def __call__(self, x):
        if self.up:  # nearest-exact x2 (in float32, like QwenImageUpsample), conv padding 1
            x = jnp.repeat(jnp.repeat(x.astype(jnp.float32), 2, axis=1), 2, axis=2).astype(x.dtype)
            return self.resample[1](x)
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # ZeroPad2d((0, 1, 0, 1))
        return self.resample[1](x, stride=2, padding=((0, 0), (0, 0)))


class MidBlock(nnx.Module):
    def __init__(self, c, **kw):
        self.resnets = nnx.List([ResidualBlock(c, c, **kw), ResidualBlock(c, c, **kw)])
        self.attentions = nnx.List([AttentionBlock(c, **kw)])

    def __call__(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder3d(nnx.Module):
    def __init__(self, cfg: QwenImageVAEConfig, **kw):
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.input_channels, dims[0], 3, **kw)
        blocks = []
        for item in encoder_layout(cfg):
            if item[0] == "res":
                blocks.append(ResidualBlock(item[1], item[2], **kw))
            elif item[0] == "attn":
                blocks.append(AttentionBlock(item[1], **kw))
            else:
                blocks.append(Resample(item[1], False, item[2], **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], **kw)
        self.norm_out = RMSNormC(dims[-1], **kw)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        return self.conv_out(jax.nn.silu(self.norm_out(self.mid_block(x))))


class UpBlock(nnx.Module):
    def __init__(self, cin, cout, n, up, **kw):
        self.resnets = nnx.List([ResidualBlock(cin if j == 0 else cout, cout, **kw) for j in range(n + 1)])
        self.upsamplers = None if up is None else nnx.List([Resample(cout, True, up[0], **kw)])

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Decoder3d(nnx.Module):
    def __init__(self, cfg: QwenImageVAEConfig, **kw):
        layout = decoder_layout(cfg)
        top = cfg.base_dim * cfg.dim_mult[-1]
        self.conv_in = CausalConv3d(cfg.z_dim, top, 3, **kw)
        self.mid_block = MidBlock(top, **kw)
        self.up_blocks = nnx.List(
            [UpBlock(cin, cout, cfg.num_res_blocks, up, **kw) for cin, cout, up in layout]
        )
        self.norm_out = RMSNormC(layout[-1][1], **kw)
        self.conv_out = CausalConv3d(layout[-1][1], cfg.input_channels, 3, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class AutoencoderKLQwenImage(nnx.Module):
    """Flax port of diffusers' ``AutoencoderKLQwenImage`` for single frames (see the module docstring)."""

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        cfg = vae_config(config)
        self.config, self.dtype = cfg, dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.encoder = Encoder3d(cfg, **kw)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, **kw)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1, **kw)
        self.decoder = Decoder3d(cfg, **kw)

    def _nhwc(self, x, channels: int, what: str):
        x = jnp.asarray(x)
        if x.ndim == 5:
            if x.shape[2] != 1:
                raise ValueError(
                    f"AutoencoderKLQwenImage.{what}: {x.shape[2]} frames; only single frames "
                    "(B, C, 1, H, W) are supported"
                )
            x = x[:, :, 0]
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(
                f"AutoencoderKLQwenImage.{what}: expected (B, {channels}, [1,] H, W), got {x.shape}"
            )
        x = jnp.transpose(x, (0, 2, 3, 1))
        return x.astype(self.dtype) if self.dtype is not None else x

    def encode(self, x):
        """Images ``(B, C, [1,] H, W)`` in [-1, 1] -> ``(mean, logvar)`` each ``(B, z_dim, h, w)`` (diffusers'
        ``latent_dist.mean`` / ``logvar`` without the frame axis; logvar clipped to [-30, 20])."""
        h = self.quant_conv(self.encoder(self._nhwc(x, self.config.input_channels, "encode")))
        h = jnp.transpose(h, (0, 3, 1, 2))
        mean, logvar = jnp.split(h, 2, axis=1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """Raw latents ``(B, z_dim, [1,] h, w)`` -> images ``(B, C, H, W)`` clamped to [-1, 1] (diffusers'
        ``decode(z).sample[:, :, 0]``)."""
        x = self.decoder(self.post_quant_conv(self._nhwc(z, self.config.z_dim, "decode")))
        return jnp.clip(jnp.transpose(x, (0, 3, 1, 2)), -1.0, 1.0)

    def normalize(self, z):
        """Raw latents -> the transformer's latents ``(z - latents_mean) / latents_std`` (channel axis 1)."""
        m, s = self._stats(z)
        return (z - m) / s

    def denormalize(self, latents):
        """The transformer's latents -> raw latents, as ``QwenImagePipeline``:
        ``latents / (1 / std) + mean``."""
        m, s = self._stats(latents)
        return latents / (1.0 / s) + m

    def _stats(self, z):
        shape = (1, -1) + (1,) * (jnp.ndim(z) - 2)
        m = jnp.asarray(self.config.latents_mean, jnp.float32).reshape(shape)
        s = jnp.asarray(self.config.latents_std, jnp.float32).reshape(shape)
        return m.astype(jnp.result_type(z)), s.astype(jnp.result_type(z))


def latents_to_images_uint8(vae: AutoencoderKLQwenImage, latents):
    """The transformer's latents ``(B, z_dim, h, w)`` -> uint8 images ``(B, H, W, 3)`` (denormalise, decode,
    ``VaeImageProcessor.postprocess``: ``(x / 2 + 0.5).clamp(0, 1)``, rounded)."""
    x = vae.decode(vae.denormalize(jnp.asarray(latents, jnp.float32)))
    x = jnp.clip(x.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)
    return jnp.round(jnp.transpose(x, (0, 2, 3, 1)) * 255.0).astype(jnp.uint8)


def load_qwenimage_vae(
    path: str | os.PathLike, *, dtype=None, param_dtype=jnp.float32
) -> AutoencoderKLQwenImage:
    """A diffusers ``vae/`` folder, pipeline folder or Flax folder -> the Flax VAE with its weights."""
    config, _, tensors = read_flax_params(path, _CONVERTER)
    cfg = vae_config({k: v for k, v in config.items() if not k.startswith("_")})
    model = nnx.eval_shape(
        lambda: AutoencoderKLQwenImage(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    )
    values: dict[tuple, Any] = {
        tuple(int(p) if p.isdigit() else p for p in k.split(".")): v for k, v in tensors
    }
    flat = [
        (p, var.replace(value=jnp.asarray(values.pop(p), param_dtype)))
        for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    ]
    if values:  # the key map and the module tree disagree: a bug, not bad input
        raise RuntimeError(f"{path}: VAE tensors without a Flax parameter: {sorted(values)[:5]}")
    nnx.update(model, nnx.from_flat_state(flat))
    return model
