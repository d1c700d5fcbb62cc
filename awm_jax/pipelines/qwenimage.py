"""The Qwen-Image pipeline: host Qwen2.5-VL encoder + Flax Qwen-Image transformer + Flax Qwen-Image VAE, Euler
ODE sampling with true CFG as diffusers' ``QwenImagePipeline`` (0.42) does it.

``load_qwenimage(pipeline_dir)`` returns a :class:`QwenImageT2IPipeline` fulfilling the trainer's pipeline
contract (``text_encoder.encode``, ``transformer``, ``decode``, ``latent_shape``). Latents ``(B, 16, H/8,
W/8)`` (the pipeline's frame axis dropped; packed 2x2 inside the family's velocity). Grid:
:func:`awm_jax.models.qwenimage.qwenimage_grid` (the scheduler's dynamic exponential shift and
``shift_terminal`` stretch; the scheduler config is checked against it). Decoding: ``latents * std + mean``,
the causal VAE on one frame, ``VaeImageProcessor.postprocess``.

**True CFG** (``QwenImagePipeline.__call__``, ``true_cfg_scale > 1`` with a negative prompt):
``comb = v_neg + s (v_pos - v_neg)`` rescaled per packed token to the norm of ``v_pos``
(``comb * ||v_pos|| / ||comb||`` over the 64 features of each 2x2 patch). :meth:`sample_latents` reproduces
it; the trainer's rollouts use the project's plain CFG (``sample.guidance_scale``), not the norm rescale.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awm_jax.pipelines.base import (
    T2IPipeline,
    check_text_encoder_paths,
    load_config_transformer,
    model_section,
    pipeline_problems,
    pipeline_root,
)

__all__ = ["QwenImageT2IPipeline", "load_qwenimage", "load_qwenimage_pipeline", "true_cfg"]

DEFAULT_SIZE = 1024  # QwenImagePipeline: default_sample_size 128 * vae_scale_factor 8
TEXT_SUBFOLDERS = ("text_encoder",)


def true_cfg(v_pos, v_neg, scale: float):
    """QwenImagePipeline's true CFG on unpacked velocities ``(B, C, h, w)``: ``neg + s (pos - neg)`` rescaled
    so every packed token (2x2 patch, all channels) keeps the norm of ``pos``."""
    from awm_jax.models.flux import pack_latents, unpack_latents

    h, w = v_pos.shape[2:]
    pos, neg = pack_latents(v_pos), pack_latents(v_neg)
    comb = neg + scale * (pos - neg)
    comb = comb * (
        jnp.linalg.norm(pos, axis=-1, keepdims=True) / jnp.linalg.norm(comb, axis=-1, keepdims=True)
    )
    return unpack_latents(comb, h, w)


def _scheduler_settings(root: pathlib.Path) -> float | None:
    """None (dynamic shift) or the static shift of ``root/scheduler``; other settings must be Qwen-Image's."""
    from awm_jax.models.qwenimage import SCHEDULER
    from awm_jax.text.hf import read_json

    path = root / "scheduler" / "scheduler_config.json"
    if not path.exists():
        return None
    cfg = read_json(path)
    keys = [k for k in SCHEDULER if k != "use_dynamic_shifting"]
    if not cfg.get("use_dynamic_shifting", False):
        keys = ["shift_terminal"]
    for k in keys:
        if k in cfg and cfg[k] != SCHEDULER[k]:
            raise ValueError(f"{path}: {k} = {cfg[k]!r}; the Qwen-Image grid assumes {SCHEDULER[k]!r}")
    for k, want in (
        ("invert_sigmas", False),
        ("use_karras_sigmas", False),
        ("use_exponential_sigmas", False),
        ("use_beta_sigmas", False),
        ("stochastic_sampling", False),
    ):
        if cfg.get(k, want) != want:
            raise ValueError(f"{path}: {k} = {cfg[k]!r} is not supported by the Qwen-Image pipeline")
    return None if cfg.get("use_dynamic_shifting", False) else float(cfg.get("shift", 1.0))


@dataclasses.dataclass
class QwenImageT2IPipeline(T2IPipeline):
    """Qwen-Image pipeline components and sampling (see the module docstring)."""

    shift: float | None = None

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.spatial_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent: ``(in_channels / 4, H / 8, W / 8)``."""
        return tuple(self.family.latent_shape(self.transformer.config, self.height, self.width))

    def time_grid(self, num_steps: int) -> np.ndarray:
        return self.family.time_grid(num_steps, 0.0 if self.shift is None else self.shift, self.latent_shape)

    def decode(self, latents):
        """Model-space latents (B, C, h, w) -> uint8 images (B, H, W, 3) (jitted)."""
        if self._decode_fn is None:
            graphdef, state = nnx.split(self.vae)
            fn = jax.jit(lambda s, z: _decode(nnx.merge(graphdef, s), z))
            self._decode_fn = lambda z: fn(state, z)
        return self._decode_fn(latents)

    def decode_pure(self, vae_state, latents):
        return _decode(nnx.merge(nnx.graphdef(self.vae), vae_state), latents)

    def velocity_fn(self, true_cfg_scale: float = 1.0) -> Callable:
        """``velocity_fn(x, t, context)``: ``true_cfg_scale > 1``: ``context = (state, (cond, neg))`` and
        :func:`true_cfg`; else ``context = (state, cond)``. Cached per value."""
        s = float(true_cfg_scale)

        def make(model):
            if s <= 1:
                return lambda x, t, context: model(context[0], x, t, context[1])

            def velocity(x, t, context):
                state, (cond, neg) = context
                return true_cfg(model(state, x, t, cond), model(state, x, t, neg), s)

            return velocity

        return self._cached_velocity(("true_cfg", s), make)

    def sample_latents(
        self,
        prompts: Sequence[str],
        *,
        num_steps: int = 50,
        true_cfg_scale: float = 4.0,
        negative_prompt: str | Sequence[str] | None = None,
        key: jax.Array | None = None,
        latents: jax.Array | None = None,
        guidance_scale: float | None = None,
    ) -> jax.Array:
        """Euler ODE sampling -> final model-space latents (B, C, h, w) float32. As QwenImagePipeline, CFG
        runs only with ``true_cfg_scale > 1`` and a negative prompt (``" "`` enables it). ``guidance_scale``
        (the other pipelines' name, used by ``awm_jax.sample``) overrides ``true_cfg_scale``."""
        if guidance_scale is not None:
            true_cfg_scale = guidance_scale
        from awm_jax.sampling import sample_ode

        prompts = list(prompts)
        latents = self.initial_latents(len(prompts), key, latents)
        cond = self.encode(prompts)
        scale = float(true_cfg_scale) if negative_prompt is not None else 1.0
        if scale > 1:
            neg = (
                [negative_prompt] * len(prompts)
                if isinstance(negative_prompt, str)
                else list(negative_prompt)
            )
            if len(neg) != len(prompts):
                raise ValueError(f"{len(neg)} negative prompts for {len(prompts)} prompts")
            cond = (cond, self.encode(neg))
        context = (nnx.state(self.transformer), cond)
        return sample_ode(self.velocity_fn(scale), latents, self.time_grid(num_steps), context)


def _decode(vae, latents):
    from awm_jax.models.qwenimage_vae import latents_to_images_uint8

    return latents_to_images_uint8(vae, latents)


def assemble_qwenimage(
    root: pathlib.Path,
    transformer: nnx.Module,
    vae: Any,
    text_encoder: Any,
    height: int | None,
    width: int | None,
) -> QwenImageT2IPipeline:
    """A :class:`QwenImageT2IPipeline` from loaded parts (channels, VAE factor, image size and the scheduler
    settings of ``root/scheduler`` checked)."""
    from awm_jax.models.family import family_of, get_family

    fam = get_family("qwenimage")
    if family_of(transformer) is not fam:
        raise ValueError(f"{root}: the transformer is a {type(transformer).__name__}, not a Qwen-Image model")
    cfg = transformer.config
    if cfg.in_channels != 4 * vae.config.z_dim:
        raise ValueError(
            f"{root}: transformer in_channels {cfg.in_channels} != 4 x VAE z_dim {vae.config.z_dim}"
        )
    if vae.config.spatial_factor != fam.vae_scale_factor:
        raise ValueError(
            f"{root}: the VAE downsamples by {vae.config.spatial_factor}; Qwen-Image needs "
            f"{fam.vae_scale_factor}"
        )
    height, width = int(height or DEFAULT_SIZE), int(width or DEFAULT_SIZE)
    fam.latent_shape(cfg, height, width)  # validates the size (multiple of 16)
    return QwenImageT2IPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        height=height,
        width=width,
        shift=_scheduler_settings(root),
    )


def load_qwenimage(
    pipeline_dir: str | pathlib.Path,
    *,
    height: int | None = None,
    width: int | None = None,
    dtype: Any = None,
    max_sequence_length: int = 512,
    text_encoder: Any = None,
    **transformer_kwargs: Any,
) -> QwenImageT2IPipeline:
    """Load a diffusers Qwen-Image pipeline folder (transformer / VAE may be converted Flax folders)."""
    from awm_jax.models import load_transformer
    from awm_jax.models.qwenimage_vae import load_qwenimage_vae

    root = pathlib.Path(pipeline_dir)
    if not (root / "model_index.json").exists():
        raise FileNotFoundError(f"{root}: not a diffusers pipeline folder (no model_index.json)")
    transformer = load_transformer(root, dtype=dtype, family="qwenimage", **transformer_kwargs)
    vae = load_qwenimage_vae(root, dtype=dtype)
    if text_encoder is None:
        from awm_jax.text.qwenimage import QwenImageTextEncoder

        text_encoder = QwenImageTextEncoder.from_pipeline_dir(root, max_sequence_length=max_sequence_length)
    return assemble_qwenimage(root, transformer, vae, text_encoder, height, width)


def input_problems(config) -> list[str]:
    """What :func:`load_qwenimage_pipeline` would find missing, without loading anything (pre-flight)."""
    return pipeline_problems(config.model, "Qwen-Image", TEXT_SUBFOLDERS, ("tokenizer",))


def load_qwenimage_pipeline(config, mesh=None) -> QwenImageT2IPipeline:
    """The trainer's entry: a :class:`QwenImageT2IPipeline` from ``config.model`` (``path``, ``vae_path``,
    ``text_encoder_paths``, ``resolution``, ``dtype``, ``param_dtype``, ``max_sequence_length``,
    ``scan_layers``, ``remat_policy``); ``mesh``: the transformer is loaded straight onto it."""
    from awm_jax.models.qwenimage_vae import load_qwenimage_vae
    from awm_jax.text.qwenimage import QwenImageTextEncoder

    m = model_section(config)
    root = pipeline_root(m.path, "Qwen-Image")
    check_text_encoder_paths(root, m.text_encoder_paths, TEXT_SUBFOLDERS)
    transformer = load_config_transformer(m, "qwenimage", mesh)
    vae = load_qwenimage_vae(m.vae_path or root)
    text = QwenImageTextEncoder.from_pipeline_dir(root, max_sequence_length=int(m.max_sequence_length))
    return assemble_qwenimage(root, transformer, vae, text, m.resolution, m.resolution)


def sample_pipeline(args, dtype) -> tuple[QwenImageT2IPipeline, dict]:
    """``python -m awm_jax.sample --model DIR`` (``ModelFamily.sample_pipeline``): QwenImagePipeline's 50
    steps and true CFG 4, which it applies only with a negative prompt (none by default: no CFG)."""
    pipe = load_qwenimage(args.model, height=args.height, width=args.width, dtype=dtype,
                          max_sequence_length=args.max_sequence_length or 512)
    return pipe, dict(num_steps=args.steps or 50, true_cfg_scale=args.guidance_scale or 4.0,
                      negative_prompt=args.negative_prompt or None)
