"""Flax NNX ``QwenImageTransformer2DModel`` (Qwen-Image), numerically equal to diffusers' model.

The network (diffusers 0.42 ``models/transformers/transformer_qwenimage.py``, text-to-image mode):

- ``img_in`` on packed latents ``(B, S, in_channels)`` (2x2 patches, as ``QwenImagePipeline._pack_latents``);
  the text stream ``encoder_hidden_states (B, T, joint_attention_dim)`` goes through ``txt_norm`` (RMSNorm,
  eps 1e-6) and ``txt_in``;
- ``time_text_embed``: ``timestep_embedder(sincos_256(1000 * timestep))`` (``Timesteps(scale=1000)``: the
  model takes ``timestep`` in [0, 1], the pipeline passes ``t / 1000``); no pooled text embedding;
- ``num_layers`` double-stream blocks: per stream ``*_mod.1 = Linear(dim, 6 dim)`` on ``silu(temb)`` gives
  (shift, scale, gate) for attention and for the MLP, LayerNorms without affine, joint attention over
  ``[text, image]`` with RMSNorm q/k norms and an optional key mask from ``encoder_hidden_states_mask``,
  gelu-tanh feed-forwards ``img_mlp`` / ``txt_mlp``;
- MSRoPE (``QwenEmbedRope(theta=10000, scale_rope=True)``): image token ``(f, h, w)`` of a
  ``(frame, height, width)`` grid at frequencies of positions ``(f, h - (height - height // 2),
  w - (width - width // 2))`` (height / width centred: negative positions above / left of the centre),
  text token ``j`` at position ``max(height // 2, width // 2) + j`` on all three axes; frequencies
  ``pos * theta ** (-2i / d_axis)`` in float32 like diffusers' tables, applied to adjacent feature pairs;
- ``norm_out`` (AdaLayerNormContinuous) and ``proj_out``.

Submodules are named exactly like diffusers' (``transformer_blocks.3.img_mod.1``, ``attn.add_q_proj``,
``txt_mlp.net.0.proj``), so the key map (:mod:`awm_jax.convert.qwenimage`) is an identity on prefixes and
LoRA targets are PEFT module names. ``scan_layers=True`` stacks the blocks into
``transformer_block_groups[0]`` (leading parameter axis ``layers``) run with ``nnx.scan``.

Not supported (named errors): ``guidance_embeds`` (diffusers' own forward fails with a guidance), and the
edit / layered variants' ``zero_cond_t``, ``use_additional_t_cond``, ``use_layer3d_rope``. Deviation: where
diffusers warns and uses the first sample's ``img_shapes`` for a batch of different shapes, this raises.
``txt_seq_lens`` (an argument of older diffusers releases, gone in 0.42) is not taken: the text rotary
length is the padded ``T``, as in 0.42.

:class:`QwenImageFamily` (registered as ``"qwenimage"``): samplers see unpacked latents ``(B, 16, h, w)``;
the family packs them 2x2, calls the model with ``timestep = t`` and unpacks the velocity (the model's
output is already ``eps - x0`` in the project's convention, like FLUX). Context = (prompt embeddings
``(B, T, joint_attention_dim)``, their mask ``(B, T)`` float32 in the "pooled" slot).
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
    EPS,
    AdaLayerNormContinuous,
    Attention,
    FeedForward,
    MLPEmbedder,
    block_caller,
    linear,
    make_stack,
    model_context,
    modulate,
    scan_stack,
)
from awm_jax.models.family import ModelFamily, config_from_diffusers, config_to_diffusers, register_family
from awm_jax.models.flux import pack_latents, unpack_latents
from awm_jax.models.layers import LayerNorm, RMSNorm, timestep_embedding
from awm_jax.models.lora import LoRAConfig
from awm_jax.models.stacking import Stack

__all__ = [
    "QWENIMAGE_LORA_TARGETS",
    "QwenImageConfig",
    "QwenImageFamily",
    "QwenImageTransformer2DModel",
    "msrope_tables",
    "stacks",
]

NAME = "QwenImageTransformer2DModel"
ROPE_THETA = 10000.0
BLOCK_LINEARS = (
    "img_mod.1",
    "txt_mod.1",
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)

# Default LoRA targets: the attention projections of both streams and both feed-forwards, the set of verl's
# Flow-GRPO Qwen-Image recipe (verl-project/verl examples/flowgrpo_trainer/run_flowgrpo.sh,
# ``actor_rollout_ref.model.target_modules``); the adaLN modulations, embedders and read-out stay frozen.
QWENIMAGE_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)


@dataclasses.dataclass(frozen=True)
class QwenImageConfig:
    """diffusers ``QwenImageTransformer2DModel`` config (same field names and defaults)."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        for k in (
            "patch_size",
            "in_channels",
            "attention_head_dim",
            "num_attention_heads",
            "joint_attention_dim",
        ):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"QwenImageConfig.{k}={getattr(self, k)!r} must be a positive integer")
        if int(self.num_layers) < 0:
            raise ValueError(f"QwenImageConfig.num_layers={self.num_layers!r} must be >= 0")
        axes = self.axes_dims_rope
        if len(axes) != 3 or any(a <= 0 or a % 2 for a in axes) or sum(axes) != self.attention_head_dim:
            raise ValueError(
                f"QwenImageConfig.axes_dims_rope={axes} must be 3 positive even sizes summing to "
                f"attention_head_dim={self.attention_head_dim}"
            )
        for k in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
            if getattr(self, k):
                raise ValueError(
                    f"QwenImageConfig.{k}=True is not supported (Qwen-Image text-to-image "
                    "models have it False; edit / layered variants are not ported)"
                )

    @property
    def inner_dim(self) -> int:
        """Model width ``num_attention_heads * attention_head_dim``."""
        return int(self.num_attention_heads) * int(self.attention_head_dim)

    @property
    def out_ch(self) -> int:
        """Output channels (diffusers: ``out_channels or in_channels``)."""
        return int(self.out_channels or self.in_channels)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> QwenImageConfig:
        """Build from a diffusers ``config.json`` dict; ``_``-prefixed keys ignored, unknown keys raise."""
        return config_from_diffusers(cls, d, source, NAME)

    def to_dict(self) -> dict[str, Any]:
        """The diffusers-style config dict (lists for tuples)."""
        return config_to_diffusers(self)


def stacks(config: QwenImageConfig) -> tuple[Stack]:
    """The one block stack."""
    n = int(config.num_layers)
    return (Stack("transformer_blocks", "transformer_block_groups", ((0, n),) if n else ()),)


# ---------------------------------------------------------------------------------------------------- MSRoPE


@functools.lru_cache(maxsize=16)
def _inv_freqs(dim: int, theta: float) -> np.ndarray:
    # diffusers QwenEmbedRope.rope_params: 1 / theta ** (arange(0, dim, 2).float() / dim), in float32
    return (
        np.float32(1.0)
        / np.power(np.float32(theta), np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    ).astype(np.float32)


def _axis_angles(pos: np.ndarray, dim: int, theta: float) -> np.ndarray:
    # torch.outer(int index, float32 freqs) -> float32 angles
    return pos.astype(np.float32)[:, None] * _inv_freqs(int(dim), float(theta))[None, :]


@functools.lru_cache(maxsize=64)
def msrope_tables(
    frame: int, height: int, width: int, txt_len: int, axes_dims: tuple[int, ...], theta: float = ROPE_THETA
) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` each ``(txt_len + frame*height*width, head_dim)`` float32 over the joint sequence
    ``[text, image]``: diffusers ``QwenEmbedRope(scale_rope=True)`` for ``video_fhw = (frame, height, width)``
    and ``max_txt_seq_len = txt_len``, every frequency repeated for its (real, imaginary) feature pair."""
    f, h, w = np.meshgrid(
        np.arange(frame),
        np.arange(height) - (height - height // 2),
        np.arange(width) - (width - width // 2),
        indexing="ij",
    )
    img_pos = (f.reshape(-1), h.reshape(-1), w.reshape(-1))
    start = max(height // 2, width // 2)
    txt = np.arange(start, start + txt_len)
    angles = np.concatenate(
        [
            np.concatenate([_axis_angles(txt, d, theta) for d in axes_dims], axis=1),
            np.concatenate([_axis_angles(p, d, theta) for p, d in zip(img_pos, axes_dims)], axis=1),
        ],
        axis=0,
    )
    a64 = angles.astype(np.float64)
    cos = np.repeat(np.cos(a64), 2, axis=1).astype(np.float32)
    sin = np.repeat(np.sin(a64), 2, axis=1).astype(np.float32)
    cos.setflags(write=False)
    sin.setflags(write=False)
    return cos, sin


def _grid(img_shapes, b: int, s: int) -> tuple[int, int, int]:
    """The one ``(frame, height, width)`` of diffusers' ``img_shapes`` (per-sample lists of grids)."""
    if img_shapes is None:
        raise ValueError(
            f"{NAME}: img_shapes is required (per sample [(frame, height, width)] of the packed grid)"
        )
    shapes = list(img_shapes)
    if shapes and isinstance(shapes[0], int | np.integer):  # one bare (f, h, w)
        shapes = [[tuple(shapes)]]
    norm = []
    for one in shapes:
        one = [one] if len(one) and isinstance(one[0], int | np.integer) else list(one)
        if len(one) != 1:
            raise ValueError(
                f"{NAME}: img_shapes entry {one} has {len(one)} grids; only one image per "
                "sample (text-to-image) is supported"
            )
        norm.append(tuple(int(v) for v in one[0]))
    if len(set(norm)) != 1:
        raise ValueError(f"{NAME}: img_shapes {norm} differ across the batch (diffusers would use the first)")
    if len(norm) not in (1, b):
        raise ValueError(f"{NAME}: img_shapes has {len(norm)} entries for batch {b}")
    fhw = norm[0]
    if len(fhw) != 3 or fhw[0] * fhw[1] * fhw[2] != s:
        raise ValueError(
            f"{NAME}: img_shapes grid {fhw} must be (frame, height, width) with "
            f"frame*height*width = {s} image tokens"
        )
    return fhw


# ---------------------------------------------------------------------------------------------------- block


class QwenTimestepProjEmbeddings(nnx.Module):
    """diffusers ``QwenTimestepProjEmbeddings`` (parameters only: ``timestep_embedder``)."""

    def __init__(self, d: int, path: str, ctx: dict):
        self.timestep_embedder = MLPEmbedder(256, d, f"{path}.timestep_embedder", ctx)


class QwenImageTransformerBlock(nnx.Module):
    """diffusers ``QwenImageTransformerBlock`` (double stream, text first in the joint attention)."""

    def __init__(self, config: QwenImageConfig, path: str, ctx: dict):
        d, heads, hd = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.img_mod = nnx.List([None, linear(d, 6 * d, ("embed", "mlp"), f"{path}.img_mod.1", ctx)])
        self.img_norm1 = LayerNorm(d, eps=EPS, elementwise_affine=False, dtype=ctx["dtype"])
        self.attn = Attention(
            d, heads, hd, f"{path}.attn", ctx, qk_norm_kind="rms_norm", joint=True, context_first=True
        )
        self.img_norm2 = LayerNorm(d, eps=EPS, elementwise_affine=False, dtype=ctx["dtype"])
        self.img_mlp = FeedForward(d, f"{path}.img_mlp", ctx)
        self.txt_mod = nnx.List([None, linear(d, 6 * d, ("embed", "mlp"), f"{path}.txt_mod.1", ctx)])
        self.txt_norm1 = LayerNorm(d, eps=EPS, elementwise_affine=False, dtype=ctx["dtype"])
        self.txt_norm2 = LayerNorm(d, eps=EPS, elementwise_affine=False, dtype=ctx["dtype"])
        self.txt_mlp = FeedForward(d, f"{path}.txt_mlp", ctx)

    def __call__(self, hidden_states, encoder_hidden_states, temb, rotary, mask):
        x, c = hidden_states, encoder_hidden_states
        s = jax.nn.silu(temb)
        # (shift, scale, gate) for attention, then for the MLP
        im = jnp.split(self.img_mod[1](s), 6, axis=-1)
        tm = jnp.split(self.txt_mod[1](s), 6, axis=-1)
        ax, ac = self.attn(
            modulate(self.img_norm1(x), im[0], im[1]),
            modulate(self.txt_norm1(c), tm[0], tm[1]),
            rotary=rotary,
            mask=mask,
        )
        x = x + im[2][:, None] * ax
        c = c + tm[2][:, None] * ac
        x = x + im[5][:, None] * self.img_mlp(modulate(self.img_norm2(x), im[3], im[4]))
        c = c + tm[5][:, None] * self.txt_mlp(modulate(self.txt_norm2(c), tm[3], tm[4]))
        if x.dtype == jnp.float16:  # diffusers clips both streams to the float16 range in float16
            x, c = jnp.clip(x, -65504, 65504), jnp.clip(c, -65504, 65504)
        return x, c


def _check_scan_lora(lora: LoRAConfig | None, count: int) -> None:
    if lora is None:
        return
    for m in BLOCK_LINEARS:
        hits = [i for i in range(count) if lora.matches(f"transformer_blocks.{i}.{m}")]
        if hits and len(hits) != count:
            raise ValueError(
                f"LoRA targets adapt transformer_blocks.{{{','.join(map(str, hits))}}}.{m} but not "
                f"all {count} layers; unsupported with scan_layers=True "
                f"(targets: {lora.target_modules})"
            )


# ---------------------------------------------------------------------------------------------------- model


class QwenImageTransformer2DModel(nnx.Module):
    """Flax NNX port of diffusers' ``QwenImageTransformer2DModel`` (see the module docstring)."""

    def __init__(
        self,
        config: QwenImageConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scan_layers: bool = False,
        remat_policy: str = "none",
        lora: LoRAConfig | None = None,
    ):
        config = QwenImageConfig.from_dict(config) if isinstance(config, dict) else config
        ctx = model_context(
            self,
            config,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            scan_layers=scan_layers,
            remat_policy=remat_policy,
            lora=lora,
        )
        d, n = config.inner_dim, int(config.num_layers)
        self.time_text_embed = QwenTimestepProjEmbeddings(d, "time_text_embed", ctx)
        self.txt_norm = RMSNorm(config.joint_attention_dim, eps=EPS, dtype=dtype, param_dtype=param_dtype)
        self.img_in = linear(config.in_channels, d, (None, "embed"), "img_in", ctx)
        self.txt_in = linear(config.joint_attention_dim, d, (None, "embed"), "txt_in", ctx)
        if not scan_layers:
            self.transformer_blocks = nnx.List(
                [QwenImageTransformerBlock(config, f"transformer_blocks.{i}", ctx) for i in range(n)]
            )
            self.transformer_block_groups = None
        else:
            _check_scan_lora(lora, n)
            self.transformer_blocks = None
            self.transformer_block_groups = nnx.List(
                [make_stack(lambda c: QwenImageTransformerBlock(config, "transformer_blocks.0", c), n, ctx)]
                if n
                else []
            )
        self.norm_out = AdaLayerNormContinuous(d, "norm_out", ctx)
        self.proj_out = linear(d, config.patch_size**2 * config.out_ch, ("embed", None), "proj_out", ctx)

    def __call__(
        self,
        hidden_states,
        encoder_hidden_states=None,
        encoder_hidden_states_mask=None,
        timestep=None,
        img_shapes=None,
        guidance=None,
    ) -> jax.Array:
        """``(B, S, in_channels)`` packed latents, ``(B, T, joint_attention_dim)`` text, optional mask
        ``(B, T)`` (1 / True: a real token), ``timestep (B,)`` in [0, 1], ``img_shapes`` (per sample
        ``[(frame, height, width)]`` of the packed grid) -> ``(B, S, patch^2 * out_channels)`` in the compute
        dtype."""
        cfg, dtype = self.config, self.dtype
        if guidance is not None:
            raise ValueError(f"{NAME}: guidance is not supported (guidance_embeds=False models only)")
        if encoder_hidden_states is None or timestep is None:
            raise ValueError(f"{NAME}: encoder_hidden_states and timestep are required")
        x, ctx = jnp.asarray(hidden_states), jnp.asarray(encoder_hidden_states)
        if x.ndim != 3 or x.shape[2] != cfg.in_channels:
            raise ValueError(
                f"{NAME}: hidden_states shape {x.shape} must be (B, S, {cfg.in_channels}) (packed latents)"
            )
        b, s = x.shape[:2]
        if ctx.ndim != 3 or ctx.shape[0] != b or ctx.shape[2] != cfg.joint_attention_dim:
            raise ValueError(
                f"{NAME}: encoder_hidden_states shape {ctx.shape} must be ({b}, T, {cfg.joint_attention_dim})"
            )
        t_len = ctx.shape[1]
        mask = None
        if encoder_hidden_states_mask is not None:
            m = jnp.asarray(encoder_hidden_states_mask)
            if m.shape != (b, t_len):
                raise ValueError(f"{NAME}: encoder_hidden_states_mask shape {m.shape} must be ({b}, {t_len})")
            mask = jnp.concatenate([m.astype(bool), jnp.ones((b, s), bool)], axis=1)
        t = jnp.asarray(timestep, jnp.float32)
        t = jnp.broadcast_to(t, (b,)) if t.ndim == 0 else t
        if t.shape != (b,):
            raise ValueError(f"{NAME}: timestep shape {t.shape} must be ({b},) or a scalar")
        frame, height, width = _grid(img_shapes, b, s)
        rotary = tuple(jnp.asarray(a) for a in msrope_tables(frame, height, width, t_len, cfg.axes_dims_rope))

        x = self.img_in(x.astype(dtype))
        # diffusers: timestep.to(hidden_states.dtype), then Timesteps(scale=1000) in float32
        emb = timestep_embedding(
            t.astype(x.dtype), 256, flip_sin_to_cos=True, downscale_freq_shift=0.0, scale=1000.0
        )
        temb = self.time_text_embed.timestep_embedder(emb.astype(x.dtype))
        c = self.txt_in(self.txt_norm(ctx.astype(dtype)))
        if not self.scan_layers:
            call = block_caller(self.remat_policy)
            for block in self.transformer_blocks:
                x, c = call(block, x, c, temb, rotary, mask)
        else:
            for group in self.transformer_block_groups:
                x, c = scan_stack(group, (x, c), temb, rotary, mask, policy=self.remat_policy)
        return self.proj_out(self.norm_out(x, temb))


# ---------------------------------------------------------------------------------------------------- family


def _arch() -> dict:
    return dict(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=60,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    )


class QwenImageFamily(ModelFamily):
    """Qwen-Image (``model.kind = "qwenimage"``): diffusers ``QwenImagePipeline`` folders.

    The samplers see unpacked latents ``(B, out_channels, H/8, W/8)`` (the pipeline's frame axis dropped);
    :meth:`velocity` packs them 2x2 (``QwenImagePipeline._pack_latents``), passes
    ``img_shapes = [(1, h/2, w/2)]`` and ``timestep = t`` (the pipeline's ``sigma * 1000 / 1000``), and
    unpacks.
    Context = (prompt embeddings ``(B, T, joint_attention_dim)``, mask ``(B, T)`` float32). Grid: the
    pipeline's sigmas ``linspace(1, 1/N, N)`` with the resolution-dependent dynamic shift (``shift <= 0``) or
    a static shift.
    """

    name = "qwenimage"
    model_class = QwenImageTransformer2DModel
    converter = "qwenimage"
    class_names = (NAME,)
    lora_targets = QWENIMAGE_LORA_TARGETS
    architectures = {"qwen-image": _arch()}
    vae_scale_factor = 8
    pipeline_loader = "awm_jax.pipelines.qwenimage:load_qwenimage_pipeline"
    sample_loader = "awm_jax.pipelines.qwenimage:sample_pipeline"
    default_config = "qwenimage_geneval.py"

    def sample_flag_problems(self, args):
        no_t5 = "--no-t5 is an SD3 option: Qwen-Image has one text encoder (Qwen2.5-VL)"
        return [no_t5] if args.no_t5 else []

    def config_from_dict(self, d, source="config"):
        return QwenImageConfig.from_dict(dict(d), source=source)

    def stacks(self, cfg):
        return stacks(cfg)

    def context_shape(self, config, cfg):
        """``(T, joint_attention_dim, T)``: the text mask ``(B, T)`` rides in the "pooled" slot."""
        t = self.text_tokens(config)
        return t, int(cfg.joint_attention_dim), t

    def velocity(self, model, x, t, context):
        """``v(x, t)`` float32 on unpacked latents ``x (B, C, h, w)``, ``t (B,)`` in [0, 1]."""
        cfg = model.config
        emb, mask = context
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[1] * 4 != cfg.in_channels or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(
                f"Qwen-Image velocity: latents shape {x.shape} must be "
                f"(B, {cfg.in_channels // 4}, h, w) with even h, w"
            )
        if cfg.patch_size != 2 or cfg.out_ch * 4 != cfg.in_channels:
            raise ValueError(
                f"Qwen-Image velocity: needs patch_size=2 and 4 * out_channels = in_channels, got "
                f"patch_size={cfg.patch_size}, out_channels={cfg.out_ch}, in={cfg.in_channels}"
            )
        b, _, h, w = x.shape
        m = None if mask is None else jnp.asarray(mask) > 0.5
        out = model(
            hidden_states=pack_latents(x),
            encoder_hidden_states=emb,
            encoder_hidden_states_mask=m,
            timestep=jnp.asarray(t, jnp.float32),
            img_shapes=[(1, h // 2, w // 2)] * b,
        )
        return unpack_latents(out, h, w).astype(jnp.float32)

    def latent_shape(self, cfg, height, width):
        height, width = int(height), int(width)
        m = 2 * self.vae_scale_factor
        if height % m or width % m:
            raise ValueError(
                f"Qwen-Image: image size {height}x{width} must be a multiple of {m} "
                "(VAE factor 8 times the 2x2 latent packing)"
            )
        f = self.vae_scale_factor
        return (int(cfg.in_channels) // 4, height // f, width // f)

    def time_grid(self, num_steps, shift, latent_shape):
        """QwenImagePipeline's sigmas ``linspace(1, 1/N, N)`` + 0 through Qwen-Image's scheduler:
        ``shift <= 0`` the dynamic exponential shift (:data:`SCHEDULER`: ``mu`` linear in the packed token
        count over 256..8192 from 0.5 to 0.9) then the stretch to ``shift_terminal = 0.02``; ``shift > 0`` a
        static shift (then the same stretch)."""
        return qwenimage_grid(int(num_steps), (int(latent_shape[1]) // 2) * (int(latent_shape[2]) // 2),
                              None if float(shift) <= 0 else float(shift))


# Qwen-Image's FlowMatchEulerDiscreteScheduler settings (Qwen/Qwen-Image scheduler/scheduler_config.json)
SCHEDULER = dict(base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9,
                 shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)


def qwenimage_grid(num_steps: int, image_seq_len: int, shift: float | None = None,
                   scheduler: dict | None = None) -> np.ndarray:
    """``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/N, N), mu=calculate_shift(...))``
    with the Qwen-Image settings (``scheduler`` overrides them): float32 like diffusers, then 0 appended.
    ``shift``: None = dynamic shift, else a static shift."""
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    c = {**SCHEDULER, **(scheduler or {})}
    n = int(num_steps)
    sig = np.linspace(1.0, 1.0 / n, n).astype(np.float32)
    if shift is None:
        m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
        mu = image_seq_len * m + (c["base_shift"] - m * c["base_image_seq_len"])
        sig = (np.float32(np.exp(mu)) / (np.float32(np.exp(mu)) + (1 / sig - 1))).astype(np.float32)
    else:
        sig = (shift * sig / (1 + (shift - 1) * sig)).astype(np.float32)
    if c.get("shift_terminal"):
        one_minus = 1 - sig
        sig = (1 - one_minus / (one_minus[-1] / (1 - c["shift_terminal"]))).astype(np.float32)
    return np.concatenate([sig.astype(np.float64), [0.0]])


register_family(QwenImageFamily())
