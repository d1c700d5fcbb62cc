"""Flax NNX ``QwenImageTransformer2DModel`` (Qwen-Image, 20B), numerically equal to diffusers' model.

The network (diffusers 0.42 ``transformers/transformer_qwenimage.py``, text-to-image: no ``zero_cond_t``,
no additional t-cond, no layer-3D RoPE): ``img_in`` on 2x2-packed latents, ``txt_norm`` (RMSNorm) +
``txt_in`` on the Qwen2.5-VL hidden states, the time embedding ``time_text_embed.timestep_embedder`` on the
``[cos, sin]`` sinusoid of ``1000 t``, ``num_layers`` double-stream blocks (adaLN-Zero ``img_mod`` /
``txt_mod`` = ``Sequential(SiLU, Linear(dim, 6 dim))`` on the time embedding, joint attention over
``[text, image]`` with RMSNorm q/k norms, separate gelu-tanh feed-forwards ``img_mlp`` / ``txt_mlp``), the
final AdaLayerNormContinuous ``norm_out`` and ``proj_out``.

**MSRoPE** (``QwenEmbedRope(theta=10000, scale_rope=True)``): image token ``(f, i, j)`` of an ``F x h x w``
token grid sits at ``(f, i - (h - h // 2), j - (w - w // 2))`` (rows and columns centred), text token ``l``
at ``(m + l, m + l, m + l)`` with ``m = max(h // 2, w // 2)``; frequencies ``1 / 10000^(2k / d_axis)`` per
axis (``axes_dims_rope``), formed in float32 like diffusers. ``encoder_hidden_states_mask`` masks padded text
keys (the rotary positions still count the padded length, as in diffusers).

Submodules are named like diffusers' (``transformer_blocks.3.attn.add_q_proj``, ``transformer_blocks.0.
img_mlp.net.0.proj``) except the adaLN linears ``img_mod.1`` / ``txt_mod.1``, which are the shared
``AdaLayerNormZero``'s ``img_mod.linear`` / ``txt_mod.linear`` here (the key map renames them).
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
    EPS,
    AdaLayerNormContinuous,
    AdaLayerNormZero,
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
from awm_jax.models.layers import RMSNorm, timestep_embedding
from awm_jax.models.lora import LoRAConfig
from awm_jax.models.stacking import Stack

__all__ = ["QWENIMAGE_LORA_TARGETS", "QwenImageConfig", "QwenImageFamily", "QwenImageTransformer2DModel",
           "rope_tables", "stacks"]

NAME = "QwenImageTransformer2DModel"
ROPE_THETA = 10000.0
BLOCK_LINEARS = ("img_mod.linear", "txt_mod.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
                 "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out",
                 "img_mlp.net.0.proj",
                 "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
# Flow-GRPO's Qwen-Image LoRA targets (scripts/train_qwenimage.py: attention q/k/v/out of both streams and
# both feed-forwards), which are also diffusers' Qwen-Image LoRA training example's
QWENIMAGE_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                          "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj",
                          "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")


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
        for k in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
            if getattr(self, k):
                raise ValueError(f"QwenImageConfig.{k}=True (an edit / layered variant) is not supported")
        for k in ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
                  "joint_attention_dim"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"QwenImageConfig.{k}={getattr(self, k)!r} must be a positive integer")
        if int(self.num_layers) < 0:
            raise ValueError(f"QwenImageConfig.num_layers={self.num_layers!r} must be >= 0")
        axes = self.axes_dims_rope
        if len(axes) != 3 or any(a <= 0 or a % 2 for a in axes) or sum(axes) != self.attention_head_dim:
            raise ValueError(f"QwenImageConfig.axes_dims_rope={axes} must be 3 positive even sizes summing "
                             f"to attention_head_dim={self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return int(self.num_attention_heads) * int(self.attention_head_dim)

    @property
    def out_ch(self) -> int:
        return int(self.out_channels or self.in_channels)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> QwenImageConfig:
        return config_from_diffusers(cls, d, source, NAME)

    def to_dict(self) -> dict[str, Any]:
        return config_to_diffusers(self)


def stacks(config: QwenImageConfig) -> tuple[Stack]:
    """The one block stack."""
    n = int(config.num_layers)
    return (Stack("transformer_blocks", "transformer_block_groups", ((0, n),) if n else ()),)


# ---------------------------------------------------------------------------------------------------- MSRoPE


@functools.lru_cache(maxsize=16)
def _freqs(dim: int) -> np.ndarray:
    # diffusers: 1 / torch.pow(theta, arange(0, dim, 2).float() / dim), in float32
    expo = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(ROPE_THETA), expo)).astype(np.float32)


def _axis(pos: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    ang = (pos.astype(np.float32)[:, None] * _freqs(dim)[None]).astype(np.float32)
    return (np.repeat(np.cos(ang.astype(np.float64)).astype(np.float32), 2, axis=1),
            np.repeat(np.sin(ang.astype(np.float64)).astype(np.float32), 2, axis=1))


@functools.lru_cache(maxsize=32)
def rope_tables(grid: tuple[int, int, int], text_len: int, axes: tuple[int, ...]):
    """``(cos, sin)`` each ``(text_len + F h w, head_dim)`` float32 over the joint ``[text, image]`` sequence
    for an ``(F, h, w)`` token grid (diffusers ``QwenEmbedRope(scale_rope=True)``)."""
    f, h, w = grid
    fi, hi, wi = np.meshgrid(np.arange(f), np.arange(h) - (h - h // 2), np.arange(w) - (w - w // 2),
                             indexing="ij")
    img = [fi.reshape(-1), hi.reshape(-1), wi.reshape(-1)]
    txt = np.arange(text_len) + max(h // 2, w // 2)
    cos, sin = [], []
    for pos_img, d in zip(img, axes):
        c_img, s_img = _axis(pos_img, d)
        c_txt, s_txt = _axis(txt, d)
        cos.append(np.concatenate([c_txt, c_img]))
        sin.append(np.concatenate([s_txt, s_img]))
    return np.concatenate(cos, axis=1), np.concatenate(sin, axis=1)


# ---------------------------------------------------------------------------------------------------- blocks


class QwenImageTransformerBlock(nnx.Module):
    """diffusers ``QwenImageTransformerBlock``: double-stream block, text tokens first in attention."""

    def __init__(self, config: QwenImageConfig, path: str, ctx: dict):
        d = config.inner_dim
        self.img_mod = AdaLayerNormZero(d, ADALN_ZERO, f"{path}.img_mod", ctx)
        self.txt_mod = AdaLayerNormZero(d, ADALN_ZERO, f"{path}.txt_mod", ctx)
        self.attn = Attention(d, config.num_attention_heads, config.attention_head_dim, f"{path}.attn", ctx,
                              qk_norm_kind="rms_norm", joint=True, context_first=True)
        self.img_mlp = FeedForward(d, f"{path}.img_mlp", ctx)
        self.txt_mlp = FeedForward(d, f"{path}.txt_mlp", ctx)

    def __call__(self, x, c, temb, rotary, mask):
        nx, _, m = self.img_mod(x, temb)
        nc, _, cm = self.txt_mod(c, temb)
        img_attn, txt_attn = self.attn(nx, nc, rotary=rotary, mask=mask)
        x = x + m.gate_msa[:, None] * img_attn
        c = c + cm.gate_msa[:, None] * txt_attn
        # norm2 is the same parameter-free LayerNorm as norm1 (eps 1e-6)
        x = x + m.gate_mlp[:, None] * self.img_mlp(modulate(self.img_mod.norm(x), m.shift_mlp, m.scale_mlp))
        nc2 = modulate(self.txt_mod.norm(c), cm.shift_mlp, cm.scale_mlp)
        c = c + cm.gate_mlp[:, None] * self.txt_mlp(nc2)
        return x, c


class QwenImageTransformer2DModel(nnx.Module):
    """Flax NNX port of diffusers' ``QwenImageTransformer2DModel`` (see the module docstring)."""

    def __init__(self, config: QwenImageConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 scan_layers: bool = False, remat_policy: str = "none", lora: LoRAConfig | None = None):
        config = QwenImageConfig.from_dict(config) if isinstance(config, dict) else config
        ctx = model_context(self, config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                            scan_layers=scan_layers, remat_policy=remat_policy, lora=lora)
        d = config.inner_dim
        self.img_in = linear(config.in_channels, d, (None, "embed"), "img_in", ctx)
        self.txt_norm = RMSNorm(config.joint_attention_dim, eps=EPS, dtype=dtype, param_dtype=param_dtype)
        self.txt_in = linear(config.joint_attention_dim, d, (None, "embed"), "txt_in", ctx)
        self.time_text_embed = nnx.Dict({"timestep_embedder": MLPEmbedder(
            256, d, "time_text_embed.timestep_embedder", ctx)})
        n = int(config.num_layers)
        if not scan_layers:
            self.transformer_blocks = nnx.List([
                QwenImageTransformerBlock(config, f"transformer_blocks.{i}", ctx) for i in range(n)])
            self.transformer_block_groups = None
        else:
            _check_scan_lora(lora, n)
            self.transformer_blocks = None
            self.transformer_block_groups = nnx.List(
                [make_stack(lambda c: QwenImageTransformerBlock(config, "transformer_blocks.0", c), n, ctx)]
                if n else [])
        self.norm_out = AdaLayerNormContinuous(d, "norm_out", ctx)
        self.proj_out = linear(d, config.patch_size ** 2 * config.out_ch, ("embed", None), "proj_out", ctx)

    def __call__(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 timestep=None, img_shapes=None) -> jax.Array:
        """``(B, S, in_channels)`` packed latents, ``(B, T, joint_attention_dim)`` text states, optional
        ``(B, T)`` text mask, ``timestep (B,)`` in [0, 1] (the pipeline's ``t / 1000``; scaled by 1000 here
        like diffusers), ``img_shapes`` ``[(F, h, w)]`` (or one per sample, all equal) of the token grid ->
        ``(B, S, patch^2 * out_channels)`` in the compute dtype."""
        cfg, dtype = self.config, self.dtype
        x, c, mask, t, grid = _check_inputs(cfg, hidden_states, encoder_hidden_states,
                                            encoder_hidden_states_mask, timestep, img_shapes)
        x = self.img_in(x.astype(dtype))
        c = self.txt_in(self.txt_norm(c.astype(dtype)))
        emb = timestep_embedding(t * 1000.0, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0)
        temb = self.time_text_embed["timestep_embedder"](emb.astype(x.dtype))
        cos, sin = rope_tables(grid, c.shape[1], cfg.axes_dims_rope)
        rotary = (jnp.asarray(cos), jnp.asarray(sin))
        joint_mask = None if mask is None else jnp.concatenate([mask, jnp.ones(x.shape[:2], bool)], axis=1)
        if not self.scan_layers:
            call = block_caller(self.remat_policy)
            for block in self.transformer_blocks:
                x, c = call(block, x, c, temb, rotary, joint_mask)
        else:
            for group in self.transformer_block_groups:
                x, c = scan_stack(group, (x, c), temb, rotary, joint_mask, policy=self.remat_policy)
        return self.proj_out(self.norm_out(x, temb))


def _check_scan_lora(lora: LoRAConfig | None, count: int) -> None:
    if lora is None:
        return
    for m in BLOCK_LINEARS:
        hits = [i for i in range(count) if lora.matches(f"transformer_blocks.{i}.{m}")]
        if hits and len(hits) != count:
            raise ValueError(f"LoRA targets adapt transformer_blocks.{{{','.join(map(str, hits))}}}.{m} but "
                             f"not all {count} layers; unsupported with scan_layers=True")


def _check_inputs(cfg: QwenImageConfig, x, c, mask, t, img_shapes):
    for name, v in (("encoder_hidden_states", c), ("timestep", t), ("img_shapes", img_shapes)):
        if v is None:
            raise ValueError(f"{NAME}: {name} is required")
    x, c = jnp.asarray(x), jnp.asarray(c)
    if x.ndim != 3 or x.shape[2] != cfg.in_channels:
        raise ValueError(f"{NAME}: hidden_states shape {x.shape} must be (B, S, {cfg.in_channels})")
    b, s = x.shape[:2]
    if c.ndim != 3 or c.shape[0] != b or c.shape[2] != cfg.joint_attention_dim:
        raise ValueError(f"{NAME}: encoder_hidden_states shape {c.shape} must be ({b}, T, "
                         f"{cfg.joint_attention_dim})")
    shapes = list(img_shapes)
    nested = shapes and isinstance(shapes[0], (list, tuple)) and shapes[0]
    if nested and isinstance(shapes[0][0], (list, tuple)):
        shapes = [s_[0] for s_ in shapes]  # [[(F, h, w)], ...] (diffusers' per-sample lists)
    grids = {tuple(int(v) for v in g) for g in (shapes if isinstance(shapes[0], (list, tuple)) else [shapes])}
    if len(grids) != 1:
        raise ValueError(f"{NAME}: img_shapes {img_shapes} differ between samples (unsupported, as in "
                         "diffusers)")
    grid = grids.pop()
    if len(grid) != 3 or grid[0] * grid[1] * grid[2] != s:
        raise ValueError(f"{NAME}: img_shapes grid {grid} does not have the {s} tokens of hidden_states")
    if mask is not None:
        mask = jnp.asarray(mask).astype(bool)
        if mask.shape != c.shape[:2]:
            raise ValueError(f"{NAME}: encoder_hidden_states_mask shape {mask.shape} must be {c.shape[:2]}")
    t = jnp.asarray(t, jnp.float32)
    t = jnp.broadcast_to(t, (b,)) if t.ndim == 0 else t
    if t.shape != (b,):
        raise ValueError(f"{NAME}: timestep shape {t.shape} must be ({b},) or a scalar")
    return x, c, mask, t, grid


# ---------------------------------------------------------------------------------------------------- family


class QwenImageFamily(ModelFamily):
    """Qwen-Image (``model.kind = "qwenimage"``): the transformer, its key map and velocity (the pipeline --
    Qwen2.5-VL text encoder, the causal-3D VAE -- is not ported yet: ``load_pipeline`` raises).

    The samplers see unpacked latents ``(B, out_channels, h, w)``; :meth:`velocity` packs them 2x2 (like
    FLUX), calls the model with ``timestep = t`` and the ``(1, h/2, w/2)`` grid, and unpacks. Context =
    (text states ``(B, T, joint_attention_dim)``, their mask ``(B, T)`` float32)."""

    name = "qwenimage"
    model_class = QwenImageTransformer2DModel
    converter = "qwenimage"
    class_names = (NAME,)
    lora_targets = QWENIMAGE_LORA_TARGETS
    architectures = {"qwen-image": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                                        attention_head_dim=128, num_attention_heads=24,
                                        joint_attention_dim=3584,
                                        axes_dims_rope=(16, 56, 56))}
    vae_scale_factor = 8

    def config_from_dict(self, d, source="config"):
        return QwenImageConfig.from_dict(dict(d), source=source)

    def stacks(self, cfg):
        return stacks(cfg)

    def velocity(self, model, x, t, context):
        from awm_jax.models.flux import pack_latents, unpack_latents

        emb, mask = context
        cfg = model.config
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[1] * 4 != cfg.in_channels or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"Qwen-Image velocity: latents shape {x.shape} must be "
                             f"(B, {cfg.in_channels // 4}, h, w) with even h, w")
        b, _, h, w = x.shape
        out = model(pack_latents(x), encoder_hidden_states=emb,
                    encoder_hidden_states_mask=jnp.asarray(mask) > 0.5,
                    timestep=jnp.asarray(t, jnp.float32), img_shapes=[(1, h // 2, w // 2)])
        return unpack_latents(out, h, w).astype(jnp.float32)

    def context_shape(self, config, cfg):
        """``(T, joint_attention_dim, T)``: the caption mask rides in the pooled slot."""
        t = self.text_tokens(config)
        return t, int(cfg.joint_attention_dim), t

    def latent_shape(self, cfg, height, width):
        height, width = int(height), int(width)
        if height % 16 or width % 16:
            raise ValueError(f"Qwen-Image: image size {height}x{width} must be a multiple of 16")
        return (int(cfg.in_channels) // 4, height // 8, width // 8)


register_family(QwenImageFamily())
