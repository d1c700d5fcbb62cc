"""Flax NNX ``FluxTransformer2DModel`` (FLUX.1-dev / FLUX.1-schnell), numerically equal to diffusers' model.

The network: ``x_embedder`` on packed latents, ``context_embedder`` on the T5 embeddings, the time (+
guidance for dev) + pooled-CLIP embedding ``time_text_embed``, ``num_layers`` double-stream blocks (joint
attention over ``[text, image]`` tokens with RMSNorm q/k norms, adaLN-Zero on both streams, separate
feed-forwards), ``num_single_layers`` single-stream blocks (adaLN-Zero-single, attention without output
projection in parallel with a gelu-tanh MLP, ``proj_out`` on their concatenation, gated residual) over the
concatenated ``[text, image]`` sequence, 3-axis rotary position embedding from ``txt_ids`` / ``img_ids``,
the final AdaLayerNormContinuous and ``proj_out``.

Submodules are named exactly like diffusers' (``transformer_blocks[i].attn.add_q_proj``,
``single_transformer_blocks[i].proj_mlp``, ``time_text_embed.guidance_embedder.linear_1``, ...), so the key
map (:mod:`awm_jax.convert.flux`) is an identity on prefixes and LoRA targets are PEFT module names.

With ``scan_layers=True`` the double blocks become one stacked group ``transformer_block_groups[0]`` and
the single blocks ``single_transformer_block_groups[0]`` (leading parameter axis ``layers``), run with
``nnx.scan``; :func:`stacks` gives the per-layer <-> stacked layouts (:mod:`awm_jax.models.stacking`).

:class:`FluxFamily` (registered as ``"flux"``) wraps the model for the samplers: they work on *unpacked*
latents ``(B, 16, h, w)``; the family packs them 2x2 into ``(B, h/2 * w/2, 64)`` tokens like diffusers'
``FluxPipeline`` and unpacks the velocity.
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
    ADALN_ZERO,
    ADALN_ZERO_SINGLE,
    EPS,
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
from awm_jax.models.layers import LayerNorm, gelu_tanh
from awm_jax.models.lora import LoRAConfig
from awm_jax.models.stacking import Stack

__all__ = ["FLUX_LORA_TARGETS", "FluxConfig", "FluxFamily", "FluxTransformer2DModel", "latent_image_ids",
           "pack_latents", "rope_tables", "stacks", "unpack_latents"]

ROPE_THETA = 10000.0
MLP_RATIO = 4
NAME = "FluxTransformer2DModel"
# the Linear sub-modules of each block kind, relative to the block (LoRA placement and its scan check)
DOUBLE_LINEARS = ("norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v",
                  "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out",
                  "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
SINGLE_LINEARS = ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")
FULL_SINGLE_LAYERS = 38

# Default LoRA targets: every attention and feed-forward projection of both block kinds (the diffusers
# FLUX DreamBooth-LoRA set, whose "attn.to_q/k/v" suffixes also cover the single blocks' attention), plus
# the single blocks' MLP input ``proj_mlp`` and their output projection ``proj_out`` (it projects both the
# attention and the MLP branch: without it the single-stream half of the network has no adapted output).
# A bare "proj_out" suffix would also adapt the final top-level ``proj_out`` (the velocity read-out, left
# frozen like the embedders and adaLN modulations), so the single blocks' ``proj_out`` are listed by full
# path, one per layer of the full-size models (38 single blocks). Flow-GRPO's FLUX trainer (the public AWM
# code has none) adapts only the first 12 entries; ``lora.targets`` set to those reproduces its layout.
FLUX_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                     "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                     "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp") + tuple(
    f"single_transformer_blocks.{i}.proj_out" for i in range(FULL_SINGLE_LAYERS))


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """diffusers ``FluxTransformer2DModel`` config (same field names and defaults)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        object.__setattr__(self, "guidance_embeds", bool(self.guidance_embeds))
        for k in ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
                  "joint_attention_dim", "pooled_projection_dim"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"FluxConfig.{k}={getattr(self, k)!r} must be a positive integer")
        for k in ("num_layers", "num_single_layers"):
            if int(getattr(self, k)) < 0:
                raise ValueError(f"FluxConfig.{k}={getattr(self, k)!r} must be >= 0")
        axes = self.axes_dims_rope
        if any(a <= 0 or a % 2 for a in axes) or sum(axes) != self.attention_head_dim:
            raise ValueError(f"FluxConfig.axes_dims_rope={self.axes_dims_rope} must be positive even sizes "
                             f"summing to attention_head_dim={self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        """Model width ``num_attention_heads * attention_head_dim``."""
        return int(self.num_attention_heads) * int(self.attention_head_dim)

    @property
    def out_ch(self) -> int:
        """Output channels (diffusers: ``out_channels or in_channels``)."""
        return int(self.out_channels or self.in_channels)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> FluxConfig:
        """Build from a diffusers ``config.json`` dict; ``_``-prefixed keys ignored, unknown keys raise."""
        return config_from_diffusers(cls, d, source, NAME)

    def to_dict(self) -> dict[str, Any]:
        """The diffusers-style config dict (lists for tuples)."""
        return config_to_diffusers(self)


def stacks(config: FluxConfig) -> tuple[Stack, Stack]:
    """The two block stacks (double- and single-stream), each one run of identical blocks."""
    def one(n):
        return ((0, int(n)),) if n else ()

    return (Stack("transformer_blocks", "transformer_block_groups", one(config.num_layers)),
            Stack("single_transformer_blocks", "single_transformer_block_groups",
                  one(config.num_single_layers)))


# ---------------------------------------------------------------------------------------------------- rotary


@functools.lru_cache(maxsize=16)
def _inv_freqs(dim: int, theta: float) -> np.ndarray:
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def rope_tables(ids, axes_dims, theta: float = ROPE_THETA):
    """diffusers ``FluxPosEmbed``: ``(L, n_axes)`` position ids -> ``(cos, sin)``, each ``(L, sum(axes))``
    float32, every frequency repeated for the (real, imaginary) feature pair, axes concatenated.

    Concrete ids are computed on the host in float64 exactly like diffusers; traced ids (a jitted caller
    passing them as arguments) in float32 on device (angles then carry float32 rounding, ~1e-6).
    """
    try:
        pos = np.asarray(ids, np.float32).astype(np.float64)
        xp = np
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        pos, xp = jnp.asarray(ids).astype(jnp.float32), jnp
    cos, sin = [], []
    for i, d in enumerate(axes_dims):
        f = _inv_freqs(int(d), float(theta))
        ang = pos[:, i:i + 1] * (f[None] if xp is np else jnp.asarray(f, jnp.float32)[None])
        cos.append(xp.repeat(xp.cos(ang), 2, axis=1))
        sin.append(xp.repeat(xp.sin(ang), 2, axis=1))
    return (jnp.asarray(xp.concatenate(cos, axis=1), jnp.float32),
            jnp.asarray(xp.concatenate(sin, axis=1), jnp.float32))


# ---------------------------------------------------------------------------------------------------- blocks


def _clip_fp16(x):
    """diffusers clips the residual stream to the float16 range when computing in float16."""
    return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


class FluxTransformerBlock(nnx.Module):
    """diffusers ``FluxTransformerBlock``: double-stream (MMDiT) block, text tokens first in attention."""

    def __init__(self, config: FluxConfig, path: str, ctx: dict):
        d, heads, hd = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.norm1 = AdaLayerNormZero(d, ADALN_ZERO, f"{path}.norm1", ctx)
        self.norm1_context = AdaLayerNormZero(d, ADALN_ZERO, f"{path}.norm1_context", ctx)
        self.attn = Attention(d, heads, hd, f"{path}.attn", ctx, qk_norm_kind="rms_norm", joint=True,
                              context_first=True)
        self.norm2 = LayerNorm(d, eps=EPS, dtype=ctx["dtype"])
        self.ff = FeedForward(d, f"{path}.ff", ctx, mult=MLP_RATIO)
        self.norm2_context = LayerNorm(d, eps=EPS, dtype=ctx["dtype"])
        self.ff_context = FeedForward(d, f"{path}.ff_context", ctx, mult=MLP_RATIO)

    def __call__(self, hidden_states, encoder_hidden_states, temb, rotary):
        x, c = hidden_states, encoder_hidden_states
        nx, _, m = self.norm1(x, temb)
        nc, _, cm = self.norm1_context(c, temb)
        attn_out, ctx_out = self.attn(nx, nc, rotary=rotary)
        x = x + m.gate_msa[:, None] * attn_out
        x = x + m.gate_mlp[:, None] * self.ff(modulate(self.norm2(x), m.shift_mlp, m.scale_mlp))
        c = c + cm.gate_msa[:, None] * ctx_out
        hc = modulate(self.norm2_context(c), cm.shift_mlp, cm.scale_mlp)
        c = c + cm.gate_mlp[:, None] * self.ff_context(hc)
        return x, _clip_fp16(c)


class FluxSingleTransformerBlock(nnx.Module):
    """diffusers ``FluxSingleTransformerBlock``: one stream over ``[text, image]``; attention (no output
    projection) and a gelu-tanh MLP in parallel, ``proj_out`` on their concatenation, gated residual.

    Like diffusers 0.42 it takes and returns the two streams separately (concatenating inside)."""

    def __init__(self, config: FluxConfig, path: str, ctx: dict):
        d, heads, hd = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        mlp = MLP_RATIO * d
        self.norm = AdaLayerNormZero(d, ADALN_ZERO_SINGLE, f"{path}.norm", ctx)
        self.proj_mlp = linear(d, mlp, ("embed", "mlp"), f"{path}.proj_mlp", ctx)
        self.proj_out = linear(d + mlp, d, ("mlp", "embed"), f"{path}.proj_out", ctx)
        self.attn = Attention(d, heads, hd, f"{path}.attn", ctx, qk_norm_kind="rms_norm", out_proj=False)

    def __call__(self, hidden_states, encoder_hidden_states, temb, rotary):
        t = encoder_hidden_states.shape[1]
        h = jnp.concatenate([encoder_hidden_states, hidden_states], axis=1)
        nh, _, m = self.norm(h, temb)
        mlp = gelu_tanh(self.proj_mlp(nh))
        attn_out, _ = self.attn(nh, rotary=rotary)
        h = _clip_fp16(h + m.gate_msa[:, None] * self.proj_out(jnp.concatenate([attn_out, mlp], axis=-1)))
        return h[:, t:], h[:, :t]


def _check_scan_lora(lora: LoRAConfig | None, per_layer: str, count: int, linears) -> None:
    """A stacked group shares one LoRA layout: the targets must adapt a module in all its layers or none."""
    if lora is None:
        return
    for m in linears:
        hits = [i for i in range(count) if lora.matches(f"{per_layer}.{i}.{m}")]
        if hits and len(hits) != count:
            raise ValueError(f"LoRA targets adapt {per_layer}.{{{','.join(map(str, hits))}}}.{m} but not all "
                             f"{count} layers of that stack; unsupported with scan_layers=True "
                             f"(targets: {lora.target_modules})")


# ---------------------------------------------------------------------------------------------------- model


class FluxTransformer2DModel(nnx.Module):
    """Flax NNX port of diffusers' ``FluxTransformer2DModel`` (see the module docstring)."""

    def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 scan_layers: bool = False, remat_policy: str = "none", lora: LoRAConfig | None = None,
                 attention: str = "xla"):
        config = FluxConfig.from_dict(config) if isinstance(config, dict) else config
        ctx = model_context(self, config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                            scan_layers=scan_layers, remat_policy=remat_policy, lora=lora,
                            attention=attention)
        d = config.inner_dim
        self.x_embedder = linear(config.in_channels, d, (None, "embed"), "x_embedder", ctx)
        self.time_text_embed = TimestepTextEmbedding(d, config.pooled_projection_dim, "time_text_embed", ctx,
                                                     guidance=config.guidance_embeds)
        self.context_embedder = linear(config.joint_attention_dim, d, (None, "embed"), "context_embedder",
                                       ctx)
        kinds = (("transformer_blocks", "transformer_block_groups", config.num_layers, FluxTransformerBlock,
                  DOUBLE_LINEARS),
                 ("single_transformer_blocks", "single_transformer_block_groups", config.num_single_layers,
                  FluxSingleTransformerBlock, SINGLE_LINEARS))
        for per_layer, grouped, n, cls, linears in kinds:
            if not scan_layers:
                setattr(self, per_layer, nnx.List([cls(config, f"{per_layer}.{i}", ctx) for i in range(n)]))
                setattr(self, grouped, None)
            else:
                _check_scan_lora(lora, per_layer, n, linears)
                setattr(self, per_layer, None)

                def factory(c, cls=cls, p=per_layer):
                    return cls(config, f"{p}.0", c)

                setattr(self, grouped, nnx.List([make_stack(factory, n, ctx)] if n else []))
        self.norm_out = AdaLayerNormContinuous(d, "norm_out", ctx)
        self.proj_out = linear(d, config.patch_size ** 2 * config.out_ch, ("embed", None), "proj_out", ctx)

    def _blocks(self, x, c, temb, rotary):
        if not self.scan_layers:
            call = block_caller(self.remat_policy)
            for block in (*self.transformer_blocks, *self.single_transformer_blocks):
                x, c = call(block, x, c, temb, rotary)
            return x
        for group in (*self.transformer_block_groups, *self.single_transformer_block_groups):
            x, c = scan_stack(group, (x, c), temb, rotary, policy=self.remat_policy)
        return x

    def __call__(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                 img_ids=None, txt_ids=None, guidance=None) -> jax.Array:
        """``(B,S,C_in) packed latents, (B,T,joint_dim), (B,pooled_dim), timestep (B,) in [0, 1], img_ids
        (S,3), txt_ids (T,3)[, guidance (B,)] -> (B, S, patch^2 * out_channels)`` in the compute dtype.

        Like diffusers, ``timestep`` and ``guidance`` are multiplied by 1000 here (in float32), and 3-D
        ``(B, L, 3)`` ids are accepted (the first row is used).
        """
        cfg, dtype = self.config, self.dtype
        x, ctx, pooled, t, g, img_ids, txt_ids = _check_inputs(cfg, hidden_states, encoder_hidden_states,
                                                               pooled_projections, timestep, img_ids, txt_ids,
                                                               guidance)
        x = self.x_embedder(x.astype(dtype))
        temb = self.time_text_embed(t * 1000.0, pooled.astype(dtype), None if g is None else g * 1000.0)
        c = self.context_embedder(ctx.astype(dtype))
        ids = (np.concatenate([txt_ids, img_ids], axis=0) if isinstance(txt_ids, np.ndarray)
               and isinstance(img_ids, np.ndarray) else jnp.concatenate([txt_ids, img_ids], axis=0))
        rotary = rope_tables(ids, cfg.axes_dims_rope)
        x = self._blocks(x, c, temb, rotary)
        return self.proj_out(self.norm_out(x, temb))


def _ids(ids, name: str, length: int, n_axes: int):
    if ids is None:
        raise ValueError(f"{NAME}: {name} is required ((L, {n_axes}) position ids)")
    try:
        arr = np.asarray(ids)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        arr = jnp.asarray(ids)
    if arr.ndim == 3:  # deprecated batched ids: diffusers takes the first
        arr = arr[0]
    if arr.shape != (length, n_axes):
        raise ValueError(f"{NAME}: {name} shape {tuple(np.shape(ids))} must be ({length}, {n_axes}) "
                         f"(or (B, {length}, {n_axes}))")
    return arr


def _per_sample(v, name: str, b: int):
    v = jnp.asarray(v, jnp.float32)
    v = jnp.broadcast_to(v, (b,)) if v.ndim == 0 else v
    if v.shape != (b,):
        raise ValueError(f"{NAME}: {name} shape {v.shape} must be ({b},) or a scalar")
    return v


def _check_inputs(cfg: FluxConfig, x, ctx, pooled, t, img_ids, txt_ids, guidance):
    for name, v in (("encoder_hidden_states", ctx), ("pooled_projections", pooled), ("timestep", t)):
        if v is None:
            raise ValueError(f"{NAME}: {name} is required")
    x, ctx, pooled = jnp.asarray(x), jnp.asarray(ctx), jnp.asarray(pooled)
    if x.ndim != 3 or x.shape[2] != cfg.in_channels:
        raise ValueError(f"{NAME}: hidden_states shape {x.shape} must be (B, S, {cfg.in_channels}) "
                         "(packed latents)")
    b, s = x.shape[:2]
    if ctx.ndim != 3 or ctx.shape[0] != b or ctx.shape[2] != cfg.joint_attention_dim:
        raise ValueError(f"{NAME}: encoder_hidden_states shape {ctx.shape} must be "
                         f"({b}, T, {cfg.joint_attention_dim})")
    if pooled.shape != (b, cfg.pooled_projection_dim):
        raise ValueError(f"{NAME}: pooled_projections shape {pooled.shape} must be "
                         f"({b}, {cfg.pooled_projection_dim})")
    n_axes = len(cfg.axes_dims_rope)
    img_ids = _ids(img_ids, "img_ids", s, n_axes)
    txt_ids = _ids(txt_ids, "txt_ids", ctx.shape[1], n_axes)
    if cfg.guidance_embeds and guidance is None:
        raise ValueError(f"{NAME}: this model has a guidance embedding (guidance_embeds=True, FLUX.1-dev): "
                         "pass guidance (B,)")
    if not cfg.guidance_embeds and guidance is not None:
        raise ValueError(f"{NAME}: guidance given but the model has no guidance embedding "
                         "(guidance_embeds=False, FLUX.1-schnell)")
    g = None if guidance is None else _per_sample(guidance, "guidance", b)
    return x, ctx, pooled, _per_sample(t, "timestep", b), g, img_ids, txt_ids


# ---------------------------------------------------------------------------------------------------- packing


def pack_latents(x):
    """diffusers ``FluxPipeline._pack_latents``: ``(B, C, h, w) -> (B, h/2 * w/2, 4C)`` (2x2 patches)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x, h: int, w: int):
    """Inverse of :func:`pack_latents` (``FluxPipeline._unpack_latents``): ``(B, S, 4C) -> (B, C, h, w)``."""
    b, _, c4 = x.shape
    x = x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


@functools.lru_cache(maxsize=32)
def latent_image_ids(h2: int, w2: int) -> np.ndarray:
    """``FluxPipeline._prepare_latent_image_ids``: ``(h2 * w2, 3)`` rows ``[0, row, col]`` (packed grid)."""
    ids = np.zeros((h2, w2, 3), np.float32)
    ids[..., 1] = np.arange(h2)[:, None]
    ids[..., 2] = np.arange(w2)[None, :]
    ids = ids.reshape(h2 * w2, 3)
    ids.setflags(write=False)
    return ids


# ---------------------------------------------------------------------------------------------------- family


def _arch(guidance: bool) -> dict:
    return dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=guidance, axes_dims_rope=(16, 56, 56))


class FluxFamily(ModelFamily):
    """FLUX.1 (``model.kind = "flux"``): diffusers ``FluxPipeline`` folders.

    The samplers see unpacked latents ``(B, in_channels / 4, H/8, W/8)``; :meth:`velocity` packs them
    2x2, builds FluxPipeline's position ids (image: ``[0, row, col]`` of the packed grid, text: zeros) and
    calls the model with ``timestep = t`` in [0, 1] (the model scales by 1000) and, for the
    guidance-distilled FLUX.1-dev, ``guidance`` (from ``config.model.guidance``). Context = (T5 embeddings
    (B, T, 4096), pooled CLIP (B, 768)). Grid: FluxPipeline's resolution-dependent dynamic shift.
    """

    name = "flux"
    model_class = FluxTransformer2DModel
    converter = "flux"
    class_names = ("FluxTransformer2DModel",)
    lora_targets = FLUX_LORA_TARGETS
    architectures = {"flux.1-dev": _arch(True), "flux.1-schnell": _arch(False)}
    vae_scale_factor = 8
    pipeline_loader = "awm_jax.pipelines.flux:load_flux_pipeline"
    sample_loader = "awm_jax.pipelines.flux:sample_pipeline"
    default_config = "flux_geneval.py"

    def sample_flag_problems(self, args):
        sd3_only = (("--guidance-scale", args.guidance_scale not in (None, 1.0)),
                    ("--negative-prompt", args.negative_prompt), ("--no-t5", args.no_t5))
        return [f"{flag} is an SD3 option: FLUX samples without classifier-free guidance (FLUX.1-dev takes "
                "--guidance)" for flag, bad in sd3_only if bad]

    def run_sample_options(self, config, args):
        """FLUX's distilled guidance: ``--guidance`` or the run's ``model.guidance`` (no CFG)."""
        return dict(guidance=float(config.model.guidance) if args.guidance is None else args.guidance)

    def config_from_dict(self, d, source="config"):
        return FluxConfig.from_dict(dict(d), source=source)

    def stacks(self, cfg):
        return stacks(cfg)

    def velocity(self, model, x, t, context, guidance=None):
        """``v(x, t)`` float32 on unpacked latents ``x (B, C, h, w)``, ``t (B,)`` in [0, 1]. ``guidance`` is
        used by models with a guidance embedding (required there) and ignored by the others (schnell)."""
        cfg = model.config
        emb, pooled = context
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[1] * 4 != cfg.in_channels or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"FLUX velocity: latents shape {x.shape} must be "
                             f"(B, {cfg.in_channels // 4}, h, w) with even h, w")
        if cfg.patch_size != 1 or cfg.out_ch != cfg.in_channels:
            raise ValueError(f"FLUX velocity: needs patch_size=1 and out_channels=in_channels, got "
                             f"patch_size={cfg.patch_size}, out_channels={cfg.out_ch}, in={cfg.in_channels}")
        b, _, h, w = x.shape
        g = None
        if cfg.guidance_embeds:
            if guidance is None:
                raise ValueError("FLUX velocity: this model has a guidance embedding (FLUX.1-dev): pass "
                                 "guidance (set config.model.guidance)")
            g = jnp.full((b,), guidance, jnp.float32)
        txt_ids = np.zeros((np.shape(emb)[1], 3), np.float32)
        out = model(hidden_states=pack_latents(x), encoder_hidden_states=emb, pooled_projections=pooled,
                    timestep=jnp.asarray(t, jnp.float32), img_ids=latent_image_ids(h // 2, w // 2),
                    txt_ids=txt_ids, guidance=g)
        return unpack_latents(out, h, w).astype(jnp.float32)

    def velocity_options(self, config) -> dict:
        """The distilled guidance fed to FLUX.1-dev (``config.model.guidance``)."""
        return {"guidance": float(config.model.guidance)}

    def latent_shape(self, cfg, height, width):
        height, width = int(height), int(width)
        m = 2 * self.vae_scale_factor
        if height % m or width % m:
            raise ValueError(f"FLUX: image size {height}x{width} must be a multiple of {m} "
                             "(VAE factor 8 times the 2x2 latent packing)")
        f = self.vae_scale_factor
        return (int(cfg.in_channels) // 4, height // f, width // f)

    def time_grid(self, num_steps, shift, latent_shape):
        """FluxPipeline's sigmas ``linspace(1, 1/N, N)`` + 0: ``shift <= 0`` shifts them by resolution (the
        dynamic shift of FLUX.1-dev's scheduler), ``shift > 0`` statically (FLUX.1-schnell's scheduler: 1)."""
        from awm_jax.sampling.schedules import flux_grid, flux_image_seq_len, shift_times

        n = int(num_steps)
        if float(shift) <= 0:
            return flux_grid(n, image_seq_len=flux_image_seq_len(latent_shape))
        if n < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return np.concatenate([shift_times(np.linspace(1.0, 1.0 / n, n), float(shift)), [0.0]])


register_family(FluxFamily())
