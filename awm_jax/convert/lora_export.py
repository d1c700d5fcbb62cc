"""Export trained LoRA weights back to diffusers: peft-format LoRA folders and merged full weights.

A *trainer workdir* (``python -m awm_jax.train --workdir DIR``: ``config.json`` + orbax ``checkpoints/``)
works as a source too: :func:`lora_from_workdir` reads its policy or eval-EMA adapters.

A *Flax LoRA folder* (what :func:`save_flax_lora` writes and the CLI reads) is::

    DIR/lora_config.json   {"rank", "alpha", "base_model", "algorithm", "reward", "step", "which"}
    DIR/lora.safetensors   {"transformer_blocks.0.attn.to_q.lora_a": (in, r), "...lora_b": (r, out)}

:func:`export_peft_lora` writes ``pytorch_lora_weights.safetensors`` with diffusers/peft keys
(``transformer.<module>.lora_A.weight (r, in)``, ``lora_B.weight (out, r)``) that
``SD3Transformer2DModel.load_lora_adapter`` / ``StableDiffusion3Pipeline.load_lora_weights`` accept, with the
LoRA config stored in the safetensors header (``lora_adapter_metadata``) so ``lora_alpha`` is honoured.
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

from awm_jax.convert import ConversionError

PEFT_WEIGHTS = "pytorch_lora_weights.safetensors"
FLAX_LORA_CONFIG = "lora_config.json"
FLAX_LORA_WEIGHTS = "lora.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PREFIX = "transformer"
CARD_FIELDS = ("base_model", "algorithm", "reward", "step", "which")


def _linear_modules(config: Mapping[str, Any]) -> set[str]:
    """Diffusers module names of every Linear in the SD3 key map (modules with a ``.weight`` 2-D kernel)."""
    from awm_jax.convert import sd3

    km = sd3.key_map(config)
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
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Flax LoRA params -> (diffusers/peft state dict, peft adapter config). Raises on unmapped modules."""
    known = _linear_modules(model_config)
    sd, targets = {}, set()
    for mod, (a, b) in split_lora_params(params).items():
        if mod not in known:
            raise ConversionError(f"LoRA module {mod!r} is not a Linear in the SD3 key map")
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


def export_peft_lora(src: str | os.PathLike, dst: str | os.PathLike, model_config: Mapping[str, Any],
                     which: str = "policy", step: int | None = None) -> pathlib.Path:
    """Flax LoRA folder or trainer workdir ``src`` -> diffusers/peft LoRA folder ``dst`` (weights with
    metadata + README.md); ``which``/``step`` pick the adapter of a workdir (see :func:`load_lora`)."""
    from safetensors.numpy import save_file

    params, info = load_lora(src, which, step)
    sd, cfg = lora_to_peft(params, model_config, int(info["rank"]), float(info["alpha"]))
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


# ------------------------------------------------------------------------------------------ trainer workdirs

WHICH = ("policy", "eval_ema")


def is_workdir(path: str | os.PathLike) -> bool:
    """True for a trainer workdir (``config.json`` + ``checkpoints/``), not a Flax LoRA folder."""
    d = pathlib.Path(path)
    return (d / "config.json").is_file() and (d / "checkpoints").is_dir()


def workdir_model_config(config: Mapping[str, Any], workdir: str | os.PathLike = "") -> dict[str, Any]:
    """The transformer's diffusers config of the run's ``model.path`` (diffusers, pipeline, Flax or toy)."""
    from awm_jax.convert import read_flax_params

    path = str((config.get("model") or {}).get("path") or "")
    if not path:
        raise ConversionError(f"workdir {workdir}: config.json has no model.path")
    p = pathlib.Path(path)
    toy = p / "config.json"
    if toy.is_file():
        d = json.loads(toy.read_text())
        if isinstance(d.get("transformer"), dict):  # the toy checkpoint: {"transformer": {...}, "text": ...}
            return dict(d["transformer"])
    try:
        cfg, _, tensors = read_flax_params(p, "sd3")
    except (OSError, ValueError) as e:
        raise ConversionError(f"workdir {workdir}: cannot read model.path {path!r} ({e})") from e
    close = getattr(tensors, "close", None)
    if close is not None:
        close()
    return dict(cfg)


def _abstract_train_state(config, model_cfg: Mapping[str, Any]):
    """Shape-only ``TrainState`` the trainer would create for this config (no weights allocated)."""
    import jax
    from flax import nnx

    from awm_jax.models.mmdit import SD3Config, SD3Transformer2DModel
    from awm_jax.rl import train_step as ts

    cfg = SD3Config.from_dict(dict(model_cfg), source="model.path config")
    scan = bool(config.model.get("scan_layers", False) or False)

    def make():
        model = SD3Transformer2DModel(cfg, rngs=nnx.Rngs(0), scan_layers=scan)
        return ts.create_train_state(model, config)[2]

    return jax.eval_shape(make), cfg


def _restore_leaves(workdir: pathlib.Path, step: int | None) -> tuple[int, list[np.ndarray]]:
    """Raw (target-free) restore of the checkpointed ``{"leaves": {"00000": ...}, "rng"}`` tree."""
    import orbax.checkpoint as ocp

    ckdir = workdir / "checkpoints"
    mngr = ocp.CheckpointManager(ckdir.resolve(), item_names=("state", "meta"),
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = sorted(mngr.all_steps())
        if not steps:
            raise ConversionError(f"workdir {workdir}: no checkpoint under {ckdir}")
        if step is None:
            step = steps[-1]
        elif int(step) not in steps:
            raise ConversionError(f"workdir {workdir}: no checkpoint at step {step} (saved steps: {steps})")
        out = mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        mngr.close()
    tree = out["state"]
    if not isinstance(tree, Mapping) or "leaves" not in tree:
        raise ConversionError(f"workdir {workdir}: checkpoint {step} is not a trainer state (no 'leaves')")
    leaves = tree["leaves"]
    return int(step), [np.asarray(leaves[k]) for k in sorted(leaves)]


def lora_from_workdir(workdir: str | os.PathLike, which: str = "policy", step: int | None = None
                      ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """LoRA of a trainer workdir's checkpoint -> ``(per-layer params {path.lora_a|b: array}, info)``.

    ``which``: ``"policy"`` (the trained adapters) or ``"eval_ema"`` (the evaluation EMA); ``step``: a saved
    step (default: the newest). The checkpoint (flat leaves of ``TrainState``, see ``awm_jax.train``) is
    restored without a target and matched against the ``TrainState`` shapes the run's ``config.json`` implies;
    scanned layer groups are unstacked to ``transformer_blocks.{i}`` paths. ``info`` has ``base_model``,
    ``algorithm``, ``reward``, ``step``, ``rank``, ``alpha``, ``which``.
    """
    import jax
    import ml_collections
    from flax import nnx

    from awm_jax.models.mmdit import unstack_state

    d = pathlib.Path(workdir)
    if which not in WHICH:
        raise ConversionError(f"workdir {d}: unknown which={which!r}, expected one of {WHICH}")
    if not is_workdir(d):
        raise ConversionError(f"workdir {d}: not a trainer workdir (needs config.json and checkpoints/)")
    raw = json.loads((d / "config.json").read_text())
    config = ml_collections.ConfigDict(raw)
    if bool(config.lora.get("full_finetune", False)):
        raise ConversionError(f"workdir {d}: lora.full_finetune run has no LoRA to export")
    abstract, cfg = _abstract_train_state(config, workdir_model_config(raw, d))
    step, leaves = _restore_leaves(d, step)
    n_exp = len(jax.tree.leaves(abstract))
    if len(leaves) != n_exp:
        raise ConversionError(f"workdir {d}: checkpoint {step} holds {len(leaves)} arrays, the config "
                              f"implies {n_exp} (config.json does not match the checkpoint)")
    part = abstract.trainable if which == "policy" else abstract.eval_ema
    if part is None:
        raise ConversionError(f"workdir {d}: the run keeps no eval EMA (config ema.eval_ema is off)")
    # offsets of each TrainState field in the flat leaf list (field order of the dataclass)
    offset = 0
    for name in ("step", "trainable", "opt_state", "kl_ema", "eval_ema"):
        if name == ("trainable" if which == "policy" else "eval_ema"):
            break
        offset += len(jax.tree.leaves(getattr(abstract, name)))
    flat_abs, treedef = jax.tree.flatten(part)
    values = []
    for i, a in enumerate(flat_abs):
        v = leaves[offset + i]
        if tuple(v.shape) != tuple(a.shape):
            raise ConversionError(f"workdir {d}: checkpoint {step} array {offset + i} has shape {v.shape}, "
                                  f"expected {tuple(a.shape)}")
        values.append(v.astype(np.float32))
    state = jax.tree.unflatten(treedef, values)
    if any(p and p[0] == "transformer_block_groups" for p, _ in nnx.to_flat_state(state)):
        state = unstack_state(state, cfg)
    params = {".".join(str(k) for k in p): np.asarray(v[...] if hasattr(v, "get_value") else v)
              for p, v in nnx.to_flat_state(state)}
    lora = config.lora
    info = {"base_model": str(config.model.get("path", "")), "algorithm": str(config.get("algorithm", "")),
            "reward": str(config.reward.get("name", "")) if "reward" in config else "", "step": step,
            "rank": int(lora.rank), "alpha": float(lora.alpha), "which": which}
    return params, info


def load_lora(src: str | os.PathLike, which: str = "policy", step: int | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Flax LoRA folder or trainer workdir -> (params, info); ``which``/``step`` apply to workdirs only."""
    if is_workdir(src):
        return lora_from_workdir(src, which, step)
    if which != "policy" or step is not None:
        raise ConversionError(f"{src}: --which/--step need a trainer workdir (config.json + checkpoints/)")
    return load_flax_lora(src)
