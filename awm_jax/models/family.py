"""Model families: what the samplers, the RL step, the trainer and the converters need to know of a model.

A :class:`ModelFamily` describes one kind of transformer (SD3 / SD3.5, FLUX.1, the toy world's model):

- **building**: ``build(cfg, rngs=..., dtype=..., param_dtype=..., lora=..., scan_layers=...,
  remat_policy=...)`` and ``config_from_dict`` (its diffusers config), ``rebuild_kwargs(model)`` (how to
  build the same model again, e.g. with other LoRA adapters or compute dtype), default LoRA targets
  (``lora_targets``) and named architectures (``architectures``, for ``config.model.arch``);
- **the velocity** ``velocity(model, x, t, context, **options) -> v`` (float32) in the project's units: ``t``
  of shape ``(B,)`` in [0, 1] with t = 1 noise, ``x_t = (1 - t) x0 + t eps``, ``v ~ eps - x0``; ``context`` is
  what the family's text encoder returns, ``(prompt_embeds (B,T,D), pooled (B,P))``; ``options`` come from
  ``velocity_options(config)`` (e.g. FLUX's distilled guidance);
- **latents**: ``latent_shape(cfg, height, width)`` is the shape the samplers work in and
  ``time_grid(num_steps, shift, latent_shape)`` the family's sampling grid (a family that packs latents, as
  FLUX does 2x2, packs and unpacks inside ``velocity``);
- **weights**: ``converter`` names the key map in ``awm_jax.convert.CONVERTERS`` (conversion, loading and LoRA
  export), ``class_names`` the diffusers ``_class_name`` s, ``stacks(cfg)`` the scanned block stacks;
- **pipeline**: ``load_pipeline(config)`` returns the trainer's pipeline (``text_encoder.encode``,
  ``transformer``, ``decode``, ``latent_shape``) and ``model_config(path)`` the transformer config at a path;
- **sampling CLI** (``python -m awm_jax.sample``): ``sample_loader`` names the pipeline module's
  ``sample_pipeline(args, dtype) -> (pipeline, options)`` (the diffusers pipeline's defaults for a ``--model``
  folder), ``sample_flag_problems(args)`` the flags the family does not take and
  ``run_sample_options(config, args)`` the guidance options of a trained run (``--run``);
  ``default_config`` is the shipped ``configs/`` file whose settings ``python -m awm_jax.evaluate
  --model DIR`` uses for a pipeline folder of the family.

Families register themselves (:func:`register_family`) when their module is imported; :func:`get_family`
imports the built-in ones on first use, so no core module imports a family it does not use (the toy world
is one of them). Adding a family = one model module (with its registration), one key map, configs.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from awm_jax.models.stacking import Stack

__all__ = ["ModelFamily", "family_for_graph", "family_names", "family_of", "get_family", "graph_config",
           "register_family"]

# registry name -> module that registers it on import (imported lazily by get_family)
BUILTIN_FAMILIES = {
    "sd35": "awm_jax.models.mmdit",
    "flux": "awm_jax.models.flux",
    "zimage": "awm_jax.models.zimage",
    "qwenimage": "awm_jax.models.qwenimage",
    "toy": "awm_jax.toy.family",
}
_REGISTRY: dict[str, ModelFamily] = {}


class ModelFamily:
    """Base class and protocol of a model family (see the module docstring); subclasses set the class
    attributes and implement the methods that raise ``NotImplementedError``."""

    name: str = ""
    model_class: type = nnx.Module
    converter: str = ""
    class_names: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ()
    architectures: dict[str, dict] = {}
    vae_scale_factor: int = 8
    pipeline_loader: str = ""
    sample_loader: str = ""
    default_config: str = ""

    # ---------------------------------------------------------------- building
    def config_from_dict(self, d: dict, source: str = "config") -> Any:
        """The model config of a diffusers ``config.json`` dict (unknown keys raise, naming ``source``)."""
        raise NotImplementedError

    def build(self, cfg, *, rngs: nnx.Rngs, dtype=None, param_dtype=None, lora=None,
              scan_layers: bool = False, remat_policy: str = "none",
              attention: str | None = None) -> nnx.Module:
        """A new (randomly initialised) transformer of config ``cfg``; ``attention``: the kernel of every
        shared ``Attention`` module (``model.attention``; None: the model class's default, XLA)."""
        from awm_jax.models.attention import set_attention

        kw = {k: v for k, v in dict(dtype=dtype, param_dtype=param_dtype).items() if v is not None}
        model = self.model_class(cfg, rngs=rngs, lora=lora, scan_layers=scan_layers,
                                 remat_policy=remat_policy, **kw)
        return model if attention is None else set_attention(model, attention)

    def rebuild_kwargs(self, model: nnx.Module) -> dict:
        """Keyword arguments of :meth:`build` (besides ``rngs``) that rebuild ``model``'s architecture."""
        return dict(cfg=model.config, dtype=model.dtype, param_dtype=model.param_dtype,
                    scan_layers=model.scan_layers, remat_policy=model.remat_policy, lora=model.lora,
                    attention=getattr(model, "attention", None))

    def architecture(self, arch: str) -> dict:
        """The diffusers config dict of a named architecture (``config.model.arch``)."""
        if arch not in self.architectures:
            raise KeyError(f"model family {self.name!r} has no architecture {arch!r}; "
                           f"known: {sorted(self.architectures)}")
        return dict(self.architectures[arch])

    def stacks(self, cfg) -> Sequence[Stack]:
        """The model's scanned block stacks (per-layer <-> stacked parameter layout)."""
        return ()

    # ---------------------------------------------------------------- the velocity
    def velocity(self, model: nnx.Module, x, t, context, **options):
        """Velocity ``v(x, t)`` (float32) with ``t`` (B,) in [0, 1] and ``context = (embeds, pooled)``."""
        raise NotImplementedError

    def velocity_options(self, config) -> dict:
        """Extra static inputs of :meth:`velocity` taken from the trainer config (default: none)."""
        return {}

    # ---------------------------------------------------------------- latents
    def text_tokens(self, config) -> int:
        """Tokens of one prompt embedding (``prompt_embeds.shape[1]``) under ``config`` (for plans)."""
        return int(config.model.max_sequence_length)

    def context_shape(self, config, cfg) -> tuple[int, int, int]:
        """``(tokens, width, pooled width)`` of the text-encoder context ``(embeds (B,T,D), pooled (B,P))``
        under trainer ``config`` for the transformer config ``cfg`` (abstract inputs of plans); by default the
        diffusers ``joint_attention_dim`` / ``pooled_projection_dim`` of SD3 / FLUX."""
        return self.text_tokens(config), int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim)

    def latent_shape(self, cfg, height: int, width: int) -> tuple[int, ...]:
        """Shape of one latent as the samplers see it, for an image of ``height x width`` pixels."""
        raise NotImplementedError

    def time_grid(self, num_steps: int, shift: float, latent_shape: Sequence[int]) -> np.ndarray:
        """The family's sampling grid (``num_steps + 1`` decreasing times ending at 0)."""
        from awm_jax.sampling.schedules import shifted_grid

        return shifted_grid(int(num_steps), float(shift))

    # ---------------------------------------------------------------- weights and pipelines
    def skip_tensor(self, key: str, value: np.ndarray, cfg, where: str) -> bool:
        """True for stored tensors that are not model parameters (checked and dropped when loading)."""
        return False

    def model_config(self, path: str) -> dict:
        """The transformer's diffusers config dict stored at ``path`` (diffusers, pipeline or Flax folder)."""
        from awm_jax.convert import read_model_config

        return read_model_config(path, self.converter)

    def load_pipeline(self, config, mesh=None) -> Any:
        """The trainer's pipeline for ``config.model`` (``text_encoder``, ``transformer``, ``decode``,
        ``latent_shape``): by default ``pipeline_loader`` (``"module:function"``, imported on use, since
        pipelines build on the models and not the other way round) called with ``config`` (and
        ``mesh=mesh`` when given: the transformer's parameters are then born sharded on it)."""
        if not self.pipeline_loader:
            raise NotImplementedError(f"model family {self.name!r} has no pipeline loader")
        module, fn = self.pipeline_loader.split(":")
        kw = {} if mesh is None else {"mesh": mesh}
        return getattr(importlib.import_module(module), fn)(config, **kw)

    def sample_pipeline(self, args, dtype) -> tuple[Any, dict]:
        """``(pipeline, sample_latents options)`` for ``python -m awm_jax.sample --model DIR`` (parsed
        ``args``; ``dtype`` the compute dtype or None): ``sample_loader`` (``"module:function"``, imported on
        use) called with ``(args, dtype)``; the options hold the diffusers pipeline's defaults for the flags
        not given (``num_steps`` included)."""
        if not self.sample_loader:
            raise NotImplementedError(f"model family {self.name!r} has no sampling pipeline")
        module, fn = self.sample_loader.split(":")
        return getattr(importlib.import_module(module), fn)(args, dtype)

    def sample_flag_problems(self, args) -> list[str]:
        """Sampling CLI flags set in ``args`` that this family does not take (one message per flag)."""
        return []

    def run_sample_options(self, config, args) -> dict:
        """Guidance options of ``sample_latents`` for a trained run (``--run``; the CLI adds ``num_steps``):
        by default classifier-free guidance at ``--guidance-scale`` or the run's ``eval.guidance_scale``, with
        ``--negative-prompt``."""
        scale = float(config.eval.guidance_scale) if args.guidance_scale is None else args.guidance_scale
        return dict(guidance_scale=scale, negative_prompt=args.negative_prompt)

    def input_problems(self, config) -> list[str]:
        """Pre-flight: every missing or malformed file the pipeline of ``config.model`` would read, as
        messages naming the config key and the path, found without loading anything. By default the
        ``input_problems(config)`` of the ``pipeline_loader``'s module (when ``load_pipeline`` is not
        overridden), else a check that a non-empty
        ``model.path`` exists."""
        if self.pipeline_loader and type(self).load_pipeline is ModelFamily.load_pipeline:
            fn = getattr(importlib.import_module(self.pipeline_loader.split(":")[0]), "input_problems", None)
            if fn is not None:
                return list(fn(config))
        path = config.model.path
        if path and not os.path.exists(path):
            return [f"config key 'model.path' = {path!r}: no such file or folder"]
        return []

    def __repr__(self) -> str:
        return f"<ModelFamily {self.name}>"


def config_from_diffusers(cls, d: dict, source: str, class_name: str):
    """The config dataclass ``cls`` of a diffusers ``config.json`` dict: ``_``-prefixed keys ignored, unknown
    or invalid keys raise ``ValueError`` naming ``source`` and the diffusers ``class_name``."""
    known = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in dict(d).items() if not k.startswith("_")}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ValueError(f"{source}: unknown {class_name} config keys {unknown}")
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: invalid {class_name} config: {e}") from e


def config_to_diffusers(cfg) -> dict:
    """The diffusers-style config dict of a config dataclass (lists for tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry under ``family.name`` (re-registering replaces it)."""
    if not family.name:
        raise ValueError(f"{type(family).__name__}: a model family needs a name")
    _REGISTRY[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name`` (built-in families are imported on first use)."""
    if name not in _REGISTRY and name in BUILTIN_FAMILIES:
        importlib.import_module(BUILTIN_FAMILIES[name])
    if name not in _REGISTRY:
        raise KeyError(f"unknown model family {name!r}; known: {family_names()}")
    return _REGISTRY[name]


def family_names() -> list[str]:
    """Names of the registered and built-in families."""
    return sorted(set(_REGISTRY) | set(BUILTIN_FAMILIES))


def family_of(model: nnx.Module, prefer: str | None = None) -> ModelFamily:
    """The family whose ``model_class`` ``model`` is (``prefer`` first: the toy world shares SD3's class)."""
    if prefer is not None:
        fam = get_family(prefer)
        if isinstance(model, fam.model_class):
            return fam
    for name in BUILTIN_FAMILIES:
        if name != "toy":
            get_family(name)
    for fam in _REGISTRY.values():
        if type(model) is fam.model_class:
            return fam
    raise TypeError(f"{type(model).__name__} belongs to no registered model family ({family_names()})")


def graph_config(graphdef) -> Any:
    """The static ``config`` attribute of the root module of an ``nnx`` graphdef (None if it has none)."""
    for item in getattr(graphdef, "attributes", ()):
        if isinstance(item, tuple) and len(item) == 2 and item[0] == "config":
            return getattr(item[1], "value", None)
    return None


def family_for_graph(graphdef, kind: str) -> ModelFamily:
    """The family ``kind`` (``config.model.kind``), checked against the root module class of ``graphdef``."""
    fam = get_family(kind)
    nodes = getattr(graphdef, "nodes", None)
    cls = getattr(nodes[0], "type", None) if nodes else None
    if cls is not None and isinstance(cls, type) and not issubclass(cls, fam.model_class):
        raise ValueError(f"config key model.kind = {kind!r} (model class {fam.model_class.__name__}) but the "
                         f"model is a {cls.__name__}")
    return fam


def family_for_weights(config: dict, where: str) -> ModelFamily:
    """The family of a transformer folder from its ``config.json`` (Flax model name or ``_class_name``)."""
    from awm_jax.convert import ConversionError, is_flax_folder

    for name in BUILTIN_FAMILIES:
        if name != "toy":
            get_family(name)
    model = config.get("awm_jax", {}).get("model") if is_flax_folder(config) else None
    cls = config.get("_class_name")
    if model is None and cls is None:  # a hand-written diffusers config without _class_name
        return get_family("sd35")
    for fam in _REGISTRY.values():
        if fam.name == "toy":
            continue
        if (model is not None and model == fam.converter) or (model is None and cls in fam.class_names):
            return fam
    raise ConversionError(f"{where}/config.json: no model family for "
                          f"{'Flax model ' + repr(model) if model else '_class_name ' + repr(cls)} "
                          f"(families: {family_names()})")
