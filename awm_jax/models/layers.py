"""Building blocks shared by the Flax NNX models (numerically like their diffusers counterparts).

- :class:`Dense`: ``y = x W + b [+ (x A) B * alpha / r]`` with kernel ``(in, out)``, optional LoRA
  (:mod:`awm_jax.models.lora`), separate ``param_dtype`` (storage) and ``dtype`` (compute).
- :class:`LayerNorm`, :class:`RMSNorm`: statistics in float32, eps as diffusers passes it.
- :func:`attention`: ``jax.nn.dot_product_attention`` on ``(B, L, heads, head_dim)``.
- :func:`timestep_embedding`: diffusers ``get_timestep_embedding``.
- :func:`sincos_2d_table` (from :mod:`awm_jax.posembed`): diffusers ``get_2d_sincos_pos_embed``.
- :func:`gelu_tanh`: the ``"gelu-approximate"`` activation of diffusers' ``FeedForward``.

Every parameter carries logical axis names (``sharding_names``) from ``awm_jax.parallel``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awm_jax.models.lora import LoRAConfig, LoRAParam
from awm_jax.posembed import sincos_2d_table

__all__ = ["Dense", "LayerNorm", "RMSNorm", "attention", "gelu_tanh", "sincos_2d_table", "timestep_embedding"]


def _cast(x, dtype):
    return x if dtype is None else jnp.asarray(x, dtype)


class Dense(nnx.Module):
    """Linear layer like ``torch.nn.Linear`` (kernel stored transposed, ``(in, out)``), with optional LoRA.

    ``sharding_names=(in_name, out_name)`` are the logical axis names of the kernel; the bias uses
    ``(out_name,)``, ``lora_a`` ``(in_name, "lora_rank")`` and ``lora_b`` ``("lora_rank", out_name)``.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=None,
                 param_dtype=jnp.float32, sharding_names: tuple = ("embed", "mlp"),
                 lora: LoRAConfig | None = None, rngs: nnx.Rngs):
        if len(sharding_names) != 2:
            raise ValueError(f"Dense: sharding_names must be (in_name, out_name), got {sharding_names!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.dtype = dtype
        in_name, out_name = sharding_names
        bound = 1.0 / math.sqrt(self.in_features)  # torch.nn.Linear's default init
        key = rngs.params()
        self.kernel = nnx.Param(
            jax.random.uniform(key, (self.in_features, self.out_features), param_dtype, -bound, bound),
            sharding_names=(in_name, out_name))
        if use_bias:
            self.bias = nnx.Param(
                jax.random.uniform(rngs.params(), (self.out_features,), param_dtype, -bound, bound),
                sharding_names=(out_name,))
        else:
            self.bias = None
        if lora is not None:
            r = int(lora.rank)
            self.lora_scale = lora.scale
            self.lora_a = LoRAParam(
                jax.random.normal(rngs.params(), (self.in_features, r), param_dtype) / r,
                sharding_names=(in_name, "lora_rank"))
            self.lora_b = LoRAParam(jnp.zeros((r, self.out_features), param_dtype),
                                    sharding_names=("lora_rank", out_name))
        else:
            self.lora_scale = None
            self.lora_a = None
            self.lora_b = None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x = _cast(x, dtype)
        y = jnp.dot(x, _cast(self.kernel[...], dtype))
        if self.bias is not None:
            y = y + _cast(self.bias[...], dtype)
        if self.lora_a is not None:
            low = jnp.dot(jnp.dot(x, _cast(self.lora_a[...], dtype)), _cast(self.lora_b[...], dtype))
            y = y + low * jnp.asarray(self.lora_scale, dtype)
        return y


class LayerNorm(nnx.Module):
    """``torch.nn.LayerNorm`` over the last axis (float32 statistics), affine optional."""

    def __init__(self, num_features: int, *, eps: float = 1e-6, elementwise_affine: bool = False,
                 use_bias: bool = True, dtype=None, param_dtype=jnp.float32):
        self.eps, self.dtype = float(eps), dtype
        if elementwise_affine:
            self.scale = nnx.Param(jnp.ones((num_features,), param_dtype), sharding_names=("norm",))
            self.bias = (nnx.Param(jnp.zeros((num_features,), param_dtype), sharding_names=("norm",))
                         if use_bias else None)
        else:
            self.scale = None
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class RMSNorm(nnx.Module):
    """diffusers ``RMSNorm``: ``x * rsqrt(mean(x^2) + eps) [* weight]`` with float32 statistics."""

    def __init__(self, num_features: int, *, eps: float = 1e-6, elementwise_affine: bool = True,
                 dtype=None, param_dtype=jnp.float32):
        self.eps, self.dtype = float(eps), dtype
        self.scale = (nnx.Param(jnp.ones((num_features,), param_dtype), sharding_names=("norm",))
                      if elementwise_affine else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        return y.astype(dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, dtype=None, mask=None) -> jax.Array:
    """Softmax attention on ``(B, L, heads, head_dim)`` tensors, scale ``1/sqrt(head_dim)``, in ``dtype``;
    ``mask``: optional boolean key mask ``(B, S)`` (False: that key is ignored, padding)."""
    dtype = dtype or q.dtype
    q, k, v = (t.astype(dtype) for t in (q, k, v))
    if mask is not None:
        mask = jnp.asarray(mask, bool)[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (``torch.nn.functional.gelu(approximate="tanh")``)."""
    return jax.nn.gelu(x, approximate=True)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding ``(N,) -> (N, dim)`` float32, like diffusers ``get_timestep_embedding``."""
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timestep_embedding: timesteps must be 1-D, got shape {timesteps.shape}")
    half = dim // 2
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(_frequencies(half, downscale_freq_shift,
                                                                            max_period))[None, :]
    emb = scale * emb
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


@functools.lru_cache(maxsize=16)
def _frequencies(half: int, downscale_freq_shift: float, max_period: float) -> np.ndarray:
    # float32 exponent exactly as diffusers forms it, then a correctly rounded exp (host constant):
    # XLA's float32 exp differs from torch's in the last ulp, which matters for sin(1000 * f).
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
                / np.float32(half - downscale_freq_shift))
    return np.exp(exponent.astype(np.float64)).astype(np.float32)
