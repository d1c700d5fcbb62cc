"""Reading trained adapters out of trainer workdirs and exporting them to diffusers.

A *trainer workdir* (``python -m awm_jax.train --workdir DIR``) holds ``config.json`` and orbax
``checkpoints/`` of named items (``awm_jax.checkpoint``). :func:`lora_from_workdir` restores the
``trainable`` (policy) or ``eval_ema`` item alone, by name and without a target (no optimizer is built), and
unstacks scanned block groups through the model family of the run's ``model.kind``. :func:`export_peft_lora`
writes a diffusers/peft LoRA folder from a workdir or a Flax LoRA folder
(``awm_jax.convert.lora_export``).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from awm_jax.checkpoint import CheckpointFormatError, CheckpointLookupError, flat_params, restore_item
from awm_jax.convert import ConversionError
from awm_jax.convert.lora_export import load_flax_lora, write_peft_lora
from awm_jax.models.family import ModelFamily, get_family
from awm_jax.models.stacking import unstack_state
from awm_jax.resume_check import saved_config

__all__ = ["WHICH", "export_peft_lora", "is_workdir", "load_lora", "lora_from_workdir", "workdir_model"]

WHICH = ("policy", "eval_ema")
_ITEM = {"policy": "trainable", "eval_ema": "eval_ema"}


def is_workdir(path: str | os.PathLike) -> bool:
    """True for a trainer workdir (``config.json`` + ``checkpoints/``), not a Flax LoRA folder."""
    d = pathlib.Path(path)
    return (d / "config.json").is_file() and (d / "checkpoints").is_dir()


def _run_config(workdir: pathlib.Path) -> dict:
    try:
        return json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"workdir {workdir}: cannot read config.json ({e})") from None


def workdir_model(config: Mapping[str, Any], workdir: str | os.PathLike = "") -> tuple[ModelFamily, dict]:
    """``(family, transformer config dict)`` of a run: ``model.kind``'s family reading ``model.path``."""
    model = config.get("model") or {}
    kind, path = str(model.get("kind", "")), str(model.get("path") or "")
    try:
        fam = get_family(kind)
    except KeyError as e:
        raise ConversionError(f"workdir {workdir}: config.json model.kind: {e.args[0]}") from None
    try:
        return fam, dict(fam.model_config(path))
    except (OSError, ValueError) as e:
        raise ConversionError(f"workdir {workdir}: cannot read model.path {path!r} ({e})") from e


def lora_from_workdir(workdir: str | os.PathLike, which: str = "policy", step: int | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """LoRA of a trainer workdir's checkpoint -> ``(per-layer params {path.lora_a|b: array}, info)``.

    ``which``: ``"policy"`` (the trained adapters) or ``"eval_ema"`` (the evaluation EMA); ``step``: a saved
    step (default: the newest). ``info`` has ``model`` (converter name), ``base_model``, ``algorithm``,
    ``reward``, ``step``, ``rank``, ``alpha``, ``which``.
    """
    d = pathlib.Path(workdir)
    if which not in WHICH:
        raise ConversionError(f"workdir {d}: unknown which={which!r}, expected one of {WHICH}")
    if not is_workdir(d):
        raise ConversionError(f"workdir {d}: not a trainer workdir (needs config.json and checkpoints/)")
    try:  # the restored checkpoint's own config (a resumed run's config.json is its first one)
        config = saved_config(str(d), step) or _run_config(d)
    except CheckpointFormatError as e:
        raise ConversionError(f"workdir {d}: {e}") from None
    lora = config.get("lora") or {}
    if lora.get("full_finetune"):
        raise ConversionError(f"workdir {d}: lora.full_finetune run has no LoRA to export")
    fam, model_cfg = workdir_model(config, d)
    try:
        step, tree = restore_item(str(d / "checkpoints"), _ITEM[which], step)
    except CheckpointFormatError as e:
        raise ConversionError(f"workdir {d}: {e}") from None
    except CheckpointLookupError as e:
        hint = " (for eval_ema: config ema.eval_ema is off)" if which == "eval_ema" else ""
        raise ConversionError(f"workdir {d}: {e}{hint}") from None
    cfg = fam.config_from_dict(model_cfg, source=f"workdir {d} model")
    params = flat_params(unstack_state(tree, fam.stacks(cfg)))
    reward = str((config.get("reward") or {}).get("name", ""))
    info = {"model": fam.converter, "base_model": str((config.get("model") or {}).get("path", "")),
            "algorithm": str(config.get("algorithm", "")), "reward": reward,
            "step": int(step), "rank": int(lora["rank"]), "alpha": float(lora["alpha"]), "which": which}
    return params, info


def load_lora(src: str | os.PathLike, which: str = "policy", step: int | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flax LoRA folder or trainer workdir -> (params, info); ``which``/``step`` apply to workdirs only."""
    if is_workdir(src):
        return lora_from_workdir(src, which, step)
    if which != "policy" or step is not None:
        raise ConversionError(f"{src}: --which/--step need a trainer workdir (config.json + checkpoints/)")
    return load_flax_lora(src)


def export_peft_lora(src: str | os.PathLike, dst: str | os.PathLike,
                     model_config: Mapping[str, Any] | None = None, which: str = "policy",
                     step: int | None = None, model: str | None = None) -> pathlib.Path:
    """Flax LoRA folder or trainer workdir ``src`` -> diffusers/peft LoRA folder ``dst``.

    ``model_config``: the base transformer's diffusers config (default: the workdir's ``model.path``);
    ``model``: the converter name (default: the LoRA's ``info["model"]``, else ``"sd3"`` for old folders).
    """
    params, info = load_lora(src, which, step)
    if model_config is None:
        if not is_workdir(src):
            raise ConversionError(f"{src} is not a trainer workdir: give the base model's config")
        model_config = workdir_model(saved_config(str(src), step) or _run_config(pathlib.Path(src)), src)[1]
    name = model or str(info.get("model") or get_family("sd35").converter)
    return write_peft_lora(params, info, dst, model_config, name)
