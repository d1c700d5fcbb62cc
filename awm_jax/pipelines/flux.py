"""The FLUX.1 pipeline: host CLIP-L + T5 encoders + Flax FLUX transformer + Flax VAE, Euler ODE sampling.

``load_flux(pipeline_dir)`` returns a :class:`FluxT2IPipeline` fulfilling the trainer's pipeline contract
(``text_encoder.encode``, ``transformer``, ``decode``, ``latent_shape``) and sampling images the way
diffusers' ``FluxPipeline`` does: the samplers work on *unpacked* latents ``(B, 16, H/8, W/8)`` (the FLUX
family packs 2x2 inside its velocity), flow-matching Euler on FluxPipeline's sigmas, no classifier-free
guidance; FLUX.1-dev gets the distilled ``guidance`` as a model input (schnell has no guidance embedding
and ignores it). Decoding: ``latents / scaling_factor + shift_factor`` then the VAE (diffusers' order).

Grid: with the scheduler's ``use_dynamic_shifting`` (FLUX.1-dev; the default without a scheduler folder)
the FLUX family's resolution-dependent grid (``family.time_grid``); with a static shift (FLUX.1-schnell's
scheduler: ``use_dynamic_shifting=false, shift=1``) ``shift_times(linspace(1, 1/N, N), shift)``, as
``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`` computes.
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

__all__ = ["FluxT2IPipeline", "assemble_flux", "load_flux", "load_flux_pipeline", "scheduler_shift"]

DEFAULT_SIZE = 1024  # FluxPipeline: default_sample_size 128 x VAE factor 8
TEXT_SUBFOLDERS = ("text_encoder", "text_encoder_2")
# scheduler settings the FLUX family's grid assumes (diffusers' defaults, FLUX.1's values)
_DYNAMIC = {"base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
            "time_shift_type": "exponential"}
_UNSUPPORTED = {"invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
                "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False,
                "num_train_timesteps": 1000}


def scheduler_shift(root: pathlib.Path) -> float | None:
    """None for the dynamic (resolution-dependent) shift, else the static shift of ``root/scheduler``.

    Raises ValueError naming the file and key for settings the pipeline does not reproduce.
    """
    from awm_jax.text.hf import read_json

    path = root / "scheduler" / "scheduler_config.json"
    if not path.exists():
        return None
    cfg = read_json(path)
    for key, want in _UNSUPPORTED.items():
        if cfg.get(key, want) != want:
            raise ValueError(f"{path}: {key} = {cfg[key]!r} is not supported by the FLUX pipeline "
                             f"(needs {want!r})")
    if not cfg.get("use_dynamic_shifting", False):
        return float(cfg.get("shift", 1.0))
    for key, want in _DYNAMIC.items():
        if cfg.get(key, want) != want:
            raise ValueError(f"{path}: {key} = {cfg[key]!r}: the FLUX family's dynamic-shift grid assumes "
                             f"{key} = {want!r}")
    return None


@dataclasses.dataclass
class FluxT2IPipeline(T2IPipeline):
    """FLUX.1 pipeline components and sampling (see the module docstring).

    ``shift``: None = FluxPipeline's dynamic shift (the family's grid), a float = static scheduler shift.
    """

    shift: float | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one *unpacked* latent: ``(in_channels / 4, H / 8, W / 8)``."""
        return tuple(self.family.latent_shape(self.transformer.config, self.height, self.width))

    def time_grid(self, num_steps: int) -> np.ndarray:
        """The sampling grid (``num_steps + 1`` times from 1 down to 0) of this pipeline's scheduler."""
        return self.family.time_grid(num_steps, 0.0 if self.shift is None else self.shift, self.latent_shape)

    def velocity_fn(self, guidance: float | None = 3.5) -> Callable:
        """``velocity_fn(x, t, context)`` for the samplers, ``context = (state, (embeds, pooled))``.

        ``state`` is the transformer's ``nnx.state``; ``guidance`` is FLUX.1-dev's distilled guidance
        (ignored by models without a guidance embedding). No CFG. Cached per guidance value.
        """
        if not self.transformer.config.guidance_embeds:
            guidance = None
        elif guidance is None:
            raise ValueError("FLUX pipeline: this transformer has a guidance embedding (FLUX.1-dev): "
                             "give guidance")
        else:
            guidance = float(guidance)

        def make(model):
            def velocity(x, t, context):
                state, cond = context
                return model(state, x, t, cond, guidance=guidance)
            return velocity

        return self._cached_velocity(guidance, make)

    def sample_latents(self, prompts: Sequence[str], *, num_steps: int = 28, guidance: float | None = 3.5,
                       key: jax.Array | None = None, latents: jax.Array | None = None) -> jax.Array:
        """Euler ODE sampling -> final unpacked model-space latents (B, C, h, w) float32.

        Initial noise: ``latents`` (unpacked) if given, else ``N(0, I)`` drawn with ``key``.
        """
        from awm_jax.sampling import sample_ode

        prompts = list(prompts)
        latents = self.initial_latents(len(prompts), key, latents)
        context = (nnx.state(self.transformer), self.encode(prompts))
        return sample_ode(self.velocity_fn(guidance), latents, self.time_grid(num_steps), context)


def assemble_flux(root: pathlib.Path, transformer: nnx.Module, vae: AutoencoderKL, text_encoder: Any,
                  height: int | None, width: int | None) -> FluxT2IPipeline:
    """A :class:`FluxT2IPipeline` from loaded parts (checks channels, VAE factor, image size; the
    scheduler settings from ``root/scheduler``)."""
    from awm_jax.models.family import family_of, get_family

    flux = get_family("flux")
    if family_of(transformer) is not flux:
        raise ValueError(f"{root}: the transformer is a {type(transformer).__name__}, not a FLUX model")
    cfg = transformer.config
    if cfg.in_channels != 4 * vae.config.latent_channels:
        raise ValueError(f"{root}: transformer in_channels {cfg.in_channels} != 4 x VAE latent_channels "
                         f"{vae.config.latent_channels} (2x2 packing)")
    if vae.config.downsample_factor != flux.vae_scale_factor:
        raise ValueError(f"{root}: VAE block_out_channels {tuple(vae.config.block_out_channels)} give a "
                         f"downsampling factor {vae.config.downsample_factor}; the FLUX family needs "
                         f"{flux.vae_scale_factor}")
    height, width = int(height or DEFAULT_SIZE), int(width or DEFAULT_SIZE)
    m = 2 * flux.vae_scale_factor
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % m:
            raise ValueError(f"FLUX pipeline: {name}={v} must be a positive multiple of {m} "
                             f"(VAE factor {flux.vae_scale_factor} x 2x2 packing)")
    return FluxT2IPipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, height=height,
                           width=width, shift=scheduler_shift(root))


def _check_root(pipeline_dir) -> pathlib.Path:
    root = pathlib.Path(pipeline_dir)
    if not (root / "model_index.json").exists():
        raise FileNotFoundError(f"{root}: not a diffusers pipeline folder (no model_index.json)")
    return root


def load_flux(pipeline_dir: str | pathlib.Path, *, height: int | None = None, width: int | None = None,
              dtype: Any = None, max_sequence_length: int = 512, text_encoder: Any = None,
              **transformer_kwargs: Any) -> FluxT2IPipeline:
    """Load a diffusers FLUX.1 pipeline folder as a :class:`FluxT2IPipeline`.

    ``dtype``: compute dtype of transformer and VAE (None: float32). ``max_sequence_length``: T5 tokens
    (<= 512). ``text_encoder``: use this encoder instead of loading the folder's (e.g. a cached prompt set).
    ``height``/``width`` default to 1024 (FluxPipeline's default). Transformer/VAE may also be converted
    Flax folders placed at ``transformer/`` / ``vae/``.
    """
    from awm_jax.models import load_transformer, load_vae

    root = _check_root(pipeline_dir)
    transformer = load_transformer(root, dtype=dtype, family="flux", **transformer_kwargs)
    vae = load_vae(root, dtype=dtype)
    if text_encoder is None:
        from awm_jax.text.flux import FluxTextEncoders

        text_encoder = FluxTextEncoders.from_pipeline_dir(root, max_sequence_length=max_sequence_length)
    return assemble_flux(root, transformer, vae, text_encoder, height, width)


def input_problems(config) -> list[str]:
    """What :func:`load_flux_pipeline` would find missing, without loading anything (pre-flight)."""
    return pipeline_problems(config.model, "FLUX", TEXT_SUBFOLDERS, ("tokenizer", "tokenizer_2"))


def load_flux_pipeline(config, mesh=None) -> FluxT2IPipeline:
    """The trainer's entry: a :class:`FluxT2IPipeline` from ``config.model`` (ConfigDict or dict).

    Reads ``model.path`` (the pipeline folder or its ``transformer/``, diffusers or converted Flax),
    ``model.vae_path`` ("" = ``<root>/vae``), ``model.text_encoder_paths`` ("" or ``<root>/text_encoder``,
    ``<root>/text_encoder_2``: the tokenizers are read from the same pipeline folder), ``model.resolution``
    (square images), ``model.dtype``, ``model.param_dtype``, ``model.max_sequence_length``,
    ``model.scan_layers``, ``model.remat_policy``, ``model.attention``. ``mesh``: the transformer is loaded
    straight onto it.
    """
    from awm_jax.models import load_vae
    from awm_jax.text.flux import FluxTextEncoders

    m = model_section(config)
    root = pipeline_root(m.path, "FLUX")
    check_text_encoder_paths(root, m.text_encoder_paths, TEXT_SUBFOLDERS)
    transformer = load_config_transformer(m, "flux", mesh)
    vae = load_vae(m.vae_path or root)
    text = FluxTextEncoders.from_pipeline_dir(root, max_sequence_length=int(m.max_sequence_length))
    return assemble_flux(root, transformer, vae, text, m.resolution, m.resolution)


def sample_pipeline(args, dtype) -> tuple[FluxT2IPipeline, dict]:
    """``python -m awm_jax.sample --model DIR`` (``ModelFamily.sample_pipeline``): FluxPipeline's 28 steps,
    512 T5 tokens and distilled guidance 3.5 (a model input of FLUX.1-dev; schnell ignores it)."""
    pipe = load_flux(args.model, height=args.height, width=args.width, dtype=dtype,
                     max_sequence_length=args.max_sequence_length or 512)
    return pipe, dict(num_steps=args.steps or 28, guidance=3.5 if args.guidance is None else args.guidance)
