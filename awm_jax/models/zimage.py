"""Flax NNX ``ZImageTransformer2DModel`` (Z-Image / Z-Image-Turbo), numerically equal to diffusers' model.

The network (diffusers 0.42 ``transformers/transformer_z_image.py``, basic text-to-image mode):

- the image ``x (B, C, F, H, W)`` is patchified (``patch_size`` 2, ``f_patch_size`` 1; tokens ordered
  (f, h, w), features (pf, ph, pw, c)), embedded by ``x_embedder`` and padded to a multiple of 32 tokens
  with the learned ``x_pad_token``; the caption features ``cap_feats`` (the text encoder's second-to-last
  hidden states of the prompt's real tokens) go through ``cap_embedder`` (RMSNorm + Linear) and are padded
  to a multiple of 32 with ``cap_pad_token``;
- 3-axis RoPE (``theta = rope_theta``, axes ``axes_dims``, tables of ``axes_lens`` positions): caption token
  ``l`` at ``(1 + l, 0, 0)``, image token ``(f, h, w)`` at ``(Lc + 1 + f, h, w)`` with ``Lc`` the padded
  caption length *of that sample*, image pad tokens at ``(0, 0, 0)``;
- ``noise_refiner`` blocks (with adaLN from the time embedding) over the image stream,
  ``context_refiner`` blocks (no modulation) over the caption stream, then ``layers`` over the unified
  ``[image, caption]`` sequence, and the final layer (LayerNorm scaled by ``1 + linear(silu(t_emb))``,
  Linear) read out on the image tokens, unpatchified.

A block: ``x += tanh(g_msa) * norm2(attn(norm1(x) * (1 + s_msa)))``, ``x += tanh(g_mlp) * ffn_norm2(
ffn(ffn_norm1(x) * (1 + s_mlp)))`` with RMSNorms, SwiGLU ``w2(silu(w1 x) * w3 x)``, attention without biases
and RMSNorm q/k norms (eps 1e-5); ``(s_msa, g_msa, s_mlp, g_mlp) = adaLN_modulation.0(t_emb)`` (no SiLU).

**Batches with captions of different lengths.** diffusers takes lists of variable-length tensors and pads
the batch, masking padded keys. Here captions come padded to a static length ``T`` with a prefix mask
``cap_mask (B, T)``; the layout is static (image tokens first, then ``ceil32(T)`` caption slots): slots
``l < L_i`` hold the caption, ``L_i <= l < Lc_i = ceil32(L_i)`` the pad token (attended to, as in
diffusers), slots ``l >= Lc_i`` are masked keys. Rotary tables are per sample (``Lc_i`` moves the image
positions). Valid tokens see exactly the keys they see in diffusers, so outputs match.

Submodules are named exactly like diffusers' (``layers.3.attention.to_q``, ``cap_embedder.1``,
``noise_refiner.0.feed_forward.w1``, ``all_x_embedder.2-1``), so the key map is an identity on prefixes.
SigLIP / omni mode and several patch sizes are not supported (named errors). With ``scan_layers=True``
each of the three stacks becomes one stacked group (``<stack>_groups[0]``, leading axis ``layers``) run
with ``nnx.scan``.

:class:`ZImageFamily` (registered as ``"zimage"``) maps the project's units onto the model: ``t`` in [0, 1]
with t = 1 noise is the model's ``timestep = 1 - t`` and the velocity ``eps - x0`` is minus the model output
(``ZImagePipeline``: ``timestep = (1000 - t) / 1000``, ``noise_pred = -model_out``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awm_jax.models.blocks import (
    Attention,
    Modulation,
    block_caller,
    linear,
    make_stack,
    model_context,
    scan_stack,
)
from awm_jax.models.family import ModelFamily, config_from_diffusers, config_to_diffusers, register_family
from awm_jax.models.layers import LayerNorm, RMSNorm, timestep_embedding
from awm_jax.models.lora import LoRAConfig
from awm_jax.models.stacking import Stack

__all__ = ["ZIMAGE_LORA_TARGETS", "ZImageConfig", "ZImageFamily", "ZImageTransformer2DModel", "patchify",
           "rope_tables", "stacks", "unpatchify"]

NAME = "ZImageTransformer2DModel"
ADALN_EMBED_DIM = 256  # diffusers' ADALN_EMBED_DIM
T_EMBED_MID = 1024  # TimestepEmbedder(mid_size=1024)
SEQ_MULTI_OF = 32  # diffusers' SEQ_MULTI_OF: both streams are padded to multiples of 32 tokens
QK_EPS = 1e-5  # the blocks' Attention(eps=1e-5) q/k RMSNorms
FINAL_EPS = 1e-6
MODULATION = ("scale_msa", "gate_msa", "scale_mlp", "gate_mlp")
BLOCK_LINEARS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")
STACKS = (("noise_refiner", True), ("context_refiner", False), ("layers", True))

# Default LoRA targets: the attention projections and the SwiGLU feed-forward of every block (all three
# stacks), the module set of diffusers' Z-Image LoRA training examples and of Flow-Factory's Z-Image
# configs (attention q/k/v/out + feed_forward w1/w2/w3); embedders, adaLN and the read-out stay frozen.
ZIMAGE_LORA_TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                       "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


@dataclasses.dataclass(frozen=True)
class ZImageConfig:
    """diffusers ``ZImageTransformer2DModel`` config (same field names and defaults)."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)

    def __post_init__(self):
        for k in ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"):
            object.__setattr__(self, k, tuple(int(a) for a in getattr(self, k)))
        if len(self.all_patch_size) != 1 or len(self.all_f_patch_size) != 1:
            raise ValueError(f"ZImageConfig: several patch sizes (all_patch_size={self.all_patch_size}, "
                             f"all_f_patch_size={self.all_f_patch_size}) are not supported; give one each")
        if self.siglip_feat_dim is not None:
            raise ValueError(f"ZImageConfig.siglip_feat_dim={self.siglip_feat_dim}: the SigLIP / omni "
                             "variant is not supported (text-to-image only)")
        for k in ("in_channels", "dim", "n_heads", "cap_feat_dim"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"ZImageConfig.{k}={getattr(self, k)!r} must be a positive integer")
        for k in ("n_layers", "n_refiner_layers"):
            if int(getattr(self, k)) < 0:
                raise ValueError(f"ZImageConfig.{k}={getattr(self, k)!r} must be >= 0")
        if self.dim % self.n_heads:
            raise ValueError(f"ZImageConfig: dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if (len(self.axes_dims) != len(self.axes_lens) or any(a <= 0 or a % 2 for a in self.axes_dims)
                or sum(self.axes_dims) != self.head_dim):
            raise ValueError(f"ZImageConfig.axes_dims={self.axes_dims} must be positive even sizes summing "
                             f"to dim / n_heads = {self.head_dim}, one per axes_lens={self.axes_lens}")

    @property
    def head_dim(self) -> int:
        return int(self.dim) // int(self.n_heads)

    @property
    def patch(self) -> tuple[int, int]:
        """``(patch_size, f_patch_size)``."""
        return self.all_patch_size[0], self.all_f_patch_size[0]

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden width ``int(dim / 3 * 8)``."""
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(int(self.dim), ADALN_EMBED_DIM)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ZImageConfig:
        """Build from a diffusers ``config.json`` dict; ``_``-prefixed keys ignored, unknown keys raise."""
        return config_from_diffusers(cls, d, source, NAME)

    def to_dict(self) -> dict[str, Any]:
        return config_to_diffusers(self)


def stacks(config: ZImageConfig) -> tuple[Stack, ...]:
    """The three block stacks (noise refiner, context refiner, main layers), each one run."""
    n = {"noise_refiner": config.n_refiner_layers, "context_refiner": config.n_refiner_layers,
         "layers": config.n_layers}
    return tuple(Stack(name, f"{name}_groups", ((0, int(n[name])),) if n[name] else ()) for name, _ in STACKS)


# ---------------------------------------------------------------------------------------------------- rotary


@functools.lru_cache(maxsize=8)
def _axis_tables(axes_dims: tuple, axes_lens: tuple, theta: float) -> tuple:
    """diffusers ``RopeEmbedder.precompute_freqs_cis``: per axis ``(cos, sin)`` of ``(len, dim/2)`` float32
    (angles formed in float64, rounded to float32, then cos/sin of that float32 angle)."""
    out = []
    for d, n in zip(axes_dims, axes_lens):
        freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        ang = np.outer(np.arange(n, dtype=np.float64), freqs).astype(np.float32).astype(np.float64)
        out.append((np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)))
    return tuple(out)


def rope_tables(ids, cfg: ZImageConfig):
    """``ids (..., 3)`` integer positions -> ``(cos, sin)`` each ``(..., head_dim)`` float32, every frequency
    repeated for its (real, imaginary) feature pair, axes concatenated (diffusers' ``freqs_cis`` layout)."""
    cos, sin = [], []
    for i, (c, s) in enumerate(_axis_tables(cfg.axes_dims, cfg.axes_lens, float(cfg.rope_theta))):
        idx = ids[..., i]
        cos.append(jnp.repeat(jnp.take(jnp.asarray(c), idx, axis=0), 2, axis=-1))
        sin.append(jnp.repeat(jnp.take(jnp.asarray(s), idx, axis=0), 2, axis=-1))
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


# ---------------------------------------------------------------------------------------------------- blocks


class SwiGLU(nnx.Module):
    """diffusers Z-Image ``FeedForward``: ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, d: int, hidden: int, path: str, ctx: dict):
        self.w1 = linear(d, hidden, ("embed", "mlp"), f"{path}.w1", ctx, use_bias=False)
        self.w2 = linear(hidden, d, ("mlp", "embed"), f"{path}.w2", ctx, use_bias=False)
        self.w3 = linear(d, hidden, ("embed", "mlp"), f"{path}.w3", ctx, use_bias=False)

    def __call__(self, x):
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class ZImageTransformerBlock(nnx.Module):
    """diffusers ``ZImageTransformerBlock`` (``modulation=True``: adaLN from the time embedding)."""

    def __init__(self, config: ZImageConfig, path: str, ctx: dict, modulation: bool = True):
        d, dt, pdt = config.dim, ctx["dtype"], ctx["param_dtype"]
        self.attention = Attention(d, config.n_heads, config.head_dim, f"{path}.attention", ctx,
                                   qk_norm_kind="rms_norm" if config.qk_norm else None, use_bias=False,
                                   out_bias=False, qk_eps=QK_EPS)
        self.feed_forward = SwiGLU(d, config.ffn_dim, f"{path}.feed_forward", ctx)
        for name in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            setattr(self, name, RMSNorm(d, eps=config.norm_eps, dtype=dt, param_dtype=pdt))
        self.adaLN_modulation = (nnx.List([linear(config.adaln_dim, 4 * d, (None, "mlp"),
                                                  f"{path}.adaLN_modulation.0", ctx)])
                                 if modulation else None)

    def __call__(self, x, mask, rotary, adaln):
        if self.adaLN_modulation is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rotary=rotary, mask=mask)[0])
            return (x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x))),)
        m = Modulation(zip(MODULATION, jnp.split(self.adaLN_modulation[0](adaln)[:, None], 4, axis=-1)))
        attn = self.attention(self.attention_norm1(x) * (1 + m.scale_msa), rotary=rotary, mask=mask)[0]
        x = x + jnp.tanh(m.gate_msa) * self.attention_norm2(attn)
        ff = self.feed_forward(self.ffn_norm1(x) * (1 + m.scale_mlp))
        return (x + jnp.tanh(m.gate_mlp) * self.ffn_norm2(ff),)


class FinalLayer(nnx.Module):
    """diffusers Z-Image ``FinalLayer``: ``linear(norm_final(x) * (1 + adaLN_modulation(c)))``."""

    def __init__(self, d: int, out: int, adaln_dim: int, path: str, ctx: dict):
        self.norm_final = LayerNorm(d, eps=FINAL_EPS, dtype=ctx["dtype"])
        self.linear = linear(d, out, ("embed", None), f"{path}.linear", ctx)
        self.adaLN_modulation = nnx.List([None, linear(adaln_dim, d, (None, "embed"),
                                                       f"{path}.adaLN_modulation.1", ctx)])

    def __call__(self, x, c):
        scale = 1 + self.adaLN_modulation[1](jax.nn.silu(c))
        return self.linear(self.norm_final(x) * scale[:, None])


class TimestepEmbedder(nnx.Module):
    """diffusers Z-Image ``TimestepEmbedder``: ``mlp = [Linear(256, 1024), SiLU, Linear(1024, out)]`` on the
    ``[cos, sin]`` sinusoid of ``t * t_scale``."""

    def __init__(self, out: int, path: str, ctx: dict):
        self.mlp = nnx.List([linear(256, T_EMBED_MID, (None, "mlp"), f"{path}.mlp.0", ctx), None,
                             linear(T_EMBED_MID, out, ("mlp", None), f"{path}.mlp.2", ctx)])

    def __call__(self, t, dtype):
        emb = timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0).astype(dtype)
        return self.mlp[2](jax.nn.silu(self.mlp[0](emb)))


# ---------------------------------------------------------------------------------------------------- model


def _ceil(n, m: int = SEQ_MULTI_OF):
    return (n + m - 1) // m * m


def patchify(x, patch_size: int, f_patch_size: int):
    """``(B, C, F, H, W) -> (B, F/pf * H/p * W/p, pf * p * p * C)`` (diffusers ``_patchify_image``)."""
    b, c, f, h, w = x.shape
    p, pf = patch_size, f_patch_size
    x = x.reshape(b, c, f // pf, pf, h // p, p, w // p, p).transpose(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (f // pf) * (h // p) * (w // p), pf * p * p * c)


def unpatchify(x, size: tuple[int, int, int], channels: int, patch_size: int, f_patch_size: int):
    """Inverse of :func:`patchify` on the first ``F/pf * H/p * W/p`` tokens of ``x``."""
    f, h, w = size
    p, pf = patch_size, f_patch_size
    n = (f // pf) * (h // p) * (w // p)
    x = x[:, :n].reshape(x.shape[0], f // pf, h // p, w // p, pf, p, p, channels)
    return x.transpose(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], channels, f, h, w)


class ZImageTransformer2DModel(nnx.Module):
    """Flax NNX port of diffusers' ``ZImageTransformer2DModel`` (see the module docstring)."""

    def __init__(self, config: ZImageConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 scan_layers: bool = False, remat_policy: str = "none", lora: LoRAConfig | None = None):
        config = ZImageConfig.from_dict(config) if isinstance(config, dict) else config
        ctx = model_context(self, config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                            scan_layers=scan_layers, remat_policy=remat_policy, lora=lora)
        d, (p, pf) = config.dim, config.patch
        key = f"{p}-{pf}"
        self.all_x_embedder = nnx.Dict({key: linear(pf * p * p * config.in_channels, d, (None, "embed"),
                                                    f"all_x_embedder.{key}", ctx)})
        self.all_final_layer = nnx.Dict({key: FinalLayer(d, p * p * pf * config.in_channels, config.adaln_dim,
                                                         f"all_final_layer.{key}", ctx)})
        self.t_embedder = TimestepEmbedder(config.adaln_dim, "t_embedder", ctx)
        # Sequential(RMSNorm(cap_feat_dim), Linear(cap_feat_dim, dim))
        self.cap_embedder = nnx.List([RMSNorm(config.cap_feat_dim, eps=config.norm_eps, dtype=dtype,
                                              param_dtype=param_dtype),
                                      linear(config.cap_feat_dim, d, (None, "embed"), "cap_embedder.1", ctx)])
        self.x_pad_token = nnx.Param(jnp.zeros((1, d), param_dtype), sharding_names=(None, "embed"))
        self.cap_pad_token = nnx.Param(jnp.zeros((1, d), param_dtype), sharding_names=(None, "embed"))
        for st in stacks(config):
            modulation = dict(STACKS)[st.per_layer]
            n = sum(c for _, c in st.groups)
            if not scan_layers:
                blocks = [ZImageTransformerBlock(config, f"{st.per_layer}.{i}", ctx, modulation)
                          for i in range(n)]
                setattr(self, st.per_layer, nnx.List(blocks))
                setattr(self, st.grouped, None)
            else:
                _check_scan_lora(lora, st.per_layer, n)
                setattr(self, st.per_layer, None)

                def factory(c, name=st.per_layer, mod=modulation):
                    return ZImageTransformerBlock(config, f"{name}.0", c, mod)

                setattr(self, st.grouped, nnx.List([make_stack(factory, n, ctx)] if n else []))

    def _stack(self, name: str, x, mask, rotary, adaln):
        if not self.scan_layers:
            call = block_caller(self.remat_policy)
            for block in getattr(self, name):
                (x,) = call(block, x, mask, rotary, adaln)
            return x
        for group in getattr(self, f"{name}_groups"):
            (x,) = scan_stack(group, (x,), mask, rotary, adaln, policy=self.remat_policy)
        return x

    def __call__(self, x, t=None, cap_feats=None, cap_mask=None, patch_size: int = 2,
                 f_patch_size: int = 1) -> jax.Array:
        """``x (B, C, F, H, W)`` (or a list of ``(C, F, H, W)``), ``t (B,)`` in [0, 1] (scaled by
        ``t_scale`` here, like diffusers; t = 1 is the clean image), ``cap_feats`` a list of ``(L_i,
        cap_feat_dim)`` caption features (diffusers' form) or a padded ``(B, T, cap_feat_dim)`` array with
        the prefix mask ``cap_mask (B, T)`` (None: all valid) -> ``(B, C, F, H, W)`` in the compute dtype."""
        cfg, dtype = self.config, self.dtype
        if (patch_size, f_patch_size) != cfg.patch:
            raise ValueError(f"{NAME}: patch_size={patch_size}, f_patch_size={f_patch_size} but the model "
                             f"has only {cfg.patch}")
        x, t, cap, valid = _check_inputs(cfg, x, t, cap_feats, cap_mask)
        b, c, f, h, w = x.shape
        p, pf = cfg.patch
        grid = (f // pf, h // p, w // p)
        n = grid[0] * grid[1] * grid[2]
        n_pad, t_pad = _ceil(n), _ceil(cap.shape[1])
        _check_positions(cfg, grid, t_pad)
        adaln = self.t_embedder(t * cfg.t_scale, dtype)

        key = f"{p}-{pf}"
        xe = self.all_x_embedder[key](patchify(x.astype(dtype), p, pf))
        xe = jnp.concatenate([xe, jnp.broadcast_to(self.x_pad_token[...].astype(xe.dtype),
                                                   (b, n_pad - n, cfg.dim))], axis=1)
        lengths = jnp.sum(valid, axis=1)  # real caption tokens L_i
        cap_len = _ceil(lengths)  # padded caption length Lc_i (its tokens are attended to)
        slots = jnp.arange(t_pad)
        ce = self.cap_embedder[1](self.cap_embedder[0](cap.astype(dtype)))
        ce = jnp.pad(ce, ((0, 0), (0, t_pad - ce.shape[1]), (0, 0)))
        ce = jnp.where((slots[None, :] < lengths[:, None])[..., None], ce,
                       self.cap_pad_token[...].astype(ce.dtype)[None])
        cap_keys = slots[None, :] < cap_len[:, None]  # (B, t_pad)

        cap_ids = jnp.stack([slots + 1, jnp.zeros_like(slots), jnp.zeros_like(slots)], axis=-1)
        fi, hi, wi = np.meshgrid(*(np.arange(g) for g in grid), indexing="ij")
        img = np.stack([fi, hi, wi], axis=-1).reshape(n, 3)
        img = np.concatenate([img, np.full((n_pad - n, 3), -1)], axis=0)  # -1: pad (ids (0, 0, 0))
        img_ids = jnp.where(img[None] < 0, 0, jnp.asarray(img)[None] + jnp.stack(
            [cap_len + 1, jnp.zeros_like(cap_len), jnp.zeros_like(cap_len)], axis=-1)[:, None])
        x_rot, cap_rot = rope_tables(img_ids, cfg), rope_tables(cap_ids, cfg)

        xe = self._stack("noise_refiner", xe, None, x_rot, adaln)
        ce = self._stack("context_refiner", ce, cap_keys, cap_rot, None)
        u = jnp.concatenate([xe, ce], axis=1)
        mask = jnp.concatenate([jnp.ones((b, n_pad), bool), cap_keys], axis=1)
        rot = tuple(jnp.concatenate([a, jnp.broadcast_to(c[None], (b, *c.shape))], axis=1)
                    for a, c in zip(x_rot, cap_rot))
        u = self._stack("layers", u, mask, rot, adaln)
        out = self.all_final_layer[key](u, adaln)
        return unpatchify(out, (f, h, w), cfg.in_channels, p, pf)


def _check_scan_lora(lora: LoRAConfig | None, per_layer: str, count: int) -> None:
    """A stacked group shares one LoRA layout: the targets must adapt a module in all its layers or none."""
    if lora is None:
        return
    for m in BLOCK_LINEARS:
        hits = [i for i in range(count) if lora.matches(f"{per_layer}.{i}.{m}")]
        if hits and len(hits) != count:
            raise ValueError(f"LoRA targets adapt {per_layer}.{{{','.join(map(str, hits))}}}.{m} but not all "
                             f"{count} layers of that stack; unsupported with scan_layers=True "
                             f"(targets: {lora.target_modules})")


def _check_positions(cfg: ZImageConfig, grid, t_pad: int) -> None:
    """RoPE positions must lie inside the tables (diffusers would index out of range)."""
    need = (t_pad + 1 + grid[0], grid[1], grid[2])
    for axis, (k, n) in enumerate(zip(need, cfg.axes_lens)):
        if k > n:
            raise ValueError(f"{NAME}: positions up to {k - 1} on RoPE axis {axis} (caption of {t_pad} "
                             f"padded tokens, latent grid {grid}) exceed axes_lens={cfg.axes_lens}")


def _check_inputs(cfg: ZImageConfig, x, t, cap_feats, cap_mask):
    if t is None or cap_feats is None:
        raise ValueError(f"{NAME}: t and cap_feats are required")
    if isinstance(x, (list, tuple)):
        x = jnp.stack([jnp.asarray(xi) for xi in x])
    x = jnp.asarray(x)
    p, pf = cfg.patch
    if x.ndim != 5 or x.shape[1] != cfg.in_channels or x.shape[2] % pf or x.shape[3] % p or x.shape[4] % p:
        raise ValueError(f"{NAME}: x shape {x.shape} must be (B, {cfg.in_channels}, F, H, W) with F a "
                         f"multiple of {pf} and H, W multiples of {p}")
    b = x.shape[0]
    if isinstance(cap_feats, (list, tuple)):
        if cap_mask is not None:
            raise ValueError(f"{NAME}: cap_mask goes with padded (B, T, D) cap_feats, not with a list")
        if len(cap_feats) != b:
            raise ValueError(f"{NAME}: {len(cap_feats)} captions for a batch of {b}")
        lens = [int(np.shape(ci)[0]) for ci in cap_feats]
        tmax = max(lens)
        cap = jnp.stack([jnp.pad(jnp.asarray(ci), ((0, tmax - n), (0, 0))) for ci, n in zip(cap_feats, lens)])
        cap_mask = np.arange(tmax)[None] < np.asarray(lens)[:, None]
    else:
        cap = jnp.asarray(cap_feats)
    if cap.ndim != 3 or cap.shape[0] != b or cap.shape[2] != cfg.cap_feat_dim:
        raise ValueError(f"{NAME}: cap_feats shape {cap.shape} must be ({b}, T, {cfg.cap_feat_dim})")
    valid = (jnp.ones(cap.shape[:2], bool) if cap_mask is None else jnp.asarray(cap_mask).astype(bool))
    if valid.shape != cap.shape[:2]:
        raise ValueError(f"{NAME}: cap_mask shape {valid.shape} must be {cap.shape[:2]}")
    t = jnp.asarray(t, jnp.float32)
    t = jnp.broadcast_to(t, (b,)) if t.ndim == 0 else t
    if t.shape != (b,):
        raise ValueError(f"{NAME}: t shape {t.shape} must be ({b},) or a scalar")
    return x, t, cap, valid


# ---------------------------------------------------------------------------------------------------- family


class ZImageFamily(ModelFamily):
    """Z-Image (``model.kind = "zimage"``): diffusers ``ZImagePipeline`` folders.

    The samplers see latents ``(B, in_channels, H/8, W/8)``; :meth:`velocity` adds the frame axis, calls the
    model with ``t_model = 1 - t`` and returns ``-output`` (``ZImagePipeline``'s conventions). Context =
    (Qwen3 second-to-last hidden states of the chat-templated prompt, zero beyond each prompt's tokens,
    ``(B, T, cap_feat_dim)``; their mask ``(B, T)`` float32 in the "pooled" slot). Grid: ZImagePipeline's
    sigmas ``linspace(1, 1/N, N)`` shifted statically (``shift > 0``) or by resolution (``shift <= 0``).
    """

    name = "zimage"
    model_class = ZImageTransformer2DModel
    converter = "zimage"
    class_names = (NAME,)
    lora_targets = ZIMAGE_LORA_TARGETS
    architectures = {"z-image-turbo": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16,
                                           dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
                                           n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                                           rope_theta=256.0, t_scale=1000.0, axes_dims=(32, 48, 48),
                                           axes_lens=(1536, 512, 512))}
    vae_scale_factor = 8
    pipeline_loader = "awm_jax.pipelines.zimage:load_zimage_pipeline"
    sample_loader = "awm_jax.pipelines.zimage:sample_pipeline"
    default_config = "zimage_geneval.py"

    def sample_flag_problems(self, args):
        return ["--no-t5 is an SD3 option: Z-Image has one text encoder (Qwen3)"] if args.no_t5 else []

    def run_sample_options(self, config, args):
        """The run's ``eval.guidance_scale`` s is the trainer's standard CFG scale, ZImagePipeline's 1 + g."""
        opts = super().run_sample_options(config, args)
        if args.guidance_scale is None:
            opts["guidance_scale"] -= 1.0
        return opts

    def config_from_dict(self, d, source="config"):
        return ZImageConfig.from_dict(dict(d), source=source)

    def stacks(self, cfg):
        return stacks(cfg)

    def velocity(self, model, x, t, context):
        """``v(x, t)`` float32 on latents ``x (B, C, h, w)``, ``t (B,)`` in [0, 1];
        ``context = (cap_feats (B, T, D), cap_mask (B, T))``."""
        emb, mask = context
        x = jnp.asarray(x)
        cfg = model.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"Z-Image velocity: latents shape {x.shape} must be "
                             f"(B, {cfg.in_channels}, h, w)")
        t = jnp.asarray(t, jnp.float32)
        t_model = (1000.0 - t * 1000.0) / 1000.0  # ZImagePipeline's (1000 - timestep) / 1000, in float32
        out = model(x[:, :, None], t=t_model, cap_feats=emb,
                    cap_mask=jnp.asarray(mask) > 0.5, patch_size=cfg.patch[0], f_patch_size=cfg.patch[1])
        return -out[:, :, 0].astype(jnp.float32)

    def context_shape(self, config, cfg):
        """``(T, cap_feat_dim, T)``: the caption mask rides in the pooled slot."""
        t = self.text_tokens(config)
        return t, int(cfg.cap_feat_dim), t

    def latent_shape(self, cfg, height, width):
        height, width = int(height), int(width)
        m = self.vae_scale_factor * cfg.patch[0]
        if height % m or width % m:
            raise ValueError(f"Z-Image: image size {height}x{width} must be a multiple of {m} "
                             f"(VAE factor {self.vae_scale_factor} x patch {cfg.patch[0]})")
        f = self.vae_scale_factor
        return (int(cfg.in_channels), height // f, width // f)

    def time_grid(self, num_steps, shift, latent_shape):
        """ZImagePipeline's sigmas ``linspace(1, 1/N, N)`` + 0: ``shift <= 0`` shifts them by resolution
        (``use_dynamic_shifting``, ``mu`` of ``(h/2)(w/2)`` image tokens), ``shift > 0`` statically (the
        Z-Image-Turbo scheduler: ``shift = 3``)."""
        from awm_jax.sampling.schedules import flux_grid, flux_image_seq_len, shift_times

        n = int(num_steps)
        if float(shift) <= 0:
            return flux_grid(n, image_seq_len=flux_image_seq_len(latent_shape))
        if n < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return np.concatenate([shift_times(np.linspace(1.0, 1.0 / n, n), float(shift)), [0.0]])


register_family(ZImageFamily())
