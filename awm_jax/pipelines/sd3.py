"""The SD3 / SD3.5 pipeline: host text encoders + Flax MMDiT + Flax VAE, with Euler ODE sampling.

``load_sd3(pipeline_dir)`` returns an :class:`SD3Pipeline` fulfilling the trainer's pipeline contract
(``text_encoder.encode``, ``transformer``, ``decode``, ``latent_shape``) and able to sample images the
way diffusers' ``StableDiffusion3Pipeline`` does (flow-matching Euler on the shifted sigma grid, optional
classifier-free guidance with the empty prompt as negative).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
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


def _scheduler_shift(root: pathlib.Path) -> float:
    path = root / "scheduler" / "scheduler_config.json"
    if not path.exists():
        return 3.0  # the SD3 / SD3.5 default
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if cfg.get("use_dynamic_shifting"):
        raise ValueError(f"{path}: use_dynamic_shifting=True is not supported by the SD3 pipeline")
    return float(cfg.get("shift", 1.0))


@dataclasses.dataclass
class SD3Pipeline(T2IPipeline):
    """SD3 pipeline components and sampling (see the module docstring).

    ``height``/``width`` are the image size (default: transformer ``sample_size`` x VAE factor, as diffusers);
    ``shift`` is the scheduler's static sigma shift.
    """

    shift: float

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels, self.height // f, self.width // f)

    def velocity_fn(self, guidance_scale: float = 1.0) -> Callable:
        """``velocity_fn(x, t, context)`` for ``awm_jax.sampling`` with ``context = (state, cond, uncond)``.

        ``state`` is the transformer's ``nnx.state``; ``cond``/``uncond`` are ``(prompt_embeds, pooled)``
        (``uncond`` is ignored when ``guidance_scale == 1``). ``t`` in [0, 1] -> timestep ``1000 t``.
        Cached per guidance scale so the samplers' jit cache is reused.
        """
        from awm_jax.sampling import classifier_free_guidance

        scale = float(guidance_scale)

        def make(model):
            def velocity(x, t, context):
                state, cond, uncond = context
                guided = classifier_free_guidance(lambda xx, tt, c: model(state, xx, tt, c), scale)
                return guided(x, t, (tuple(cond), tuple(uncond)))
            return velocity

        return self._cached_velocity(scale, make)

    def sample_latents(self, prompts: Sequence[str], *, num_steps: int = 40, guidance_scale: float = 1.0,
                       key: jax.Array | None = None, latents: jax.Array | None = None,
                       negative_prompt: str = "") -> jax.Array:
        """Euler ODE sampling -> final model-space latents (B, C, h, w) float32.

        Initial noise: ``latents`` if given, else ``N(0, I)`` drawn with ``key``.
        """
        from awm_jax.sampling import sample_ode

        prompts = list(prompts)
        latents = self.initial_latents(len(prompts), key, latents)
        cond = self.encode(prompts)
        uncond = cond
        if guidance_scale != 1.0:
            uncond = self.encode([negative_prompt] * len(prompts))
        grid = self.family.time_grid(num_steps, self.shift, self.latent_shape)
        context = (nnx.state(self.transformer), cond, uncond)
        return sample_ode(self.velocity_fn(guidance_scale), latents, grid, context)


def load_sd3(pipeline_dir: str | pathlib.Path, *, height: int | None = None, width: int | None = None,
             dtype: Any = None, max_sequence_length: int = 128, load_t5: bool = True,
             text_encoder: Any = None, **transformer_kwargs: Any) -> SD3Pipeline:
    """Load a diffusers SD3 / SD3.5 pipeline folder as an :class:`SD3Pipeline`.

    ``dtype``: compute dtype of transformer and VAE (None: float32). ``max_sequence_length``: T5 tokens.
    ``text_encoder``: use this encoder instead of loading the folder's (e.g. a cached prompt set).
    Transformer/VAE may also be converted Flax folders placed at ``transformer/`` / ``vae/``.
    """
    from awm_jax.models import load_transformer, load_vae

    root = pathlib.Path(pipeline_dir)
    if not (root / "model_index.json").exists():
        raise FileNotFoundError(f"{root}: not a diffusers pipeline folder (no model_index.json)")
    transformer = load_transformer(root, dtype=dtype, **transformer_kwargs)
    vae = load_vae(root, dtype=dtype)
    if text_encoder is None:
        from awm_jax.text.sd3 import SD3TextEncoders

        text_encoder = SD3TextEncoders.from_pipeline_dir(root, max_sequence_length=max_sequence_length,
                                                         load_t5=load_t5)
    return assemble(root, transformer, vae, text_encoder, height, width)


def assemble(root: pathlib.Path, transformer: nnx.Module, vae: AutoencoderKL, text_encoder: Any,
             height: int | None, width: int | None) -> SD3Pipeline:
    """An :class:`SD3Pipeline` from loaded parts (checks the image size; shift from ``root/scheduler``)."""
    if transformer.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"{root}: transformer in_channels {transformer.config.in_channels} != VAE "
                         f"latent_channels {vae.config.latent_channels}")
    f = vae.config.downsample_factor
    default = transformer.config.sample_size * f
    height, width = height or default, width or default
    patch = transformer.config.patch_size
    for name, v in (("height", height), ("width", width)):
        if v % (f * patch):
            raise ValueError(f"SD3 pipeline: {name}={v} must be a multiple of {f * patch} "
                             f"(VAE factor {f} x patch size {patch})")
    return SD3Pipeline(transformer=transformer, vae=vae, text_encoder=text_encoder,
                       shift=_scheduler_shift(root), height=int(height), width=int(width))


_TEXT_SUBFOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def input_problems(config) -> list[str]:
    """What :func:`load_sd3_pipeline` would find missing, without loading anything (pre-flight)."""
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    return pipeline_problems(config.model, "SD3", _TEXT_SUBFOLDERS, tokenizers, optional=(2,))


def load_sd3_pipeline(config, mesh=None) -> SD3Pipeline:
    """The trainer's entry: an :class:`SD3Pipeline` from ``config.model`` (ConfigDict or dict).

    Reads ``model.path`` (the pipeline folder or its ``transformer/``, diffusers or converted Flax),
    ``model.vae_path`` ("" = ``<root>/vae``), ``model.text_encoder_paths`` (must be ``<root>/text_encoder*``
    or "": the tokenizers are read from the same pipeline folder; a third entry "none" skips T5),
    ``model.resolution``, ``model.dtype``,
    ``model.param_dtype``, ``model.max_sequence_length``, ``model.scan_layers``, ``model.remat_policy``,
    ``model.attention``.
    ``mesh``: the transformer is loaded straight onto it (its parameters born sharded).
    """
    from awm_jax.models import load_vae
    from awm_jax.text.sd3 import SD3TextEncoders

    m = model_section(config) if isinstance(config, dict) else config.model
    root = pipeline_root(m.path, "SD3")
    paths = tuple(m.text_encoder_paths or ())
    check_text_encoder_paths(root, paths, _TEXT_SUBFOLDERS)
    transformer = load_config_transformer(m, "sd35", mesh)
    vae = load_vae(m.vae_path or root)
    load_t5 = not (len(paths) >= 3 and paths[2] == "none")
    text = SD3TextEncoders.from_pipeline_dir(root, max_sequence_length=int(m.max_sequence_length),
                                             load_t5=load_t5)
    res = m.resolution
    return assemble(root, transformer, vae, text, res, res)


def sample_pipeline(args, dtype) -> tuple[SD3Pipeline, dict]:
    """``python -m awm_jax.sample --model DIR`` (``ModelFamily.sample_pipeline``): 40 steps, 128 T5 tokens
    (``--no-t5``: the zero block), CFG only with ``--guidance-scale`` > 1."""
    pipe = load_sd3(args.model, height=args.height, width=args.width, dtype=dtype,
                    max_sequence_length=args.max_sequence_length or 128, load_t5=not args.no_t5)
    return pipe, dict(num_steps=args.steps or 40, guidance_scale=args.guidance_scale or 1.0,
                      negative_prompt=args.negative_prompt)
