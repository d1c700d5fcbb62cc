"""Flax NNX ``SD3Transformer2DModel`` (MMDiT / MMDiT-X), numerically equal to diffusers' model.

Covers SD3 Medium and SD3.5 Medium/Large: patch embedding with the cropped ``pos_embed_max_size``
sincos table (or the resized table when ``pos_embed_max_size`` is None), timestep + pooled-text
embedding, caption projection, joint blocks (AdaLayerNormZero), SD3.5 dual-attention blocks
(``dual_attention_layers``), ``qk_norm`` (None / "rms_norm" / "layer_norm" / "fp32_layer_norm"), the
context-pre-only last block, the final AdaLayerNormContinuous and unpatchify.

Submodules are named exactly like diffusers' (``transformer_blocks[i].attn.to_q``, ``attn.to_out[0]``,
``ff.net[2]``, ``norm1.linear``, ``pos_embed.proj``, ``time_text_embed.timestep_embedder.linear_1``,
``context_embedder``, ``norm_out.linear``, ``proj_out``); parameters are ``kernel`` ``(in, out)`` /
``bias`` for linears, ``kernel`` HWIO for the patch conv and ``scale`` (/ ``bias``) for norms.
diffusers' ``pos_embed.pos_embed`` buffer is not a parameter here: it is recomputed from the config
(:func:`pos_embed_table`).

With ``scan_layers=True`` consecutive identical blocks are stacked (leading axis named ``layers``)
under ``transformer_block_groups[g]`` and run with ``nnx.scan``; :func:`unstack_state` /
:func:`stack_state` convert between that layout and the per-layer layout of the loop model.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awm_jax.models.layers import (
    Dense,
    LayerNorm,
    RMSNorm,
    attention,
    gelu_tanh,
    sincos_2d_table,
    timestep_embedding,
)
from awm_jax.models.lora import LoRAConfig, lora_for

REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable")
QK_NORMS = (None, "rms_norm", "layer_norm", "fp32_layer_norm")
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class SD3Config:
    """diffusers ``SD3Transformer2DModel`` config (same field names and defaults)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"SD3Config.qk_norm={self.qk_norm!r} unsupported; one of {QK_NORMS}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"SD3Config: caption_projection_dim={self.caption_projection_dim} must equal "
                f"num_attention_heads*attention_head_dim={self.inner_dim} (the joint attention width)")
        if self.num_layers < 1:
            raise ValueError(f"SD3Config.num_layers must be >= 1, got {self.num_layers}")
        if self.inner_dim % 2:
            raise ValueError(f"SD3Config: inner dim {self.inner_dim} must be even (sincos table)")

    @property
    def inner_dim(self) -> int:
        """Model width ``num_attention_heads * attention_head_dim``."""
        return int(self.num_attention_heads) * int(self.attention_head_dim)

    @property
    def out_ch(self) -> int:
        """Output channels (``out_channels`` or, if None, ``in_channels``)."""
        return int(self.in_channels if self.out_channels is None else self.out_channels)

    def block_kind(self, i: int) -> tuple[bool, bool]:
        """``(use_dual_attention, context_pre_only)`` of block ``i``."""
        return i in self.dual_attention_layers, i == self.num_layers - 1

    def block_groups(self) -> list[tuple[int, int, tuple[bool, bool]]]:
        """Runs of consecutive identical blocks: ``[(start, count, kind), ...]``."""
        groups: list[list] = []
        for i in range(self.num_layers):
            kind = self.block_kind(i)
            if groups and groups[-1][2] == kind:
                groups[-1][1] += 1
            else:
                groups.append([i, 1, kind])
        return [tuple(g) for g in groups]

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> SD3Config:
        """Build from a diffusers ``config.json`` dict; ``_``-prefixed keys ignored, unknown keys raise."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ValueError(f"{source}: unknown SD3Transformer2DModel config keys {unknown}")
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: invalid SD3Transformer2DModel config: {e}") from e

    @classmethod
    def from_json(cls, path: str | pathlib.Path) -> SD3Config:
        """Read a diffusers ``config.json`` (file, or a folder containing one)."""
        p = pathlib.Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"SD3 transformer config not found: {p}")
        return cls.from_dict(json.loads(p.read_text()), source=str(p))

    def to_dict(self) -> dict[str, Any]:
        """The diffusers-style config dict (lists for tuples)."""
        d = dataclasses.asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d


def pos_embed_table(config: SD3Config) -> np.ndarray:
    """diffusers' ``pos_embed.pos_embed`` buffer ``(1, N, inner_dim)`` float32 for this config."""
    base = config.sample_size // config.patch_size
    n = config.pos_embed_max_size or int(base)
    return sincos_2d_table(config.inner_dim, n, n, float(base))[None]


def _dense(cin, cout, names, path, ctx, use_bias=True):
    return Dense(cin, cout, use_bias=use_bias, dtype=ctx["dtype"], param_dtype=ctx["param_dtype"],
                 sharding_names=names, lora=lora_for(ctx["lora"], path), rngs=ctx["rngs"])


# ----------------------------------------------------------------------------------------------
# embeddings


class PatchEmbed(nnx.Module):
    """Patchify conv (``proj``, HWIO kernel) + sincos position embedding (cropped or resized)."""

    def __init__(self, config: SD3Config, ctx):
        p, d = config.patch_size, config.inner_dim
        self.config = config
        self.dtype = ctx["dtype"]
        self.proj = nnx.Conv(config.in_channels, d, (p, p), strides=(p, p), padding="VALID",
                             dtype=ctx["dtype"], param_dtype=ctx["param_dtype"], rngs=ctx["rngs"],
                             kernel_metadata={"sharding_names": (None, None, "conv_in", "embed")},
                             bias_metadata={"sharding_names": ("embed",)})

    def table(self, h: int, w: int) -> np.ndarray:
        """The ``(h*w, D)`` position embedding for an ``h x w`` patch grid (as diffusers computes it)."""
        c = self.config
        base = c.sample_size // c.patch_size
        if c.pos_embed_max_size is None:
            if (h, w) == (base, base):
                return sincos_2d_table(c.inner_dim, base, base, float(base))
            return sincos_2d_table(c.inner_dim, h, w, float(base))
        m = c.pos_embed_max_size
        if h > m or w > m:
            raise ValueError(f"SD3 PatchEmbed: patch grid {h}x{w} exceeds pos_embed_max_size={m}")
        top, left = (m - h) // 2, (m - w) // 2
        full = sincos_2d_table(c.inner_dim, m, m, float(base)).reshape(m, m, -1)
        return full[top:top + h, left:left + w].reshape(h * w, -1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, hh, ww = x.shape
        p = self.config.patch_size
        y = self.proj(jnp.transpose(x, (0, 2, 3, 1)))  # NCHW -> NHWC -> (B, h, w, D)
        h, w = hh // p, ww // p
        y = y.reshape(b, h * w, -1)
        pe = jnp.asarray(self.table(h, w))
        return (y.astype(jnp.float32) + pe[None]).astype(y.dtype)


class _MLP2(nnx.Module):
    """``linear_1 -> silu -> linear_2`` (diffusers TimestepEmbedding / PixArtAlphaTextProjection("silu"))."""

    def __init__(self, cin, d, path, ctx):
        self.linear_1 = _dense(cin, d, (None, "embed"), f"{path}.linear_1", ctx)
        self.linear_2 = _dense(d, d, ("embed", "mlp"), f"{path}.linear_2", ctx)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nnx.Module):
    """``timestep_embedder(sincos_256(t)) + text_embedder(pooled)``."""

    def __init__(self, config: SD3Config, ctx):
        d = config.inner_dim
        self.dtype = ctx["dtype"]
        self.timestep_embedder = _MLP2(256, d, "time_text_embed.timestep_embedder", ctx)
        self.text_embedder = _MLP2(config.pooled_projection_dim, d, "time_text_embed.text_embedder", ctx)

    def __call__(self, timestep, pooled):
        t = timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0)
        return self.timestep_embedder(t.astype(pooled.dtype)) + self.text_embedder(pooled)


# ----------------------------------------------------------------------------------------------
# norms and feed-forward


class AdaLayerNormZero(nnx.Module):
    """adaLN-Zero: ``linear(silu(temb))`` -> 6 (or 9 for SD35AdaLayerNormZeroX) modulation vectors."""

    def __init__(self, d, n_chunks, path, ctx):
        self.n_chunks = n_chunks
        self.linear = _dense(d, n_chunks * d, ("embed", "mlp"), f"{path}.linear", ctx)
        self.norm = LayerNorm(d, eps=_EPS, elementwise_affine=False, dtype=ctx["dtype"])

    def __call__(self, x, temb):
        mods = jnp.split(self.linear(jax.nn.silu(temb)), self.n_chunks, axis=-1)
        shift, scale = mods[0], mods[1]
        nx = self.norm(x)
        out = nx * (1 + scale[:, None]) + shift[:, None]
        return out, nx, mods


class AdaLayerNormContinuous(nnx.Module):
    """``norm(x) * (1 + scale) + shift`` with ``(scale, shift) = linear(silu(cond))`` (no affine)."""

    def __init__(self, d, path, ctx):
        self.linear = _dense(d, 2 * d, ("embed", "mlp"), f"{path}.linear", ctx)
        self.norm = LayerNorm(d, eps=_EPS, elementwise_affine=False, dtype=ctx["dtype"])

    def __call__(self, x, cond):
        scale, shift = jnp.split(self.linear(jax.nn.silu(cond).astype(x.dtype)), 2, axis=-1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class GELU(nnx.Module):
    """diffusers ``GELU(approximate="tanh")``: ``gelu_tanh(proj(x))``."""

    def __init__(self, d, inner, path, ctx):
        self.proj = _dense(d, inner, ("embed", "mlp"), f"{path}.proj", ctx)

    def __call__(self, x):
        return gelu_tanh(self.proj(x))


class FeedForward(nnx.Module):
    """diffusers ``FeedForward("gelu-approximate")``; ``net = [GELU, dropout (None), Linear]``."""

    def __init__(self, d, path, ctx, mult=4):
        inner = d * mult
        self.net = nnx.List([GELU(d, inner, f"{path}.net.0", ctx), None,
                             _dense(inner, d, ("mlp", "embed"), f"{path}.net.2", ctx)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))


def _qk_norm(kind, head_dim, ctx):
    if kind is None:
        return None
    if kind == "rms_norm":
        return RMSNorm(head_dim, eps=_EPS, dtype=ctx["dtype"], param_dtype=ctx["param_dtype"])
    if kind == "layer_norm":
        return LayerNorm(head_dim, eps=_EPS, elementwise_affine=True, dtype=ctx["dtype"],
                         param_dtype=ctx["param_dtype"])
    return LayerNorm(head_dim, eps=_EPS, elementwise_affine=False, dtype=ctx["dtype"])  # fp32_layer_norm


# ----------------------------------------------------------------------------------------------
# attention and blocks


class Attention(nnx.Module):
    """diffusers ``Attention`` + ``JointAttnProcessor2_0``: optional context stream (``add_*_proj``)."""

    def __init__(self, config: SD3Config, path, ctx, *, joint: bool, context_pre_only: bool):
        d, hd = config.inner_dim, config.attention_head_dim
        self.heads, self.head_dim, self.dtype = config.num_attention_heads, hd, ctx["dtype"]
        self.joint, self.context_pre_only = joint, context_pre_only
        self.to_q = _dense(d, d, ("embed", "heads"), f"{path}.to_q", ctx)
        self.to_k = _dense(d, d, ("embed", "heads"), f"{path}.to_k", ctx)
        self.to_v = _dense(d, d, ("embed", "heads"), f"{path}.to_v", ctx)
        self.norm_q = _qk_norm(config.qk_norm, hd, ctx)
        self.norm_k = _qk_norm(config.qk_norm, hd, ctx)
        if joint:
            self.add_q_proj = _dense(d, d, ("embed", "heads"), f"{path}.add_q_proj", ctx)
            self.add_k_proj = _dense(d, d, ("embed", "heads"), f"{path}.add_k_proj", ctx)
            self.add_v_proj = _dense(d, d, ("embed", "heads"), f"{path}.add_v_proj", ctx)
            self.norm_added_q = _qk_norm(config.qk_norm, hd, ctx)
            self.norm_added_k = _qk_norm(config.qk_norm, hd, ctx)
        else:
            self.add_q_proj = self.add_k_proj = self.add_v_proj = None
            self.norm_added_q = self.norm_added_k = None
        self.to_out = nnx.List([_dense(d, d, ("heads", "embed"), f"{path}.to_out.0", ctx)])
        self.to_add_out = (_dense(d, d, ("heads", "embed"), f"{path}.to_add_out", ctx)
                           if joint and not context_pre_only else None)

    def _heads(self, x, norm):
        y = x.reshape(*x.shape[:-1], self.heads, self.head_dim)
        return y if norm is None else norm(y)

    def __call__(self, x, context=None):
        q = self._heads(self.to_q(x), self.norm_q)
        k = self._heads(self.to_k(x), self.norm_k)
        v = self._heads(self.to_v(x), None)
        n = x.shape[1]
        if context is not None:
            q = jnp.concatenate([q, self._heads(self.add_q_proj(context), self.norm_added_q)], axis=1)
            k = jnp.concatenate([k, self._heads(self.add_k_proj(context), self.norm_added_k)], axis=1)
            v = jnp.concatenate([v, self._heads(self.add_v_proj(context), None)], axis=1)
        o = attention(q, k, v, dtype=self.dtype or x.dtype)
        o = o.reshape(*o.shape[:2], self.heads * self.head_dim)
        out = self.to_out[0](o[:, :n])
        if context is None:
            return out, None
        ctx_out = o[:, n:]
        if self.to_add_out is not None:
            ctx_out = self.to_add_out(ctx_out)
        return out, ctx_out


class JointTransformerBlock(nnx.Module):
    """diffusers ``JointTransformerBlock`` (MMDiT block; MMDiT-X with ``use_dual_attention``)."""

    def __init__(self, config: SD3Config, path: str, ctx, *, use_dual_attention: bool,
                 context_pre_only: bool):
        d = config.inner_dim
        self.use_dual_attention, self.context_pre_only = use_dual_attention, context_pre_only
        self.norm1 = AdaLayerNormZero(d, 9 if use_dual_attention else 6, f"{path}.norm1", ctx)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(d, f"{path}.norm1_context", ctx)
        else:
            self.norm1_context = AdaLayerNormZero(d, 6, f"{path}.norm1_context", ctx)
        self.attn = Attention(config, f"{path}.attn", ctx, joint=True, context_pre_only=context_pre_only)
        self.attn2 = (Attention(config, f"{path}.attn2", ctx, joint=False, context_pre_only=False)
                      if use_dual_attention else None)
        self.norm2 = LayerNorm(d, eps=_EPS, dtype=ctx["dtype"])
        self.ff = FeedForward(d, f"{path}.ff", ctx)
        if context_pre_only:
            self.norm2_context = None
            self.ff_context = None
        else:
            self.norm2_context = LayerNorm(d, eps=_EPS, dtype=ctx["dtype"])
            self.ff_context = FeedForward(d, f"{path}.ff_context", ctx)

    def __call__(self, hidden_states, encoder_hidden_states, temb):
        x, c = hidden_states, encoder_hidden_states
        nx, nx_raw, m = self.norm1(x, temb)
        gate_msa, shift_mlp, scale_mlp, gate_mlp = m[2], m[3], m[4], m[5]
        if self.context_pre_only:
            nc = self.norm1_context(c, temb)
        else:
            nc, _, cm = self.norm1_context(c, temb)
        attn_out, ctx_out = self.attn(nx, nc)
        x = x + gate_msa[:, None] * attn_out
        if self.use_dual_attention:
            shift2, scale2, gate2 = m[6], m[7], m[8]
            nx2 = nx_raw * (1 + scale2[:, None]) + shift2[:, None]
            x = x + gate2[:, None] * self.attn2(nx2)[0]
        h = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp[:, None] * self.ff(h)
        if self.context_pre_only:
            return x, None
        c = c + cm[2][:, None] * ctx_out
        hc = self.norm2_context(c) * (1 + cm[4][:, None]) + cm[3][:, None]
        c = c + cm[5][:, None] * self.ff_context(hc)
        return x, c


def _remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={name!r} unsupported; one of {REMAT_POLICIES}")
    return {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable,
            "nothing_saveable": jax.checkpoint_policies.nothing_saveable}.get(name)


def _run_block(block, x, c, temb):
    return block(x, c, temb)


# ----------------------------------------------------------------------------------------------
# the model


class SD3Transformer2DModel(nnx.Module):
    """Flax NNX port of diffusers' ``SD3Transformer2DModel`` (see module docstring)."""

    def __init__(self, config: SD3Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 scan_layers: bool = False, remat_policy: str = "none", lora: LoRAConfig | None = None):
        if isinstance(config, dict):
            config = SD3Config.from_dict(config)
        _remat_policy(remat_policy)  # validate early
        self.config, self.dtype, self.param_dtype = config, dtype, param_dtype
        self.scan_layers, self.remat_policy, self.lora = bool(scan_layers), remat_policy, lora
        ctx = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs, "lora": lora}
        d = config.inner_dim
        self.pos_embed = PatchEmbed(config, ctx)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(config, ctx)
        self.context_embedder = _dense(config.joint_attention_dim, config.caption_projection_dim,
                                       (None, "embed"), "context_embedder", ctx)
        if not scan_layers:
            self.transformer_blocks = nnx.List([
                JointTransformerBlock(config, f"transformer_blocks.{i}", ctx,
                                      use_dual_attention=config.block_kind(i)[0],
                                      context_pre_only=config.block_kind(i)[1])
                for i in range(config.num_layers)])
            self.transformer_block_groups = None
        else:
            if lora is not None and any("transformer_blocks" in t for t in lora.target_modules):
                raise ValueError(
                    f"LoRA targets {lora.target_modules} name specific layers; "
                    "unsupported with scan_layers=True")
            self.transformer_blocks = None
            self.transformer_block_groups = nnx.List([
                _stacked_blocks(config, start, count, kind, ctx)
                for start, count, kind in config.block_groups()])
        self.norm_out = AdaLayerNormContinuous(d, "norm_out", ctx)
        self.proj_out = _dense(d, config.patch_size ** 2 * config.out_ch, ("embed", None), "proj_out", ctx)

    def _blocks(self, x, c, temb):
        policy = self.remat_policy
        if not self.scan_layers:
            fn = _run_block if policy == "none" else nnx.remat(_run_block, policy=_remat_policy(policy))
            for block in self.transformer_blocks:
                x, c = fn(block, x, c, temb)
            return x
        for (_, _, (_, pre_only)), group in zip(self.config.block_groups(), self.transformer_block_groups):
            x, c = _scan_group(group, x, c, temb, pre_only, policy)
        return x

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep) -> jax.Array:
        """``(B,C,H,W), (B,T,D), (B,P), (B,) in 0..1000 -> (B,C_out,H,W)`` in the compute dtype."""
        cfg, dtype = self.config, self.dtype
        x = jnp.asarray(hidden_states)
        ctx = jnp.asarray(encoder_hidden_states)
        pooled = jnp.asarray(pooled_projections)
        _check_inputs(cfg, x, ctx, pooled)
        b, _, hh, ww = x.shape
        t = jnp.asarray(timestep, jnp.float32)
        t = jnp.broadcast_to(t, (b,)) if t.ndim == 0 else t
        if t.shape != (b,):
            raise ValueError(f"SD3Transformer2DModel: timestep shape {t.shape} must be ({b},) or scalar")
        x = self.pos_embed(x.astype(dtype))
        temb = self.time_text_embed(t, pooled.astype(dtype))
        c = self.context_embedder(ctx.astype(dtype))
        x = self._blocks(x, c, temb)
        x = self.proj_out(self.norm_out(x, temb))
        p, co = cfg.patch_size, cfg.out_ch
        h, w = hh // p, ww // p
        x = x.reshape(b, h, w, p, p, co)
        return jnp.einsum("nhwpqc->nchpwq", x).reshape(b, co, h * p, w * p)


def _check_inputs(cfg: SD3Config, x, ctx, pooled):
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"SD3Transformer2DModel: hidden_states shape {x.shape} must be "
                         f"(B,{cfg.in_channels},H,W)")
    if x.shape[2] % cfg.patch_size or x.shape[3] % cfg.patch_size:
        raise ValueError(f"SD3Transformer2DModel: latent size {x.shape[2:]} not divisible by "
                         f"patch_size {cfg.patch_size}")
    m, p = cfg.pos_embed_max_size, cfg.patch_size
    if m is not None and (x.shape[2] // p > m or x.shape[3] // p > m):
        raise ValueError(f"SD3Transformer2DModel: latent {x.shape[2]}x{x.shape[3]} is a patch grid of "
                         f"{x.shape[2] // p}x{x.shape[3] // p}, larger than pos_embed_max_size={m}")
    if ctx.ndim != 3 or ctx.shape[0] != x.shape[0] or ctx.shape[2] != cfg.joint_attention_dim:
        raise ValueError(f"SD3Transformer2DModel: encoder_hidden_states shape {ctx.shape} must be "
                         f"({x.shape[0]},T,{cfg.joint_attention_dim})")
    if pooled.shape != (x.shape[0], cfg.pooled_projection_dim):
        raise ValueError(f"SD3Transformer2DModel: pooled_projections shape {pooled.shape} must be "
                         f"({x.shape[0]},{cfg.pooled_projection_dim})")


def _stacked_blocks(config, start, count, kind, ctx):
    dual, pre_only = kind
    rngs = ctx["rngs"]

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=count, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return JointTransformerBlock(config, f"transformer_blocks.{start}", {**ctx, "rngs": r},
                                     use_dual_attention=dual, context_pre_only=pre_only)

    return make(rngs)


def _scan_group(group, x, c, temb, pre_only, policy):
    call = _run_block if policy == "none" else nnx.remat(_run_block, policy=_remat_policy(policy))
    if pre_only:
        @nnx.scan(in_axes=(0, nnx.Carry, None, None), out_axes=nnx.Carry,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def body_pre(block, xc, cc, tt):
            return call(block, xc, cc, tt)[0]

        return body_pre(group, x, c, temb), None

    @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def body(block, carry, tt):
        return call(block, carry[0], carry[1], tt)

    return body(group, (x, c), temb)


# ----------------------------------------------------------------------------------------------
# scanned <-> per-layer state layout


def _meta_names(var):
    for k in ("out_sharding", "sharding_names", "sharding"):
        if var.has_metadata(k) and var.get_metadata(k) is not None:
            return k, tuple(var.get_metadata(k))
    return None, None


def unstack_state(state, config: SD3Config):
    """Scanned-model state -> the loop model's per-layer state (``transformer_blocks.{i}...`` paths).

    Works on ``nnx.State`` (Variables; the leading ``layers`` sharding name is dropped) or nested dicts of
    arrays. Paths outside ``transformer_block_groups`` are passed through.
    """
    groups = config.block_groups()
    flat = []
    for path, v in nnx.to_flat_state(state) if isinstance(state, nnx.State) else _flat_dict(state):
        if path and path[0] == "transformer_block_groups":
            start, count, _ = groups[int(path[1])]
            for j in range(count):
                flat.append((("transformer_blocks", start + j) + tuple(path[2:]), _slice(v, j)))
        else:
            flat.append((tuple(path), v))
    return _rebuild(flat, state)


def stack_state(state, config: SD3Config):
    """The loop model's per-layer state -> the scanned model's stacked state (inverse of unstack_state)."""
    groups = config.block_groups()
    layer_group = {}
    for g, (start, count, _) in enumerate(groups):
        for j in range(count):
            layer_group[start + j] = (g, j, count)
    per: dict[tuple, list] = {}
    flat = []
    for path, v in nnx.to_flat_state(state) if isinstance(state, nnx.State) else _flat_dict(state):
        if path and path[0] == "transformer_blocks":
            g, j, count = layer_group[int(path[1])]
            key = ("transformer_block_groups", g) + tuple(path[2:])
            per.setdefault(key, [None] * count)[j] = v
        else:
            flat.append((tuple(path), v))
    for key, parts in per.items():
        if any(p is None for p in parts):
            raise ValueError(f"stack_state: missing layers for {'.'.join(map(str, key))}")
        flat.append((key, _stack(parts)))
    return _rebuild(flat, state)


def _flat_dict(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat_dict(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _slice(v, j):
    if isinstance(v, nnx.Variable):
        k, names = _meta_names(v)
        kw = {k: names[1:]} if k else {}
        return v.replace(value=v[...][j], **kw)
    return v[j]


def _stack(parts):
    if isinstance(parts[0], nnx.Variable):
        k, names = _meta_names(parts[0])
        kw = {k: ("layers",) + names} if k else {}
        return parts[0].replace(value=jnp.stack([p[...] for p in parts]), **kw)
    return jnp.stack(parts)


def _rebuild(flat, like):
    if isinstance(like, nnx.State):
        return nnx.from_flat_state(flat)
    out: dict = {}
    for path, v in flat:
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out
