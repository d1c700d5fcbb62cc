"""What ``python -m awm_jax.evaluate`` compares: trained runs and pipeline folders (with a LoRA), loaded
through the trainer's own code paths.

A *subject* is the model family's pipeline (``load_pipeline(config, mesh)``: weights born sharded on the
mesh), the train state of :func:`awm_jax.rl.train_step.create_train_state` and the trainer's evaluation
sampler (:func:`awm_jax.rl.train_step.make_rollout_fn` with the deterministic ODE of ``eval.num_steps``
steps at ``eval.guidance_scale``, exactly as ``awm_jax.train.default_components`` builds it), so a run is
evaluated by the sampler its held-out evaluations used, split over every device (and host) of the mesh.

- ``--run WORKDIR``: the config is the checkpoint's own ``config`` item (what that step was trained with;
  ``config.json`` when an old checkpoint lacks it), the adapter item ``--which`` (trainable, eval_ema,
  kl_ema) of ``--step`` (default newest) is restored by name.
- ``--model DIR [--lora X]``: the family's shipped config (``configs/<sd35m|flux>_geneval.py``, or
  ``--config FILE``) with ``model.path = DIR``; an exported LoRA folder is folded into the weights
  (``awm_jax.sample.apply_lora``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

import ml_collections

from awm_jax.evaluation.benchmarks import EvalError

_REPO_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


@dataclasses.dataclass
class SubjectSpec:
    """One ``--run`` or ``--model`` argument (``lora``/``which``/``step`` attached to it)."""

    kind: str  # "run" | "model"
    path: str
    lora: str | None = None
    which: str | None = None
    step: int | None = None

    def describe(self) -> dict:
        out = {self.kind: self.path}
        if self.lora:
            out["lora"] = self.lora
        if self.kind == "run":
            out["which"] = self.which or "trainable"
        return out


@dataclasses.dataclass
class Subject:
    label: str
    spec: SubjectSpec
    config: ml_collections.ConfigDict
    pipeline: Any
    params: Any  # the adapter (LoRA) state sampled with
    base_state: Any
    rollout: Any  # trainer's eval rollout: (params, base, emb, pooled, key) -> {"x0"}
    step: int | None = None

    def describe(self) -> dict:
        out = {"label": self.label, **self.spec.describe()}
        if self.step is not None:
            out["step"] = self.step
        out["eval.num_steps"] = int(self.config.eval.num_steps)
        out["eval.guidance_scale"] = float(self.config.eval.guidance_scale)
        return out


def label_of(spec: SubjectSpec, step: int | None) -> str:
    """A short name for tables and folders: ``<run>@<step>[.<which>]`` or ``<model>[+<lora>]``."""
    name = pathlib.Path(spec.path.rstrip("/")).name or "model"
    if spec.kind == "run":
        name += f"@{step}" + ("" if (spec.which or "trainable") == "trainable" else f".{spec.which}")
    elif spec.lora:
        name += "+" + (pathlib.Path(spec.lora.rstrip("/")).name or "lora")
    return re.sub(r"[^A-Za-z0-9_.@+-]", "_", name)


def run_config(spec: SubjectSpec) -> tuple[ml_collections.ConfigDict, int]:
    """``(config, step)`` of a run: the ``config`` item of checkpoint ``spec.step`` (default newest)."""
    from awm_jax import sample
    from awm_jax.checkpoint import CheckpointFormatError, CheckpointLookupError, restore_item

    wd = pathlib.Path(spec.path)
    if not (wd / "checkpoints").is_dir():
        raise EvalError(f"--run {spec.path}: not a trainer workdir (no checkpoints/ folder)")
    try:
        step, item = restore_item(str(wd / "checkpoints"), "config", spec.step)
        cfg = ml_collections.ConfigDict(json.loads(json.dumps(item)))
    except CheckpointLookupError as e:
        if "keeps no" not in str(e):
            raise EvalError(f"--run {spec.path}: {e}") from None
        try:  # an old checkpoint without the config item: the workdir's config.json
            cfg = sample.run_config(spec.path)
        except sample.SampleError as e2:
            raise EvalError(str(e2)) from None
        step = spec.step
    except CheckpointFormatError as e:
        raise EvalError(f"--run {spec.path}: {e}") from None
    for key in ("model", "lora", "eval", "sample"):
        if key not in cfg:
            raise EvalError(f"--run {spec.path}: the run's config has no {key!r} section")
    return cfg, step


def model_config(spec: SubjectSpec, config_path: str | None) -> ml_collections.ConfigDict:
    """The config of a ``--model`` subject: ``config_path`` (else the family's shipped config) with
    ``model.path = spec.path``."""
    from awm_jax import config_lib

    path = config_path
    if path is None:
        from awm_jax.models import detect_family

        try:
            family = detect_family(spec.path)
        except (OSError, ValueError) as e:
            raise EvalError(f"--model {spec.path}: cannot recognise the model family ({e}); give --config "
                            "FILE (e.g. configs/toy.py for a toy checkpoint)") from None
        fam = family.name
        path = str(_REPO_CONFIGS / family.default_config)
        if not family.default_config or not pathlib.Path(path).is_file():
            raise EvalError(f"--model {spec.path}: no shipped config for model family {fam!r} at {path}; "
                            "give --config FILE")
    try:
        cfg = config_lib.load_config(path)
    except (config_lib.ConfigError, OSError) as e:
        raise EvalError(f"--config {path}: {e}") from None
    cfg.model.path = spec.path
    return cfg


def eval_config(cfg: ml_collections.ConfigDict, steps: int | None, guidance_scale: float | None):
    """The trainer's evaluation-sampler config (``default_components``): AWM, the ODE of ``eval.num_steps``
    steps at ``eval.guidance_scale`` (``steps`` / ``guidance_scale`` override them)."""
    e = ml_collections.ConfigDict(cfg.to_dict())
    if steps is not None:
        e.eval.num_steps = int(steps)
    if guidance_scale is not None:
        e.eval.guidance_scale = float(guidance_scale)
    e.algorithm = "awm"
    e.sample.sampler = "ode"
    e.sample.num_steps = int(e.eval.num_steps)
    e.sample.noise_level = 0.0
    e.sample.guidance_scale = float(e.eval.guidance_scale)
    return e


def load_subject(spec: SubjectSpec, mesh, config_path: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, overrides=()) -> Subject:
    """Load one subject onto ``mesh`` (see the module docstring); ``overrides``: ``(key, value)`` config
    overrides (``--set``), applied before ``steps`` / ``guidance_scale``."""
    import jax.numpy as jnp

    from awm_jax import config_lib, sample
    from awm_jax.convert import ConversionError
    from awm_jax.models.family import get_family
    from awm_jax.rl import train_step as ts

    if spec.kind == "run":
        cfg, step = run_config(spec)
    else:
        cfg, step = model_config(spec, config_path), None
    try:
        config_lib.apply_overrides(cfg, list(overrides))
    except config_lib.ConfigError as e:
        raise EvalError(f"--set: {e}") from None
    cfg = eval_config(cfg, steps, guidance_scale)
    try:
        pipe = get_family(str(cfg.model.kind)).load_pipeline(cfg, mesh=mesh)
    except (OSError, ValueError, KeyError, ConversionError) as e:
        raise EvalError(f"--{spec.kind} {spec.path}: cannot load the pipeline ({e})") from None
    if spec.lora:
        try:
            sample.apply_lora(pipe.transformer, spec.lora)
        except sample.SampleError as e:
            raise EvalError(str(e)) from None
    graphdef, base_state, state = ts.create_train_state(pipe.transformer, cfg)
    params = state.trainable
    if spec.kind == "run":
        which = spec.which or "trainable"
        try:
            step, params = sample.restore_adapter(spec.path, which, step, {which: state.trainable})
        except sample.SampleError as e:
            raise EvalError(str(e)) from None
    negative = None
    if float(cfg.eval.guidance_scale) != 1.0:
        neg_e, neg_p = pipe.text_encoder.encode([""])
        negative = (jnp.asarray(neg_e[:1]), jnp.asarray(neg_p[:1]))
    rollout = ts.make_rollout_fn(graphdef, cfg, mesh, latent_shape=tuple(pipe.latent_shape),
                                 negative=negative)
    return Subject(label_of(spec, step), spec, cfg, pipe, params, base_state, rollout, step)
