"""CLIP in Flax NNX: vision tower, text tower, projections and logit scale (for on-accelerator rewards).

Numerically the ``transformers`` ``CLIPModel`` (``modeling_clip.py``: ``CLIPVisionEmbeddings``,
``CLIPEncoderLayer`` pre-LN blocks, ``CLIPTextTransformer`` with a causal mask and pooling at the
end-of-text token, ``visual_projection`` / ``text_projection`` without bias) and the ``open_clip``
``CLIP`` (``open_clip/transformer.py``: ``VisionTransformer`` with ``ln_pre`` and token pooling,
``TextTransformer`` with ``argmax`` pooling; same computation, other parameter names and a fused
``in_proj`` attention input). Parameter names follow transformers (``vision_model.encoder.layers.3.
self_attn.q_proj.kernel``); with ``fused_qkv=True`` (open_clip checkpoints) an attention holds one
``in_proj`` Dense ``(D, 3D)`` instead of ``q_proj / k_proj / v_proj`` so every checkpoint tensor maps
to exactly one parameter (``awm_jax.convert.clip``).

Attention logits, softmax, layer-norm statistics and the final L2 norms are computed in float32;
``dtype`` (compute) and ``param_dtype`` (storage) are separate. Every parameter carries logical axis
names (``awm_jax.parallel``). ``image_features`` / ``text_features`` return the *un-normalised*
projected embeddings, as ``CLIPModel.get_image_features`` / ``open_clip`` ``encode_image`` do.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awm_jax.convert import ConversionError, read_flax_params
from awm_jax.convert import clip as clip_convert
from awm_jax.models.layers import Dense, LayerNorm

__all__ = [
    "CLIPConfig",
    "CLIPModel",
    "abstract_clip",
    "load",
    "model_from_flax_params",
    "model_params",
    "normalize",
]

ACTS = ("quick_gelu", "gelu")
POOLS = ("eos", "argmax")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Architecture of one CLIP (both towers). ``text_pool``: ``"eos"`` (first ``eos_token_id``, the
    transformers rule) or ``"argmax"`` (highest token id: open_clip and transformers' legacy
    ``eos_token_id == 2`` configs)."""

    vision_hidden: int = 768
    vision_intermediate: int = 3072
    vision_layers: int = 12
    vision_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    vision_act: str = "quick_gelu"
    text_hidden: int = 512
    text_intermediate: int = 2048
    text_layers: int = 12
    text_heads: int = 8
    vocab_size: int = 49408
    max_positions: int = 77
    text_act: str = "quick_gelu"
    projection_dim: int = 512
    eps: float = 1e-5
    text_pool: str = "eos"
    eos_token_id: int = 49407
    fused_qkv: bool = False

    def __post_init__(self):
        for name in ("vision_act", "text_act"):
            if getattr(self, name) not in ACTS:
                raise ConversionError(f"clip config: {name}={getattr(self, name)!r}; expected one of {ACTS}")
        if self.text_pool not in POOLS:
            raise ConversionError(f"clip config: text_pool={self.text_pool!r}; expected one of {POOLS}")
        for h, n, what in (
            (self.vision_hidden, self.vision_heads, "vision"),
            (self.text_hidden, self.text_heads, "text"),
        ):
            if h % n:
                raise ConversionError(f"clip config: {what} width {h} is not divisible by {n} heads")
        if self.image_size % self.patch_size:
            raise ConversionError(
                f"clip config: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _act(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)


class Attention(nnx.Module):
    """Multi-head self attention (``CLIPAttention`` / ``nn.MultiheadAttention``), optional causal mask."""

    def __init__(self, dim: int, heads: int, fused: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.heads, self.fused, self.dtype = heads, fused, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if fused:
            self.in_proj = Dense(dim, 3 * dim, sharding_names=("embed", "heads"), **kw)
        else:
            self.q_proj = Dense(dim, dim, sharding_names=("embed", "heads"), **kw)
            self.k_proj = Dense(dim, dim, sharding_names=("embed", "heads"), **kw)
            self.v_proj = Dense(dim, dim, sharding_names=("embed", "heads"), **kw)
        self.out_proj = Dense(dim, dim, sharding_names=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        b, n, d = x.shape
        if self.fused:
            q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        hd = d // self.heads
        q, k, v = (t.reshape(b, n, self.heads, hd) for t in (q, k, v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * np.float32(hd**-0.5)
        if causal:
            mask = jnp.tril(jnp.ones((n, n), bool))
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)
        return self.out_proj(out)


class MLP(nnx.Module):
    """``fc1 -> act -> fc2`` (open_clip: ``c_fc`` / ``c_proj``)."""

    def __init__(self, dim: int, hidden: int, act: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = act
        self.fc1 = Dense(dim, hidden, sharding_names=("embed", "mlp"), **kw)
        self.fc2 = Dense(hidden, dim, sharding_names=("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.fc2(_act(self.act, self.fc1(x)))


class EncoderLayer(nnx.Module):
    """Pre-LN residual block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        heads: int,
        act: str,
        eps: float,
        fused: bool,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        ln = dict(eps=eps, elementwise_affine=True, dtype=dtype, param_dtype=param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(dim, **ln)
        self.self_attn = Attention(dim, heads, fused, **kw)
        self.layer_norm2 = LayerNorm(dim, **ln)
        self.mlp = MLP(dim, hidden, act, **kw)

    def __call__(self, x, causal: bool):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    def __init__(self, n: int, *args, **kwargs):
        self.layers = nnx.List([EncoderLayer(*args, **kwargs) for _ in range(n)])

    def __call__(self, x, causal: bool):
        for layer in self.layers:
            x = layer(x, causal)
        return x


class Embedding(nnx.Module):
    """A lookup table ``embedding (num, dim)``."""

    def __init__(self, num: int, dim: int, names: tuple, *, param_dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            jax.random.normal(rngs.params(), (num, dim), param_dtype) * 0.02, sharding_names=names
        )


class PatchKernel(nnx.Module):
    """The patch convolution's ``kernel (p, p, 3, D)`` (HWIO, no bias)."""

    def __init__(self, p: int, d: int, *, param_dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(
            jax.random.normal(rngs.params(), (p, p, 3, d), param_dtype) * 0.02,
            sharding_names=(None, None, "conv_in", "embed"),
        )


class VisionEmbeddings(nnx.Module):
    """Patchify (a stride-``p`` convolution without bias, kernel HWIO), class token, positions."""

    def __init__(self, c: CLIPConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, p = c.vision_hidden, c.patch_size
        self.patch_size, self.dtype = p, dtype
        self.patch_embedding = PatchKernel(p, d, param_dtype=param_dtype, rngs=rngs)
        self.class_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (d,), param_dtype) * 0.02, sharding_names=("embed",)
        )
        self.position_embedding = Embedding(
            c.num_patches + 1, d, (None, "embed"), param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, pixels_nhwc: jax.Array) -> jax.Array:
        b, h, w, ch = pixels_nhwc.shape
        p = self.patch_size
        dtype = self.dtype or pixels_nhwc.dtype
        x = pixels_nhwc.astype(dtype).reshape(b, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * ch)
        kernel = self.patch_embedding.kernel[...].astype(dtype).reshape(p * p * ch, -1)
        x = jnp.dot(x, kernel)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.embedding[...].astype(dtype)[None]


class VisionTransformer(nnx.Module):
    def __init__(self, c: CLIPConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        ln = dict(eps=c.eps, elementwise_affine=True, **kw)
        self.embeddings = VisionEmbeddings(c, rngs=rngs, **kw)
        self.pre_layrnorm = LayerNorm(c.vision_hidden, **ln)  # (sic: transformers' name)
        self.encoder = Encoder(
            c.vision_layers,
            c.vision_hidden,
            c.vision_intermediate,
            c.vision_heads,
            c.vision_act,
            c.eps,
            c.fused_qkv,
            rngs=rngs,
            **kw,
        )
        self.post_layernorm = LayerNorm(c.vision_hidden, **ln)

    def __call__(self, pixels_nhwc):
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels_nhwc)), causal=False)
        return self.post_layernorm(x[:, 0])


class TextEmbeddings(nnx.Module):
    def __init__(self, c: CLIPConfig, *, param_dtype, rngs: nnx.Rngs):
        self.token_embedding = Embedding(
            c.vocab_size, c.text_hidden, ("vocab", "embed"), param_dtype=param_dtype, rngs=rngs
        )
        self.position_embedding = Embedding(
            c.max_positions, c.text_hidden, (None, "embed"), param_dtype=param_dtype, rngs=rngs
        )


class TextTransformer(nnx.Module):
    def __init__(self, c: CLIPConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.pool, self.eos, self.dtype = c.text_pool, c.eos_token_id, dtype
        self.embeddings = TextEmbeddings(c, param_dtype=param_dtype, rngs=rngs)
        self.encoder = Encoder(
            c.text_layers,
            c.text_hidden,
            c.text_intermediate,
            c.text_heads,
            c.text_act,
            c.eps,
            c.fused_qkv,
            rngs=rngs,
            **kw,
        )
        self.final_layer_norm = LayerNorm(c.text_hidden, eps=c.eps, elementwise_affine=True, **kw)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        n = input_ids.shape[1]
        dtype = self.dtype or self.embeddings.token_embedding.embedding.get_value().dtype
        x = jnp.take(self.embeddings.token_embedding.embedding[...], input_ids, axis=0).astype(dtype)
        x = x + self.embeddings.position_embedding.embedding[...][:n].astype(dtype)[None]
        x = self.final_layer_norm(self.encoder(x, causal=True))
        if self.pool == "argmax":
            idx = jnp.argmax(input_ids, axis=-1)
        else:
            idx = jnp.argmax((input_ids == self.eos).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]


class CLIPModel(nnx.Module):
    """Both towers, their projections (no bias) and ``logit_scale`` (log of the temperature's inverse)."""

    def __init__(self, config: CLIPConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.vision_model = VisionTransformer(c, rngs=rngs, **kw)
        self.text_model = TextTransformer(c, rngs=rngs, **kw)
        self.visual_projection = Dense(
            c.vision_hidden, c.projection_dim, use_bias=False, sharding_names=("embed", None), rngs=rngs, **kw
        )
        self.text_projection = Dense(
            c.text_hidden, c.projection_dim, use_bias=False, sharding_names=("embed", None), rngs=rngs, **kw
        )
        self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), param_dtype), sharding_names=())

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Projected image embeddings (B, projection_dim) float32 of normalised pixels ``(B, 3, H, W)``
        (the transformers layout; ``jnp.transpose`` to NHWC happens here)."""
        x = jnp.transpose(pixel_values, (0, 2, 3, 1))
        return self.visual_projection(self.vision_model(x)).astype(jnp.float32)

    def text_features(self, input_ids: jax.Array) -> jax.Array:
        """Projected text embeddings (B, projection_dim) float32 of token ids ``(B, L)`` (L <= max
        positions; padding after the end-of-text token does not change the result: the mask is causal)."""
        return self.text_projection(self.text_model(input_ids)).astype(jnp.float32)


def normalize(x: jax.Array) -> jax.Array:
    """L2-normalise the last axis in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def abstract_clip(config: CLIPConfig, *, dtype=None, param_dtype=jnp.float32) -> CLIPModel:
    """The model with ``ShapeDtypeStruct`` parameters (no weights materialised)."""
    return nnx.eval_shape(lambda: CLIPModel(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def model_from_flax_params(
    config: CLIPConfig, params: Mapping[str, Any], *, dtype=None, param_dtype=None, source: str = "params"
) -> CLIPModel:
    """Build the model from ``{flax.key: array}`` (keys the model has no parameter for are ignored:
    e.g. transformers' ``position_ids`` buffers), stored as ``param_dtype`` (None: float32); a missing or
    mis-shaped tensor raises ``ConversionError`` naming the key and ``source``."""
    graphdef, abstract = nnx.split(abstract_clip(config, dtype=dtype))
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        key = ".".join(str(p) for p in path)
        if key not in params:
            raise ConversionError(f"{source}: no tensor for CLIP parameter {key!r}")
        a = jnp.asarray(params[key])
        want = tuple(var.get_value().shape)
        if tuple(a.shape) != want:
            raise ConversionError(f"{source}: tensor {key!r} has shape {tuple(a.shape)}, expected {want}")
        a = a.astype(param_dtype) if param_dtype is not None else a.astype(jnp.float32)
        flat.append((path, var.replace(a)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_params(model: CLIPModel) -> dict[str, np.ndarray]:
    """The model's parameters as ``{flax.key: numpy array}`` (for ``awm_jax.convert.save_flax``)."""
    return {
        ".".join(str(p) for p in path): np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def load(path: str | os.PathLike, *, open_clip_arch: Any = None, dtype=None, param_dtype=None) -> CLIPModel:
    """A CLIP from a transformers ``CLIPModel`` folder or an awm-jax Flax folder (``open_clip_arch=None``),
    or from an open_clip checkpoint file (``open_clip_arch``: a name in ``convert.clip.OPEN_CLIP_ARCHS``,
    an open_clip model-config ``.json`` or dict). Tensors stream from the file one at a time
    (``awm_jax.convert``)."""
    if open_clip_arch is None:
        if os.path.isfile(path):
            raise ConversionError(
                f"{path}: a file; a transformers CLIPModel folder was expected (for an open_clip "
                "checkpoint give its architecture, e.g. open_clip_arch='ViT-H-14')"
            )
        hf_config, _, tensors = read_flax_params(path, clip_convert.NAME)
        fields = clip_convert.model_fields(hf_config)
    else:
        fields, _, tensors = clip_convert.read_open_clip(path, open_clip_arch)
    # each tensor goes to the device as it is read: the host holds one checkpoint tensor at a time
    params = {k: jnp.asarray(v) for k, v in tensors}
    return model_from_flax_params(CLIPConfig(**fields), params, dtype=dtype, param_dtype=param_dtype,
                                  source=str(path))
