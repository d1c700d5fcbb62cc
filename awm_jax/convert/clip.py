"""CLIP key maps: transformers ``CLIPModel`` folders and open_clip checkpoints <-> ``awm_jax.models.clip``.

Two declarative maps onto the same Flax tree (whose names follow transformers):

* :func:`key_map` (registered converter ``"clip"``): a transformers ``CLIPModel`` folder (``config.json`` +
  ``model.safetensors``): towers ``vision_model.*`` / ``text_model.*``, ``visual_projection``,
  ``text_projection`` (Linear without bias), ``logit_scale``; the ``position_ids`` buffers older
  checkpoints carry are optional (the Flax model recomputes them).
* :func:`open_clip_key_map`: an open_clip ``CLIP`` state dict (HPSv2.1 ships one for ViT-H-14):
  ``visual.conv1``, ``visual.class_embedding``, ``visual.positional_embedding``, ``visual.ln_pre``,
  ``visual.transformer.resblocks.i.{ln_1, attn.in_proj_weight / in_proj_bias, attn.out_proj, ln_2,
  mlp.c_fc, mlp.c_proj}``, ``visual.ln_post``, ``visual.proj`` ``(width, embed)`` (already the Flax
  ``(in, out)`` layout), the text tower at the top level (``token_embedding``, ``positional_embedding``,
  ``transformer.*``, ``ln_final``, ``text_projection``) and ``logit_scale``. The fused attention input maps
  onto the Flax ``self_attn.in_proj`` Dense (kind ``mha_in_proj``). An open_clip state dict carries no
  config: the architecture comes from open_clip's model config (``embed_dim``, ``vision_cfg``,
  ``text_cfg``, ``quick_gelu``), a built-in name (:data:`OPEN_CLIP_ARCHS`) or a JSON file of that format;
  options this port does not implement (layer scale, attentional pooling, other pool types, projection
  bias, ...) are refused by name.

:func:`read_open_clip` streams such a checkpoint (``.safetensors`` through ``convert.io``; torch ``.pt`` /
``.bin`` through ``torch.load(mmap=True, weights_only=True)``) as validated ``(flax_key, array)`` pairs;
missing, unexpected or mis-shaped tensors raise :class:`ConversionError` naming the key, shapes and file.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from awm_jax.convert.io import SafetensorsReader
from awm_jax.convert.keymap import LINEAR_T, ConversionError, Identity, KeyMap, Module, register_kind, same

NAME = "clip"
SUBFOLDER = ""
DIFFUSERS_WEIGHTS = "model"  # transformers' weight base name
CLASS_NAMES: tuple[str, ...] = ()  # transformers configs carry "architectures", not "_class_name"

TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
)
VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

# open_clip model configs (open_clip/model_configs/<name>.json) of the architectures the rewards use
OPEN_CLIP_ARCHS: dict[str, dict] = {
    "ViT-H-14": {
        "embed_dim": 1024,
        "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
    },
    "ViT-L-14": {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
    },
}
# open_clip options that change the computation; the value this port implements
_OPEN_CLIP_FIXED = {
    "vision_cfg": {
        "ls_init_value": None,
        "attentional_pool": False,
        "no_ln_pre": False,
        "pool_type": "tok",
        "final_ln_after_pool": False,
        "output_tokens": False,
        "global_average_pool": False,
        "timm_model_name": None,
        "hf_model_name": None,
        "act_kwargs": None,
        "norm_kwargs": None,
        "pos_embed_type": "learnable",
        "embed_cls": False,
    },
    "text_cfg": {
        "ls_init_value": None,
        "pool_type": "argmax",
        "proj_bias": False,
        "proj_type": "linear",
        "embed_cls": False,
        "no_causal_mask": False,
        "final_ln_after_pool": False,
        "hf_model_name": None,
        "act_kwargs": None,
        "norm_kwargs": None,
        "attn_pooler_heads": None,
    },
    "": {"init_logit_bias": None},
}


@register_kind("mha_in_proj")
def _mha_in_proj(dim: int) -> list:
    """``nn.MultiheadAttention``'s fused input: ``in_proj_weight (3D, D)`` <-> kernel ``(D, 3D)``; bias."""
    return [
        ("in_proj_weight", "kernel", (3 * dim, dim), LINEAR_T),
        ("in_proj_bias", "bias", (3 * dim,), Identity()),
    ]


# ----------------------------------------------------------------------------------------------------
# configs -> the Flax model's constructor fields (awm_jax.models.clip.CLIPConfig)
# ----------------------------------------------------------------------------------------------------


def _section(config: Mapping[str, Any], key: str, defaults: dict) -> dict:
    sub = config.get(key) or {}
    if not isinstance(sub, Mapping):
        raise ConversionError(f"clip config: {key} must be an object, got {type(sub).__name__}")
    return {k: sub.get(k, v) for k, v in defaults.items()}


def model_fields(config: Mapping[str, Any]) -> dict:
    """The ``awm_jax.models.clip.CLIPConfig`` fields of a transformers ``CLIPModel`` config dict."""
    t = _section(config, "text_config", TEXT_DEFAULTS)
    v = _section(config, "vision_config", VISION_DEFAULTS)
    if float(t["layer_norm_eps"]) != float(v["layer_norm_eps"]):
        raise ConversionError(
            f"clip config: text layer_norm_eps {t['layer_norm_eps']} != vision "
            f"{v['layer_norm_eps']} (one eps is supported)"
        )
    eos = int(t["eos_token_id"])
    return dict(
        vision_hidden=int(v["hidden_size"]),
        vision_intermediate=int(v["intermediate_size"]),
        vision_layers=int(v["num_hidden_layers"]),
        vision_heads=int(v["num_attention_heads"]),
        image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]),
        vision_act=str(v["hidden_act"]),
        text_hidden=int(t["hidden_size"]),
        text_intermediate=int(t["intermediate_size"]),
        text_layers=int(t["num_hidden_layers"]),
        text_heads=int(t["num_attention_heads"]),
        vocab_size=int(t["vocab_size"]),
        max_positions=int(t["max_position_embeddings"]),
        text_act=str(t["hidden_act"]),
        projection_dim=int(config.get("projection_dim", 512)),
        eps=float(v["layer_norm_eps"]),
        # transformers' CLIPTextTransformer: eos_token_id == 2 (legacy configs) pools at argmax(ids)
        text_pool="argmax" if eos == 2 else "eos",
        eos_token_id=eos,
        fused_qkv=False,
    )


def open_clip_config(arch: str | os.PathLike | Mapping[str, Any]) -> dict:
    """An open_clip model config dict from a built-in name, a JSON file, or a dict (checked)."""
    if isinstance(arch, Mapping):
        cfg = dict(arch)
    elif str(arch) in OPEN_CLIP_ARCHS:
        cfg = OPEN_CLIP_ARCHS[str(arch)]
    elif str(arch).endswith(".json"):
        try:
            cfg = json.loads(pathlib.Path(arch).read_text())
        except FileNotFoundError:
            raise ConversionError(f"open_clip model config {arch} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConversionError(f"{arch}: invalid JSON ({e})") from None
    else:
        raise ConversionError(
            f"open_clip architecture {arch!r}: expected one of {sorted(OPEN_CLIP_ARCHS)} or a "
            "model-config .json file"
        )
    cfg = dict(cfg.get("model_cfg", cfg))  # open_clip's open_clip_config.json nests it
    for sec, fixed in _OPEN_CLIP_FIXED.items():
        sub = cfg if not sec else (cfg.get(sec) or {})
        for k, want in fixed.items():
            if k in sub and sub[k] != want and not (want is False and sub[k] is None):
                raise ConversionError(
                    f"open_clip config: {sec + '.' if sec else ''}{k}={sub[k]!r} is not "
                    f"supported (only {want!r})"
                )
    return cfg


def open_clip_fields(cfg: Mapping[str, Any]) -> dict:
    """The ``awm_jax.models.clip.CLIPConfig`` fields of an open_clip model config (open_clip's defaults)."""
    v, t = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    vw, tw = int(v.get("width", 768)), int(t.get("width", 512))
    act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    ps = v.get("patch_size", 16)
    size = v.get("image_size", 224)
    if isinstance(ps, (list, tuple)) or isinstance(size, (list, tuple)):
        if (
            len(set(ps if isinstance(ps, (list, tuple)) else [ps])) != 1
            or len(set(size if isinstance(size, (list, tuple)) else [size])) != 1
        ):
            raise ConversionError(f"open_clip config: non-square image_size {size} / patch_size {ps}")
        ps = ps[0] if isinstance(ps, (list, tuple)) else ps
        size = size[0] if isinstance(size, (list, tuple)) else size
    vocab = int(t.get("vocab_size", 49408))
    return dict(
        vision_hidden=vw,
        vision_intermediate=int(vw * float(v.get("mlp_ratio", 4.0))),
        vision_layers=int(v.get("layers", 12)),
        vision_heads=vw // int(v.get("head_width", 64)),
        image_size=int(size),
        patch_size=int(ps),
        vision_act=act,
        text_hidden=tw,
        text_intermediate=int(tw * float(t.get("mlp_ratio", 4.0))),
        text_layers=int(t.get("layers", 12)),
        text_heads=int(t.get("heads", 8)),
        vocab_size=vocab,
        max_positions=int(t.get("context_length", 77)),
        text_act=act,
        projection_dim=int(cfg.get("embed_dim", 512)),
        eps=1e-5,
        text_pool="argmax",
        eos_token_id=vocab - 1,
        fused_qkv=True,
    )


# ----------------------------------------------------------------------------------------------------
# key maps
# ----------------------------------------------------------------------------------------------------


def _layer(src: str, dst: str, dim: int, hidden: int, open_clip: bool) -> list[Module]:
    lin = lambda s, d, fi, fo: Module(
        f"{src}.{s}", f"{dst}.{d}", "linear", {"in_features": fi, "out_features": fo}
    )
    norm = lambda s, d: Module(f"{src}.{s}", f"{dst}.{d}", "norm", {"dim": dim})
    if open_clip:
        return [
            norm("ln_1", "layer_norm1"),
            Module(f"{src}.attn", f"{dst}.self_attn.in_proj", "mha_in_proj", {"dim": dim}),
            lin("attn.out_proj", "self_attn.out_proj", dim, dim),
            norm("ln_2", "layer_norm2"),
            lin("mlp.c_fc", "mlp.fc1", dim, hidden),
            lin("mlp.c_proj", "mlp.fc2", hidden, dim),
        ]
    mods = [
        lin(f"self_attn.{n}", f"self_attn.{n}", dim, dim) for n in ("q_proj", "k_proj", "v_proj", "out_proj")
    ]
    return mods + [
        norm("layer_norm1", "layer_norm1"),
        lin("mlp.fc1", "mlp.fc1", dim, hidden),
        lin("mlp.fc2", "mlp.fc2", hidden, dim),
        norm("layer_norm2", "layer_norm2"),
    ]


def module_map(config: Mapping[str, Any]) -> list[Module]:
    """The transformers ``CLIPModel`` module list of this config."""
    f = model_fields(config)
    vd, td, p = f["vision_hidden"], f["text_hidden"], f["patch_size"]
    n_pos = (f["image_size"] // p) ** 2 + 1
    ve, te = "vision_model.embeddings", "text_model.embeddings"
    mods = [
        same(f"{ve}.patch_embedding", "conv2d", in_channels=3, out_channels=vd, kernel_size=p, bias=False),
        same(f"{ve}.class_embedding", "tensor", shape=(vd,)),
        same(f"{ve}.position_embedding", "embedding", num_embeddings=n_pos, features=vd),
        Module(f"{ve}.position_ids", f"{ve}.position_ids", "tensor", {"shape": (1, n_pos)}, optional=True),
        same("vision_model.pre_layrnorm", "norm", dim=vd),
    ]
    for i in range(f["vision_layers"]):
        pre = f"vision_model.encoder.layers.{i}"
        mods += _layer(pre, pre, vd, f["vision_intermediate"], False)
    mods += [
        same("vision_model.post_layernorm", "norm", dim=vd),
        same(f"{te}.token_embedding", "embedding", num_embeddings=f["vocab_size"], features=td),
        same(f"{te}.position_embedding", "embedding", num_embeddings=f["max_positions"], features=td),
        Module(
            f"{te}.position_ids",
            f"{te}.position_ids",
            "tensor",
            {"shape": (1, f["max_positions"])},
            optional=True,
        ),
    ]
    for i in range(f["text_layers"]):
        pre = f"text_model.encoder.layers.{i}"
        mods += _layer(pre, pre, td, f["text_intermediate"], False)
    mods += [
        same("text_model.final_layer_norm", "norm", dim=td),
        same("visual_projection", "linear", in_features=vd, out_features=f["projection_dim"], bias=False),
        same("text_projection", "linear", in_features=td, out_features=f["projection_dim"], bias=False),
        same("logit_scale", "tensor", shape=()),
    ]
    return mods


def key_map(config: Mapping[str, Any]) -> KeyMap:
    """The per-tensor key map of a transformers ``CLIPModel`` with this config."""
    return KeyMap.from_modules(module_map(config), name=NAME)


def open_clip_module_map(cfg: Mapping[str, Any]) -> list[Module]:
    """The open_clip ``CLIP`` module list of this open_clip model config."""
    f = open_clip_fields(cfg)
    vd, td, p, e = f["vision_hidden"], f["text_hidden"], f["patch_size"], f["projection_dim"]
    n_pos = (f["image_size"] // p) ** 2 + 1
    ve, te = "vision_model.embeddings", "text_model.embeddings"
    mods = [
        Module(
            "visual.conv1",
            f"{ve}.patch_embedding",
            "conv2d",
            {"in_channels": 3, "out_channels": vd, "kernel_size": p, "bias": False},
        ),
        Module("visual.class_embedding", f"{ve}.class_embedding", "tensor", {"shape": (vd,)}),
        Module(
            "visual.positional_embedding",
            f"{ve}.position_embedding.embedding",
            "tensor",
            {"shape": (n_pos, vd)},
        ),
        Module("visual.ln_pre", "vision_model.pre_layrnorm", "norm", {"dim": vd}),
    ]
    for i in range(f["vision_layers"]):
        mods += _layer(
            f"visual.transformer.resblocks.{i}",
            f"vision_model.encoder.layers.{i}",
            vd,
            f["vision_intermediate"],
            True,
        )
    mods += [
        Module("visual.ln_post", "vision_model.post_layernorm", "norm", {"dim": vd}),
        Module("visual.proj", "visual_projection.kernel", "tensor", {"shape": (vd, e)}),
        Module(
            "token_embedding",
            f"{te}.token_embedding",
            "embedding",
            {"num_embeddings": f["vocab_size"], "features": td},
        ),
        Module(
            "positional_embedding",
            f"{te}.position_embedding.embedding",
            "tensor",
            {"shape": (f["max_positions"], td)},
        ),
        Module(
            "attn_mask",
            "text_model.attn_mask",
            "tensor",  # a buffer of old checkpoints (recomputed)
            {"shape": (f["max_positions"], f["max_positions"])},
            optional=True,
        ),
    ]
    for i in range(f["text_layers"]):
        mods += _layer(
            f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", td, f["text_intermediate"], True
        )
    mods += [
        Module("ln_final", "text_model.final_layer_norm", "norm", {"dim": td}),
        Module("text_projection", "text_projection.kernel", "tensor", {"shape": (td, e)}),
        same("logit_scale", "tensor", shape=()),
    ]
    return mods


def open_clip_key_map(cfg: Mapping[str, Any]) -> KeyMap:
    """The per-tensor key map of an open_clip ``CLIP`` with this model config."""
    return KeyMap.from_modules(open_clip_module_map(cfg), name="open_clip")


# ----------------------------------------------------------------------------------------------------
# open_clip checkpoints
# ----------------------------------------------------------------------------------------------------


class TorchSource:
    """A :class:`awm_jax.convert.keymap.TensorSource` over a torch state-dict file (``.pt`` / ``.bin`` /
    ``.pth``), memory-mapped (``torch.load(mmap=True, weights_only=True)``: tensors are read as touched).
    A ``{"state_dict": ...}`` wrapper (HPSv2's checkpoints) is unwrapped."""

    def __init__(self, path: str | os.PathLike):
        import torch

        self.path = str(path)
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except FileNotFoundError:
            raise ConversionError(f"open_clip checkpoint not found: {self.path}") from None
        except Exception as e:  # noqa: BLE001 - a pickle that is not a plain state dict, a truncated file
            raise ConversionError(
                f"{self.path}: cannot read a torch state dict ({type(e).__name__}: {e})"
            ) from e
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ConversionError(f"{self.path}: expected a state dict, got {type(obj).__name__}")
        self.tensors = {k: v for k, v in obj.items() if hasattr(v, "shape")}

    def keys(self):
        return list(self.tensors)

    def shape(self, key):
        return tuple(int(s) for s in self.tensors[key].shape)

    def dtype(self, key):
        import torch

        t = self.tensors[key]
        return np.dtype("bfloat16") if t.dtype == torch.bfloat16 else t.numpy().dtype

    def get(self, key):
        import ml_dtypes
        import torch

        t = self.tensors[key].detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
        return t.numpy().copy()

    def where(self, key=None):
        return self.path

    def close(self):
        self.tensors = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_clip_source(path: str | os.PathLike):
    """The tensor source of an open_clip checkpoint file (safetensors or a torch pickle)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise ConversionError(f"open_clip checkpoint not found: {p}")
    if p.is_dir() or p.suffix == ".safetensors":
        return SafetensorsReader(p, prefer=("open_clip_model", "model"))
    if p.suffix in (".pt", ".pth", ".bin"):
        return TorchSource(p)
    raise ConversionError(f"{p}: expected an open_clip .safetensors / .pt / .pth / .bin checkpoint")


def read_open_clip(
    path: str | os.PathLike, arch: str | os.PathLike | Mapping[str, Any]
) -> tuple[dict, KeyMap, Iterator[tuple[str, np.ndarray]]]:
    """``(CLIPConfig fields, key map, tensors)`` of an open_clip checkpoint: ``tensors`` lazily yields
    validated
    ``(flax_key, array)`` pairs in stored dtype, one at a time (the file is closed when it is exhausted)."""
    cfg = open_clip_config(arch)
    km = open_clip_key_map(cfg)
    src = open_clip_source(path)
    km.plan(src, "to_flax")  # missing / unexpected / mis-shaped tensors fail here, before any is read

    def gen():
        with src:
            yield from km.convert(src, "to_flax")

    return open_clip_fields(cfg), km, gen()
