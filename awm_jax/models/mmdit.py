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

from awm_jax.convert.sd3 import pos_embed_table
from awm_jax.deprecation import aliases as _deprecated_aliases
from awm_jax.models.blocks import (
    ADALN_ZERO,
    ADALN_ZERO_X,
    EPS,
    QK_NORMS,
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    Attention,
    FeedForward,
    TimestepTextEmbedding,
    block_caller,
    linear,
    make_stack,
    model_context,
    modulate,
    scan_stack,
)
from awm_jax.models.family import ModelFamily, config_from_diffusers, config_to_diffusers, register_family
from awm_jax.models.layers import LayerNorm
from awm_jax.models.lora import SD35_TARGETS, LoRAConfig
from awm_jax.models.stacking import Stack
from awm_jax.models.stacking import stack_state as _stack_generic
from awm_jax.models.stacking import unstack_state as _unstack_generic
from awm_jax.posembed import sincos_2d_table


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
        return config_from_diffusers(cls, d, source, "SD3Transformer2DModel")

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
        return config_to_diffusers(self)


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


# ----------------------------------------------------------------------------------------------
# the block


class JointTransformerBlock(nnx.Module):
    """diffusers ``JointTransformerBlock`` (MMDiT block; MMDiT-X with ``use_dual_attention``)."""

    def __init__(self, config: SD3Config, path: str, ctx, *, use_dual_attention: bool,
                 context_pre_only: bool):
        d, heads, hd = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        qk = config.qk_norm
        self.use_dual_attention, self.context_pre_only = use_dual_attention, context_pre_only
        fields = ADALN_ZERO_X if use_dual_attention else ADALN_ZERO
        self.norm1 = AdaLayerNormZero(d, fields, f"{path}.norm1", ctx)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(d, f"{path}.norm1_context", ctx)
        else:
            self.norm1_context = AdaLayerNormZero(d, ADALN_ZERO, f"{path}.norm1_context", ctx)
        self.attn = Attention(d, heads, hd, f"{path}.attn", ctx, qk_norm_kind=qk, joint=True,
                              context_out=not context_pre_only)
        self.attn2 = (Attention(d, heads, hd, f"{path}.attn2", ctx, qk_norm_kind=qk)
                      if use_dual_attention else None)
        self.norm2 = LayerNorm(d, eps=EPS, dtype=ctx["dtype"])
        self.ff = FeedForward(d, f"{path}.ff", ctx)
        if context_pre_only:
            self.norm2_context = None
            self.ff_context = None
        else:
            self.norm2_context = LayerNorm(d, eps=EPS, dtype=ctx["dtype"])
            self.ff_context = FeedForward(d, f"{path}.ff_context", ctx)

    def __call__(self, hidden_states, encoder_hidden_states, temb):
        x, c = hidden_states, encoder_hidden_states
        nx, nx_raw, m = self.norm1(x, temb)
        if self.context_pre_only:
            nc, cm = self.norm1_context(c, temb), None
        else:
            nc, _, cm = self.norm1_context(c, temb)
        attn_out, ctx_out = self.attn(nx, nc)
        x = x + m.gate_msa[:, None] * attn_out
        if self.use_dual_attention:
            x = x + m.gate_msa2[:, None] * self.attn2(modulate(nx_raw, m.shift_msa2, m.scale_msa2))[0]
        x = x + m.gate_mlp[:, None] * self.ff(modulate(self.norm2(x), m.shift_mlp, m.scale_mlp))
        if self.context_pre_only:
            return x, c  # the context stream ends here (its value is no longer used)
        c = c + cm.gate_msa[:, None] * ctx_out
        hc = modulate(self.norm2_context(c), cm.shift_mlp, cm.scale_mlp)
        c = c + cm.gate_mlp[:, None] * self.ff_context(hc)
        return x, c


# ----------------------------------------------------------------------------------------------
# the model


class SD3Transformer2DModel(nnx.Module):
    """Flax NNX port of diffusers' ``SD3Transformer2DModel`` (see module docstring)."""

    def __init__(self, config: SD3Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 scan_layers: bool = False, remat_policy: str = "none", lora: LoRAConfig | None = None,
                 attention: str = "xla"):
        config = SD3Config.from_dict(config) if isinstance(config, dict) else config
        ctx = model_context(self, config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                            scan_layers=scan_layers, remat_policy=remat_policy, lora=lora,
                            attention=attention)
        d = config.inner_dim
        self.pos_embed = PatchEmbed(config, ctx)
        self.time_text_embed = TimestepTextEmbedding(d, config.pooled_projection_dim, "time_text_embed", ctx)
        self.context_embedder = linear(config.joint_attention_dim, config.caption_projection_dim,
                                       (None, "embed"), "context_embedder", ctx)

        def block(i, c):
            dual, pre_only = config.block_kind(i)
            return JointTransformerBlock(config, f"transformer_blocks.{i}", c, use_dual_attention=dual,
                                         context_pre_only=pre_only)

        if not scan_layers:
            self.transformer_blocks = nnx.List([block(i, ctx) for i in range(config.num_layers)])
            self.transformer_block_groups = None
        else:
            if lora is not None and any("transformer_blocks" in t for t in lora.target_modules):
                raise ValueError(
                    f"LoRA targets {lora.target_modules} name specific layers; "
                    "unsupported with scan_layers=True")
            self.transformer_blocks = None
            self.transformer_block_groups = nnx.List([
                make_stack(lambda c, s=start: block(s, c), count, ctx)
                for start, count, _ in config.block_groups()])
        self.norm_out = AdaLayerNormContinuous(d, "norm_out", ctx)
        self.proj_out = linear(d, config.patch_size ** 2 * config.out_ch, ("embed", None), "proj_out", ctx)

    def _blocks(self, x, c, temb):
        if not self.scan_layers:
            call = block_caller(self.remat_policy)
            for block in self.transformer_blocks:
                x, c = call(block, x, c, temb)
            return x
        for group in self.transformer_block_groups:
            x, c = scan_stack(group, (x, c), temb, policy=self.remat_policy)
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


# ----------------------------------------------------------------------------------------------
# scanned <-> per-layer state layout


def stacks(config: SD3Config) -> tuple[Stack, ...]:
    """The one block stack of the MMDiT (runs of identical blocks, see ``SD3Config.block_groups``)."""
    groups = tuple((start, count) for start, count, _ in config.block_groups())
    return (Stack("transformer_blocks", "transformer_block_groups", groups),)


def unstack_state(state, config: SD3Config):
    """Scanned-model state -> the loop model's per-layer state (``transformer_blocks.{i}...`` paths)."""
    return _unstack_generic(state, stacks(config))


def stack_state(state, config: SD3Config):
    """The loop model's per-layer state -> the scanned model's stacked state (inverse of unstack_state)."""
    return _stack_generic(state, stacks(config))


# ----------------------------------------------------------------------------------------------
# the family


class SD3Family(ModelFamily):
    """SD3 / SD3.5 (``model.kind = "sd35"``): diffusers ``StableDiffusion3Pipeline`` folders.

    Velocity: ``model(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
    timestep=1000 t)``; latents ``(16, H/8, W/8)``; the SD3 shifted grid; context = (CLIP-L + CLIP-G + T5
    embeddings (B, 77 + T, 4096), pooled CLIP-L + CLIP-G (B, 2048)).
    """

    name = "sd35"
    model_class = SD3Transformer2DModel
    converter = "sd3"
    class_names = ("SD3Transformer2DModel",)
    lora_targets = SD35_TARGETS
    architectures = {
        "sd3.5-medium": dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        # stabilityai/stable-diffusion-3.5-large transformer/config.json (diffusers 0.31.0.dev0, "SD3.5 Large
        # Public Release"): 38 MMDiT blocks of 38 heads x 64 = 2432 wide, no dual attention, RMS q/k norms
        "sd3.5-large": dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
            num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
    }
    vae_scale_factor = 8
    pipeline_loader = "awm_jax.pipelines.sd3:load_sd3_pipeline"
    sample_loader = "awm_jax.pipelines.sd3:sample_pipeline"
    default_config = "sd35m_geneval.py"

    def config_from_dict(self, d, source="config"):
        return SD3Config.from_dict(dict(d), source=source)

    def stacks(self, cfg):
        return stacks(cfg)

    def velocity(self, model, x, t, context, **options):
        emb, pooled = context
        return model(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                     timestep=jnp.asarray(t, jnp.float32) * 1000.0).astype(jnp.float32)

    def text_tokens(self, config) -> int:
        """77 CLIP tokens + ``model.max_sequence_length`` T5 tokens."""
        return 77 + int(config.model.max_sequence_length)

    def latent_shape(self, cfg, height, width):
        f = self.vae_scale_factor
        return (int(cfg.in_channels), int(height) // f, int(width) // f)

    def skip_tensor(self, key, value, cfg, where):
        if key != POS_EMBED_KEY:
            return False
        check_pos_embed(value, cfg, where)
        return True


POS_EMBED_KEY = "pos_embed.pos_embed"


def check_pos_embed(table: np.ndarray, cfg: SD3Config, where: str) -> None:
    """The stored ``pos_embed.pos_embed`` buffer must be the table the Flax model recomputes."""
    from awm_jax.convert import ConversionError

    want = pos_embed_table(cfg)
    got = np.asarray(table, np.float32)
    tol = 1e-4 if table.dtype.itemsize >= 4 else 1e-2
    err = float(np.max(np.abs(got.reshape(want.shape) - want))) if got.size == want.size else np.inf
    if not err <= tol:
        raise ConversionError(
            f"{where}: stored {POS_EMBED_KEY} differs from the sin-cos table of its config "
            f"(max |diff| {err:.3g})")


register_family(SD3Family())


# deprecated aliases of names that moved (awm_jax/deprecation.py, CHANGELOG.md)
__getattr__ = _deprecated_aliases(__name__)
