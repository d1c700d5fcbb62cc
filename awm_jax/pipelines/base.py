"""What every text-to-image pipeline of the package shares (family-independent).

:class:`T2IPipeline` holds the parts behind the trainer's pipeline contract (``text_encoder.encode``,
``transformer``, ``decode``, ``latent_shape``) and implements decoding, prompt encoding, the initial-noise
checks and ``__call__``; a family's pipeline adds ``latent_shape``, ``velocity_fn`` and ``sample_latents``.
The module-level helpers are the parts of a ``load_<family>_pipeline(config)`` that read ``config.model``
the same way for every family (pipeline root, text-encoder paths, dtypes).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from awm_jax.models.vae import AutoencoderKL, latents_to_images_uint8, make_decode_fn

__all__ = ["T2IPipeline", "check_text_encoder_paths", "load_config_transformer", "model_dtypes",
           "model_section", "pipeline_problems", "pipeline_root"]


@dataclasses.dataclass
class T2IPipeline:
    """Transformer + VAE + host text encoder; subclasses define ``latent_shape`` and the sampling."""

    transformer: nnx.Module
    vae: AutoencoderKL
    text_encoder: Any
    height: int
    width: int
    _decode_fn: Callable | None = dataclasses.field(default=None, repr=False, kw_only=True)
    _velocity: dict = dataclasses.field(default_factory=dict, repr=False, kw_only=True)

    @property
    def family(self):
        """The transformer's :class:`~awm_jax.models.family.ModelFamily`."""
        from awm_jax.models.family import family_of

        return family_of(self.transformer)

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent as the samplers see it."""
        raise NotImplementedError

    def _cached_velocity(self, key, make: Callable[[Callable], Callable]) -> Callable:
        """``make(model)`` once per ``key`` (one object per setting: the samplers' jit cache is reused), where
        ``model(state, x, t, cond, **options)`` is the family's velocity of the transformer with ``state``."""
        if key not in self._velocity:
            graphdef, family = nnx.graphdef(self.transformer), self.family

            def model(state, x, t, cond, **options):
                # copy=True: fresh Variables at this trace level (scanned layers refuse outer ones)
                return family.velocity(nnx.merge(graphdef, state, copy=True), x, t, tuple(cond), **options)

            self._velocity[key] = make(model)
        return self._velocity[key]

    def decode(self, latents: jax.Array) -> jax.Array:
        """Model-space latents (B, C, h, w) -> uint8 images (B, H, W, 3) (jitted; callable inside jit)."""
        if self._decode_fn is None:
            self._decode_fn = make_decode_fn(self.vae)
        return self._decode_fn(latents)

    def decode_pure(self, vae_state, latents: jax.Array) -> jax.Array:
        """Decode with explicit VAE state (``nnx.state(self.vae)``): for callers that jit it themselves."""
        return latents_to_images_uint8(nnx.merge(nnx.graphdef(self.vae), vae_state), latents)

    def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """``(prompt_embeds, pooled)`` of ``prompts`` as jax arrays (through the encoder's cache)."""
        emb, pooled = self.text_encoder.encode(list(prompts))
        return jnp.asarray(emb), jnp.asarray(pooled)

    def initial_latents(self, n: int, key: jax.Array | None, latents: Any) -> jax.Array:
        """``latents`` (checked to be ``(n, *latent_shape)``) or ``N(0, I)`` drawn with ``key``; float32."""
        from awm_jax.sampling import init_latents

        if n < 1:
            raise ValueError("sample_latents: no prompts")
        if latents is None:
            if key is None:
                raise ValueError("sample_latents: give a PRNG key or initial latents")
            latents = init_latents(key, n, self.latent_shape)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != (n, *self.latent_shape):
            raise ValueError(f"sample_latents: latents shape {tuple(latents.shape)} != "
                             f"{(n, *self.latent_shape)}")
        return latents

    def sample_latents(self, prompts: Sequence[str], **kwargs) -> jax.Array:
        """Final model-space latents (B, C, h, w) float32 (family-specific)."""
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], **kwargs) -> np.ndarray:
        """Sample and decode: uint8 images (B, H, W, 3) as numpy (kwargs of :meth:`sample_latents`)."""
        return np.asarray(self.decode(self.sample_latents(prompts, **kwargs)))


def model_section(config):
    """``config.model`` of a trainer ConfigDict (or of a plain dict, converted)."""
    import ml_collections

    # an alias assigned from ``config.model``, so tests/test_code_structure.py sees the reads of
    # ``m.<key>`` here (model_dtypes) as config-key reads
    m = ml_collections.ConfigDict(config["model"]) if isinstance(config, dict) else config.model
    return m


def pipeline_root(model_path: str, what: str) -> pathlib.Path:
    """The diffusers pipeline folder of ``model.path``: the path itself or its parent (its transformer/)."""
    if not model_path:
        raise ValueError(f"config model.path is empty: give the {what} pipeline folder (or its transformer/)")
    p = pathlib.Path(model_path)
    for cand in (p, p.parent):
        if (cand / "model_index.json").exists():
            return cand
    raise FileNotFoundError(f"config model.path={model_path!r}: neither it nor its parent is a diffusers "
                            f"pipeline folder (model_index.json); the {what} pipeline needs the tokenizers "
                            "there")


def check_text_encoder_paths(root: pathlib.Path, paths: Sequence[str], subfolders: Sequence[str]) -> None:
    """``model.text_encoder_paths``: each entry "" or ``root/<subfolder>``; entries past ``subfolders``
    must be "" (ValueError naming the key and the path)."""
    paths = tuple(paths or ())
    for i, given in enumerate(paths):
        if not given or given == "none":
            continue
        if i >= len(subfolders):
            raise ValueError(f"config model.text_encoder_paths entry #{i} = {given!r}: this pipeline has "
                             f"only {len(subfolders)} text encoders ({', '.join(subfolders)}); leave it \"\"")
        if pathlib.Path(given).resolve() != (root / subfolders[i]).resolve():
            raise ValueError(f"config model.text_encoder_paths entry {given!r} is not "
                             f"{root / subfolders[i]}: text encoders and tokenizers are loaded from the "
                             "pipeline folder of model.path")


def model_dtypes(m) -> tuple[Any, Any]:
    """``(dtype, param_dtype)`` of a ``config.model`` section (dtype None for float32 compute)."""
    dtype = None if m.dtype == "float32" else jnp.dtype(m.dtype)
    return dtype, jnp.dtype(m.param_dtype)


def load_config_transformer(m, family: str, mesh=None) -> nnx.Module:
    """The transformer of ``config.model`` section ``m`` (``path``, ``dtype``, ``param_dtype``,
    ``scan_layers``, ``remat_policy``, ``attention``) for ``family``, loaded straight onto ``mesh``
    (parameters born sharded): the one call every ``load_<family>_pipeline(config)`` makes."""
    from awm_jax.models import load_transformer

    dtype, param_dtype = model_dtypes(m)
    return load_transformer(m.path, dtype=dtype, param_dtype=param_dtype, family=family,
                            scan_layers=bool(m.scan_layers), remat_policy=str(m.remat_policy),
                            attention=str(m.attention), mesh=mesh)


def pipeline_problems(m, what: str, text_subfolders: Sequence[str], tokenizer_subfolders: Sequence[str],
                      optional: Sequence[int] = ()) -> list[str]:
    """Every problem with the files a ``load_<family>_pipeline(config)`` would read, found without loading
    anything: one message per problem naming the config key and the path (empty list: all there).

    ``m``: ``config.model``; ``optional``: indices of text encoders an entry ``"none"`` may skip.
    """
    key = f"config key 'model.path' = {m.path!r}"
    if not m.path:
        return [f"{key}: empty; give the {what} diffusers pipeline folder"]
    p = pathlib.Path(m.path)
    if not p.exists():
        return [f"{key}: no such folder (the {what} diffusers pipeline folder; tools/fetch_assets.py "
                "downloads it)"]
    try:
        root = pipeline_root(m.path, what)
    except FileNotFoundError:
        return [f"{key}: neither it nor its parent is a diffusers pipeline folder (model_index.json)"]
    out = []
    transformer = p if p != root else root / "transformer"
    if not (transformer / "config.json").is_file():
        out.append(f"{key}: no transformer config {transformer / 'config.json'}")
    vae = pathlib.Path(m.vae_path) if m.vae_path else root / "vae"
    if not (vae / "config.json").is_file():
        src = f"config key 'model.vae_path' = {m.vae_path!r}" if m.vae_path else key
        out.append(f"{src}: no VAE config {vae / 'config.json'}")
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        return out + [f"{key}: cannot read {root / 'model_index.json'} ({e})"]
    paths = tuple(m.text_encoder_paths or ())
    try:
        check_text_encoder_paths(root, paths, text_subfolders)
    except ValueError as e:
        out.append(str(e))
    for i, (enc, tok) in enumerate(zip(text_subfolders, tokenizer_subfolders)):
        if i in optional and i < len(paths) and paths[i] == "none":
            continue
        if index.get(enc) in (None, [None, None]):  # a pipeline saved without this encoder (SD3 without T5)
            continue
        for sub in (enc, tok):
            if not (root / sub).is_dir():
                out.append(f"{key}: the pipeline folder has no {sub}/ ({root / sub})")
    return out
