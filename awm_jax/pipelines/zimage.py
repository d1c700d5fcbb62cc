"""The Z-Image pipeline: host Qwen3 encoder + Flax Z-Image transformer + the FLUX-style Flax VAE, Euler ODE
sampling as diffusers' ``ZImagePipeline`` does it.

``load_zimage(pipeline_dir)`` returns a :class:`ZImageT2IPipeline` fulfilling the trainer's pipeline contract
(``text_encoder.encode``, ``transformer``, ``decode``, ``latent_shape``). Latents ``(B, 16, H/8, W/8)``; the
family's velocity calls the transformer with ``1 - t`` and negates its output (ZImagePipeline's
conventions). Grid: ``linspace(1, 1/N, N)`` shifted by the scheduler (``use_dynamic_shifting``: by
resolution, else its static ``shift``; Z-Image-Turbo: 3), as ``ZImagePipeline`` + ``FlowMatchEulerDiscrete
Scheduler.set_timesteps(sigmas=..., mu=...)`` compute it. Decoding: ``latents / scaling_factor +
shift_factor`` then the VAE.

**Guidance.** ZImagePipeline's ``guidance_scale = g`` forms ``pos + g (pos - neg)`` (g = 0: no CFG, the
Turbo setting), i.e. standard CFG ``neg + (1 + g)(pos - neg)``: :meth:`ZImageT2IPipeline.sample_latents`
takes diffusers' ``g``; the trainer's ``sample.guidance_scale`` / ``eval.guidance_scale`` use the standard
form (``1 + g``). ZImagePipeline's ``cfg_normalization`` and ``cfg_truncation`` are off by default and not
reproduced (a non-default value has no parameter here).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from awm_jax.models.vae import AutoencoderKL
from awm_jax.pipelines.base import (
    T2IPipeline,
    check_text_encoder_paths,
    load_config_transformer,
    model_section,
    pipeline_problems,
    pipeline_root,
)

__all__ = ["ZImageT2IPipeline", "assemble_zimage", "load_zimage", "load_zimage_pipeline"]

DEFAULT_SIZE = 1024  # ZImagePipeline: height = height or 1024
TEXT_SUBFOLDERS = ("text_encoder",)


@dataclasses.dataclass
class ZImageT2IPipeline(T2IPipeline):
    """Z-Image pipeline components and sampling (see the module docstring).

    ``shift``: None = dynamic (resolution-dependent) shift, a float = the scheduler's static shift.
    """

    shift: float | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent: ``(in_channels, H / 8, W / 8)``."""
        return tuple(self.family.latent_shape(self.transformer.config, self.height, self.width))

    def time_grid(self, num_steps: int) -> np.ndarray:
        """The sampling grid (``num_steps + 1`` times from 1 down to 0) of this pipeline's scheduler."""
        return self.family.time_grid(num_steps, 0.0 if self.shift is None else self.shift, self.latent_shape)

    def velocity_fn(self, guidance_scale: float = 0.0) -> Callable:
        """``velocity_fn(x, t, context)`` for the samplers. ``guidance_scale`` is ZImagePipeline's ``g``:
        ``g > 0``: ``context = (state, (cond, uncond))`` and ``v = v_pos + g (v_pos - v_neg)``; else
        ``context = (state, cond)``. Cached per value."""
        from awm_jax.sampling import classifier_free_guidance

        g = float(guidance_scale)

        def make(model):
            def cond_fn(state):
                return lambda x, t, c: model(state, x, t, c)

            if g <= 0:
                return lambda x, t, context: cond_fn(context[0])(x, t, context[1])

            def velocity(x, t, context):
                state, pair = context
                return classifier_free_guidance(cond_fn(state), 1.0 + g)(x, t, (pair[0], pair[1]))
            return velocity

        return self._cached_velocity(g, make)

    def sample_latents(self, prompts: Sequence[str], *, num_steps: int = 50, guidance_scale: float = 5.0,
                       negative_prompt: str | Sequence[str] | None = None, key: jax.Array | None = None,
                       latents: jax.Array | None = None) -> jax.Array:
        """Euler ODE sampling -> final model-space latents (B, C, h, w) float32 (ZImagePipeline's defaults:
        50 steps, ``guidance_scale`` 5, empty negative prompts). Initial noise: ``latents`` or ``N(0, I)``
        drawn with ``key``."""
        from awm_jax.sampling import sample_ode

        prompts = list(prompts)
        latents = self.initial_latents(len(prompts), key, latents)
        cond = self.encode(prompts)
        if float(guidance_scale) > 0:
            neg = negative_prompt if negative_prompt is not None else ""
            neg = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            if len(neg) != len(prompts):
                raise ValueError(f"{len(neg)} negative prompts for {len(prompts)} prompts")
            cond = (cond, self.encode(neg))
        context = (nnx.state(self.transformer), cond)
        return sample_ode(self.velocity_fn(guidance_scale), latents, self.time_grid(num_steps), context)


def assemble_zimage(root: pathlib.Path, transformer: nnx.Module, vae: AutoencoderKL, text_encoder: Any,
                    height: int | None, width: int | None) -> ZImageT2IPipeline:
    """A :class:`ZImageT2IPipeline` from loaded parts (checks channels, VAE factor, image size; the
    scheduler settings from ``root/scheduler``)."""
    from awm_jax.models.family import family_of, get_family
    from awm_jax.pipelines.flux import scheduler_shift

    fam = get_family("zimage")
    if family_of(transformer) is not fam:
        raise ValueError(f"{root}: the transformer is a {type(transformer).__name__}, not a Z-Image model")
    cfg = transformer.config
    if cfg.in_channels != vae.config.latent_channels:
        raise ValueError(f"{root}: transformer in_channels {cfg.in_channels} != VAE latent_channels "
                         f"{vae.config.latent_channels}")
    if vae.config.downsample_factor != fam.vae_scale_factor:
        raise ValueError(f"{root}: VAE block_out_channels {tuple(vae.config.block_out_channels)} give a "
                         f"downsampling factor {vae.config.downsample_factor}; the Z-Image family needs "
                         f"{fam.vae_scale_factor}")
    height, width = int(height or DEFAULT_SIZE), int(width or DEFAULT_SIZE)
    fam.latent_shape(cfg, height, width)  # validates the size (multiple of 16)
    return ZImageT2IPipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, height=height,
                             width=width, shift=scheduler_shift(root))


def load_zimage(pipeline_dir: str | pathlib.Path, *, height: int | None = None, width: int | None = None,
                dtype: Any = None, max_sequence_length: int = 512, text_encoder: Any = None,
                **transformer_kwargs: Any) -> ZImageT2IPipeline:
    """Load a diffusers Z-Image pipeline folder as a :class:`ZImageT2IPipeline` (transformer / VAE may be
    converted Flax folders at ``transformer/`` / ``vae/``); ``height``/``width`` default to 1024."""
    from awm_jax.models import load_transformer, load_vae

    root = pathlib.Path(pipeline_dir)
    if not (root / "model_index.json").exists():
        raise FileNotFoundError(f"{root}: not a diffusers pipeline folder (no model_index.json)")
    transformer = load_transformer(root, dtype=dtype, family="zimage", **transformer_kwargs)
    vae = load_vae(root, dtype=dtype)
    if text_encoder is None:
        from awm_jax.text.zimage import ZImageTextEncoder

        text_encoder = ZImageTextEncoder.from_pipeline_dir(root, max_sequence_length=max_sequence_length)
    return assemble_zimage(root, transformer, vae, text_encoder, height, width)


def input_problems(config) -> list[str]:
    """What :func:`load_zimage_pipeline` would find missing, without loading anything (pre-flight)."""
    return pipeline_problems(config.model, "Z-Image", TEXT_SUBFOLDERS, ("tokenizer",))


def load_zimage_pipeline(config, mesh=None) -> ZImageT2IPipeline:
    """The trainer's entry: a :class:`ZImageT2IPipeline` from ``config.model`` (``path``, ``vae_path``,
    ``text_encoder_paths``, ``resolution``, ``dtype``, ``param_dtype``, ``max_sequence_length``,
    ``scan_layers``, ``remat_policy``); ``mesh``: the transformer is loaded straight onto it."""
    from awm_jax.models import load_vae
    from awm_jax.text.zimage import ZImageTextEncoder

    m = model_section(config)
    root = pipeline_root(m.path, "Z-Image")
    check_text_encoder_paths(root, m.text_encoder_paths, TEXT_SUBFOLDERS)
    transformer = load_config_transformer(m, "zimage", mesh)
    vae = load_vae(m.vae_path or root)
    text = ZImageTextEncoder.from_pipeline_dir(root, max_sequence_length=int(m.max_sequence_length))
    return assemble_zimage(root, transformer, vae, text, m.resolution, m.resolution)


def sample_pipeline(args, dtype) -> tuple[ZImageT2IPipeline, dict]:
    """``python -m awm_jax.sample --model DIR`` (``ModelFamily.sample_pipeline``): ZImagePipeline's 50 steps
    and g = 5 (``pos + g (pos - neg)``), 512 caption tokens."""
    pipe = load_zimage(args.model, height=args.height, width=args.width, dtype=dtype,
                       max_sequence_length=args.max_sequence_length or 512)
    return pipe, dict(num_steps=args.steps or 50,
                      guidance_scale=5.0 if args.guidance_scale is None else args.guidance_scale,
                      negative_prompt=args.negative_prompt or None)
