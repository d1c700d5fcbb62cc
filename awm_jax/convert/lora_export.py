"""Export trained LoRA weights back to diffusers: peft-format LoRA folders and merged full weights.

Trainer workdirs (``python -m awm_jax.train --workdir DIR``) are read by :mod:`awm_jax.export`, which uses
the formats written here.

A *Flax LoRA folder* (what :func:`save_flax_lora` writes and the CLI reads) is::

    DIR/lora_config.json   {"rank", "alpha", "model", "base_model", "algorithm", "reward", "step", "which"}
    DIR/lora.safetensors   {"transformer_blocks.0.attn.to_q.lora_a": (in, r), "...lora_b": (r, out)}

:func:`write_peft_lora` writes ``pytorch_lora_weights.safetensors`` with diffusers/peft keys
(``transformer.<module>.lora_A.weight (r, in)``, ``lora_B.weight (out, r)``) that
diffusers' ``<Transformer>.load_lora_adapter`` / ``<Pipeline>.load_lora_weights`` accept, with the LoRA
config stored in the safetensors header (``lora_adapter_metadata``) so ``lora_alpha`` is honoured.
:func:`merge_lora` folds ``W + A B * alpha / r`` into base Flax kernels.
Every exported folder gets a ``README.md``.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from awm_jax.convert import ConversionError, get_converter
from awm_jax.deprecation import aliases as _deprecated_aliases

PEFT_WEIGHTS = "pytorch_lora_weights.safetensors"
FLAX_LORA_CONFIG = "lora_config.json"
FLAX_LORA_WEIGHTS = "lora.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PREFIX = "transformer"
CARD_FIELDS = ("base_model", "algorithm", "reward", "step", "which")


def _linear_modules(config: Mapping[str, Any], model: str) -> set[str]:
    """Diffusers names of every Linear in converter ``model``'s key map (``.weight`` <-> ``.kernel``)."""
    km = get_converter(model).key_map(config)
    flax = set(km.flax_keys())
    return {k[: -len(".weight")] for k in km.diffusers_keys()
            if k.endswith(".weight") and f"{k[: -len('.weight')]}.kernel" in flax}


def split_lora_params(params: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{module.lora_a, module.lora_b}`` -> ``{module: (a (in, r), b (r, out))}``; raises on orphans."""
    mods: dict[str, dict[str, np.ndarray]] = {}
    for k, v in params.items():
        mod, _, leaf = k.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise ConversionError(f"LoRA params: key {k!r} is not a lora_a/lora_b tensor")
        mods.setdefault(mod, {})[leaf] = np.asarray(v, np.float32)
    out = {}
    for mod, d in sorted(mods.items()):
        if set(d) != {"lora_a", "lora_b"}:
            missing = ({'lora_a', 'lora_b'} - set(d)).pop()
            raise ConversionError(f"LoRA params: module {mod!r} lacks {missing}")
        a, b = d["lora_a"], d["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ConversionError(f"LoRA params: module {mod!r} has shapes a{a.shape} b{b.shape}")
        out[mod] = (a, b)
    return out


def lora_to_peft(params: Mapping[str, Any], model_config: Mapping[str, Any], rank: int, alpha: float,
                 model: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Flax LoRA params -> (diffusers/peft state dict, peft adapter config) for converter ``model``'s
    transformer. Raises on modules that are not a Linear of its key map."""
    known = _linear_modules(model_config, model)
    sd, targets = {}, set()
    for mod, (a, b) in split_lora_params(params).items():
        if mod not in known:
            raise ConversionError(f"LoRA module {mod!r} is not a Linear in the {model} key map")
        if a.shape[1] != rank:
            raise ConversionError(f"LoRA module {mod!r}: rank {a.shape[1]} != config rank {rank}")
        sd[f"{PREFIX}.{mod}.lora_A.weight"] = np.ascontiguousarray(a.T)
        sd[f"{PREFIX}.{mod}.lora_B.weight"] = np.ascontiguousarray(b.T)
        targets.add(mod)
    cfg = {"r": int(rank), "lora_alpha": float(alpha), "target_modules": sorted(targets),
           "init_lora_weights": True, "lora_dropout": 0.0, "bias": "none"}
    return sd, cfg


def write_model_card(dst: str | os.PathLike, info: Mapping[str, Any], kind: str) -> pathlib.Path:
    """Write ``dst/README.md``: base model, algorithm, reward, steps, rank/alpha, which weights."""
    lines = [f"# awm-jax {kind}", "", "Exported by `tools/convert_weights.py` (awm-jax).", ""]
    for f in (*CARD_FIELDS, "rank", "alpha"):
        lines.append(f"- {f}: {info.get(f, 'unknown')}")
    p = pathlib.Path(dst) / "README.md"
    p.write_text("\n".join(lines) + "\n")
    return p


def save_flax_lora(params: Mapping[str, Any], info: Mapping[str, Any], dst: str | os.PathLike
                   ) -> pathlib.Path:
    """Write a Flax LoRA folder (``lora_config.json`` with rank/alpha + card fields, weights)."""
    from safetensors.numpy import save_file

    for f in ("rank", "alpha"):
        if f not in info:
            raise ConversionError(f"save_flax_lora: info lacks {f!r}")
    d = pathlib.Path(dst)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: np.asarray(v, np.float32) for k, v in params.items()}, str(d / FLAX_LORA_WEIGHTS))
    (d / FLAX_LORA_CONFIG).write_text(json.dumps(dict(info), indent=2, default=str))
    return d


def load_flax_lora(src: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a Flax LoRA folder -> (params, info). Clear error naming the missing file."""
    from safetensors.numpy import load_file

    d = pathlib.Path(src)
    for name in (FLAX_LORA_CONFIG, FLAX_LORA_WEIGHTS):
        if not (d / name).is_file():
            raise ConversionError(f"LoRA checkpoint {d}: missing {name} (expected a Flax LoRA folder)")
    return load_file(str(d / FLAX_LORA_WEIGHTS)), json.loads((d / FLAX_LORA_CONFIG).read_text())


def read_peft_lora(src: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A diffusers/peft LoRA folder written by :func:`write_peft_lora` -> ``(Flax params {module.lora_a|b}
    (in, r) / (r, out), info {rank, alpha})``; rank and alpha come from the safetensors header."""
    from safetensors import safe_open

    f = pathlib.Path(src) / PEFT_WEIGHTS
    with safe_open(str(f), framework="np") as fh:
        meta = json.loads((fh.metadata() or {}).get(METADATA_KEY, "{}"))
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    rank, alpha = meta.get(f"{PREFIX}.r"), meta.get(f"{PREFIX}.lora_alpha")
    if rank is None or alpha is None:
        raise ConversionError(f"{f}: the header has no {METADATA_KEY} with {PREFIX}.r and "
                              f"{PREFIX}.lora_alpha (not an awm-jax export)")
    params = {}
    for k, v in tensors.items():
        if not (k.startswith(PREFIX + ".") and k.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise ConversionError(f"{f}: tensor {k!r} is not {PREFIX}.<module>.lora_A/lora_B.weight")
        mod, leaf = k[len(PREFIX) + 1:].rsplit(".", 2)[0], k.rsplit(".", 2)[1]
        params[f"{mod}.{'lora_a' if leaf == 'lora_A' else 'lora_b'}"] = np.ascontiguousarray(np.asarray(v).T)
    return params, {"rank": int(rank), "alpha": float(alpha)}


def read_lora_folder(src: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A Flax LoRA folder (``lora_config.json``) or a diffusers/peft one
    (``pytorch_lora_weights.safetensors``) -> ``(params, info)``; anything else raises
    :class:`ConversionError` saying how to make one."""
    d = pathlib.Path(src)
    if (d / FLAX_LORA_CONFIG).is_file():
        return load_flax_lora(d)
    if not (d / PEFT_WEIGHTS).is_file():
        raise ConversionError(f"{src}: neither a peft LoRA folder ({PEFT_WEIGHTS}) nor a Flax LoRA folder "
                              f"({FLAX_LORA_CONFIG}); export one with tools/convert_weights.py export-lora")
    return read_peft_lora(d)


def write_peft_lora(params: Mapping[str, Any], info: Mapping[str, Any], dst: str | os.PathLike,
                    model_config: Mapping[str, Any], model: str) -> pathlib.Path:
    """Flax LoRA ``params`` (+ ``info`` with rank/alpha and card fields) -> diffusers/peft LoRA folder
    ``dst`` (weights with the adapter config in the safetensors header, + README.md)."""
    from safetensors.numpy import save_file

    sd, cfg = lora_to_peft(params, model_config, int(info["rank"]), float(info["alpha"]), model)
    d = pathlib.Path(dst)
    d.mkdir(parents=True, exist_ok=True)
    meta = {METADATA_KEY: json.dumps({f"{PREFIX}.{k}": v for k, v in cfg.items()}),
            "format": "pt"}
    save_file(sd, str(d / PEFT_WEIGHTS), metadata=meta)
    write_model_card(d, info, "LoRA (diffusers/peft format)")
    return d


def merge_lora(base: Mapping[str, np.ndarray], params: Mapping[str, Any], rank: int, alpha: float
               ) -> dict[str, np.ndarray]:
    """Fold ``kernel += a @ b * alpha / rank`` into base Flax params (``module.kernel``); dtype kept."""
    out = dict(base)
    scale = float(alpha) / int(rank)
    for mod, (a, b) in split_lora_params(params).items():
        key = f"{mod}.kernel"
        if key not in out:
            raise ConversionError(f"merge_lora: LoRA module {mod!r} has no base kernel {key!r}")
        w = np.asarray(out[key])
        delta = (a @ b) * scale
        if delta.shape != w.shape:
            raise ConversionError(f"merge_lora: {mod!r} delta {delta.shape} != kernel {w.shape}")
        out[key] = (w.astype(np.float32) + delta).astype(w.dtype)
    return out


# deprecated aliases of names that moved (awm_jax/deprecation.py, CHANGELOG.md)
__getattr__ = _deprecated_aliases(__name__)
