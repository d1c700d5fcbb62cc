"""Weight conversion between diffusers (PyTorch safetensors) folders and awm-jax Flax folders.

Registry
--------
``CONVERTERS`` maps a model name to the module implementing it (imported lazily). A converter module
(``awm_jax/convert/sd3.py`` is the reference) defines:

* ``NAME: str`` -- its registry name (``"sd3"``, ``"vae"``);
* ``SUBFOLDER: str`` -- its folder inside a diffusers pipeline (``"transformer"``, ``"vae"``);
* ``DIFFUSERS_WEIGHTS: str`` -- the diffusers weight base name (``"diffusion_pytorch_model"``);
* ``CLASS_NAMES: tuple[str, ...]`` -- accepted diffusers ``_class_name`` values (empty: don't check);
* ``key_map(config: dict) -> awm_jax.convert.keymap.KeyMap`` -- built from the diffusers config dict
  (generate a ``module_map(config)`` of ``keymap.Module`` s and expand it with ``KeyMap.from_modules``);
* optionally ``default_tensor(config: dict, diffusers_key: str) -> np.ndarray | None`` -- values of
  ``optional`` rules (recomputable buffers) that ``to_diffusers`` fills in when a Flax folder omits them.

Adding a model = writing such a module and one line in ``CONVERTERS``. Everything else (folder
resolution, validation, streaming, sharding, config handling, the CLI) is generic.

Flax folder format
------------------
``config.json``: the diffusers config plus ``"awm_jax": {"format": "flax", "model": NAME, "weights":
"model"}``; weights ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + index) keyed by the
dot-joined per-layer Flax parameter paths, dtypes as stored in the source. ``to_diffusers`` writes
``config.json`` without the ``awm_jax`` entry and ``diffusion_pytorch_model*.safetensors``; a round trip
reproduces keys, dtypes and bytes exactly.
"""

from __future__ import annotations

import importlib
import os
import pathlib
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

import numpy as np

from awm_jax.convert.io import (
    DEFAULT_MAX_SHARD_BYTES,
    DictSource,
    SafetensorsReader,
    read_config,
    resolve_model_dir,
    sliced_reader,
    write_config,
    write_sharded,
)
from awm_jax.convert.keymap import ConversionError, Identity, KeyMap

CONVERTERS: dict[str, str] = {
    "sd3": "awm_jax.convert.sd3",
    "flux": "awm_jax.convert.flux",
    "zimage": "awm_jax.convert.zimage",
    "qwenimage": "awm_jax.convert.qwenimage",
    "qwenimage_vae": "awm_jax.convert.qwenimage_vae",
    "vae": "awm_jax.convert.vae",
    "clip": "awm_jax.convert.clip",  # transformers CLIPModel (rewards); open_clip: clip.read_open_clip
}
FLAX_WEIGHTS = "model"
FORMAT_KEY = "awm_jax"

__all__ = [
    "CONVERTERS",
    "ConversionError",
    "get_converter",
    "is_flax_folder",
    "open_flax_slices",
    "read_flax_params",
    "read_model_config",
    "folder_config",
    "save_flax",
    "to_diffusers",
    "to_flax",
]


def get_converter(model: str) -> ModuleType:
    """The converter module registered as ``model``; unknown names raise listing the valid ones."""
    if model not in CONVERTERS:
        raise ConversionError(f"unknown model {model!r}; valid models: {sorted(CONVERTERS)}")
    return importlib.import_module(CONVERTERS[model])


def is_flax_folder(config: Mapping[str, Any]) -> bool:
    """Whether a parsed ``config.json`` belongs to an awm-jax Flax folder."""
    info = config.get(FORMAT_KEY)
    return isinstance(info, dict) and info.get("format") == "flax"


def _diffusers_config(config: Mapping[str, Any]) -> dict:
    return {k: v for k, v in config.items() if k != FORMAT_KEY}


def _check_class(conv: ModuleType, config: Mapping[str, Any], where: pathlib.Path) -> None:
    cls = config.get("_class_name")
    names = getattr(conv, "CLASS_NAMES", ())
    if names and cls is not None and cls not in names:
        raise ConversionError(f"{where}/config.json: _class_name {cls!r} is not a {conv.NAME} model {names}")


def _open(src: str | os.PathLike, model: str, want_flax: bool | None, dst: str | os.PathLike | None = None):
    """(converter, model_dir, config, reader) for a diffusers / pipeline / Flax folder."""
    conv = get_converter(model)
    model_dir = resolve_model_dir(src, conv.SUBFOLDER)
    if dst is not None and pathlib.Path(dst).resolve() in (model_dir.resolve(), pathlib.Path(src).resolve()):
        raise ConversionError(f"destination {dst} is the source folder; choose another --dst")
    config = read_config(model_dir)
    flax = is_flax_folder(config)
    if want_flax is not None and flax != want_flax:
        kind, want = ("an awm-jax Flax", "a diffusers") if flax else ("a diffusers", "an awm-jax Flax")
        raise ConversionError(f"{model_dir}: is {kind} folder; this conversion needs {want} folder")
    if flax and config[FORMAT_KEY].get("model") != conv.NAME:
        got = config[FORMAT_KEY].get("model")
        raise ConversionError(f"{model_dir}/config.json: Flax folder of model {got!r}, not {conv.NAME!r}")
    _check_class(conv, config, model_dir)
    prefer = [config[FORMAT_KEY].get("weights", FLAX_WEIGHTS)] if flax else [conv.DIFFUSERS_WEIGHTS]
    return conv, model_dir, config, SafetensorsReader(model_dir, prefer=prefer)


def to_flax(src: str | os.PathLike, dst: str | os.PathLike, model: str,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """Convert a diffusers model folder (or a pipeline folder) ``src`` into the Flax folder ``dst``."""
    conv, _, config, reader = _open(src, model, want_flax=False, dst=dst)
    with reader:
        entries, get = conv.key_map(config).converter(reader, "to_flax")
        write_sharded(dst, FLAX_WEIGHTS, entries, get, max_shard_bytes, metadata={"format": "flax"})
    out = dict(config)
    out[FORMAT_KEY] = {"format": "flax", "model": conv.NAME, "weights": FLAX_WEIGHTS}
    write_config(dst, out)
    return pathlib.Path(dst)


def to_diffusers(src: str | os.PathLike, dst: str | os.PathLike, model: str,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """Convert the Flax folder ``src`` back into a diffusers model folder ``dst``."""
    conv, _, config, reader = _open(src, model, want_flax=True, dst=dst)
    with reader:
        km = conv.key_map(config)
        entries, get = km.converter(reader, "to_diffusers")
        entries, get = _with_defaults(conv, config, km, entries, get)
        write_sharded(dst, conv.DIFFUSERS_WEIGHTS, entries, get, max_shard_bytes, metadata={"format": "pt"})
    write_config(dst, _diffusers_config(config))
    return pathlib.Path(dst)


def _with_defaults(conv: ModuleType, config: Mapping[str, Any], km: KeyMap, entries: list, get):
    """Add the optional diffusers tensors a Flax folder left out (e.g. the recomputable ``pos_embed``
    buffer) when the converter can compute them (``default_tensor(config, diffusers_key)``), in the
    dtype of the other tensors, so the output loads in diffusers."""
    fn = getattr(conv, "default_tensor", None)
    have = {e[0] for e in entries}
    missing = [r for r in km.rules if r.optional and r.diffusers_key not in have]
    if fn is None or not missing:
        return entries, get
    dtype = entries[0][1] if entries else np.dtype(np.float32)
    extra = {}
    for r in missing:
        value = fn(_diffusers_config(config), r.diffusers_key)
        if value is not None:
            extra[r.diffusers_key] = np.asarray(value).astype(dtype).reshape(r.diffusers_shape)
    entries = list(entries) + [(k, v.dtype, v.shape) for k, v in extra.items()]
    return entries, lambda key: extra[key] if key in extra else get(key)


def folder_config(src: str | os.PathLike, subfolder: str = "transformer") -> tuple[pathlib.Path, dict]:
    """``(model_dir, raw config.json)`` of a model, pipeline (``<subfolder>/`` inside) or Flax folder."""
    model_dir = resolve_model_dir(src, subfolder)
    return model_dir, read_config(model_dir)


def read_model_config(src: str | os.PathLike, model: str) -> dict:
    """The diffusers config dict of converter ``model``'s folder ``src`` (diffusers, pipeline or Flax)."""
    conv = get_converter(model)
    model_dir, config = folder_config(src, conv.SUBFOLDER)
    _check_class(conv, config, model_dir)
    return _diffusers_config(config)


def read_flax_params(
    src: str | os.PathLike, model: str
) -> tuple[dict, KeyMap, Iterator[tuple[str, np.ndarray]]]:
    """Open any supported folder (diffusers, pipeline or Flax) as Flax per-layer parameters.

    Returns ``(diffusers_config, key_map, tensors)`` where ``tensors`` lazily yields validated
    ``(flax_key, numpy array)`` pairs in stored dtype (the file is closed when it is exhausted).
    """
    conv, _, config, reader = _open(src, model, want_flax=None)
    km = conv.key_map(config)
    if is_flax_folder(config):
        km.plan(reader, "to_diffusers")  # validates keys and shapes against the Flax side

        def gen():
            with reader:
                for rule in km.rules:
                    if rule.flax_key in reader:
                        yield rule.flax_key, reader.get(rule.flax_key)
    else:
        km.plan(reader, "to_flax")

        def gen():
            with reader:
                yield from km.convert(reader, "to_flax")

    return _diffusers_config(config), km, gen()


def open_flax_slices(src: str | os.PathLike, model: str):
    """Like :func:`read_flax_params`, for reading parameters shard by shard: ``(diffusers_config, key_map,
    reader, tensors)`` with ``tensors = [(flax_key, shape, dtype, read)]`` where ``read(index)`` returns
    ``flax_tensor[index]`` reading only that slice where the layout allows
    (:func:`awm_jax.convert.io.sliced_reader`). Close ``reader`` when done."""
    conv, _, config, reader = _open(src, model, want_flax=None)
    km = conv.key_map(config)
    if is_flax_folder(config):
        km.plan(reader, "to_diffusers")  # validates keys and shapes against the Flax side
        tensors = [(r.flax_key, reader.shape(r.flax_key), reader.dtype(r.flax_key),
                    sliced_reader(reader, r.flax_key, Identity())) for r in km.rules if r.flax_key in reader]
    else:
        tensors = [(target, shape, dtype, sliced_reader(reader, rule.diffusers_key, rule.transform))
                   for rule, target, dtype, shape in km.plan(reader, "to_flax")]
    return _diffusers_config(config), km, reader, tensors


def save_flax(params: Mapping[str, Any], config: Mapping[str, Any], dst: str | os.PathLike, model: str,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """Write in-memory Flax per-layer params ``{dot.joined.path: array}`` as a Flax folder.

    ``config`` is the diffusers config dict of the model; params are validated against the key map
    (optional tensors such as ``pos_embed.pos_embed`` may be left out) and stored in their dtype.
    """
    conv = get_converter(model)
    config = _diffusers_config(config)
    if getattr(conv, "CLASS_NAMES", ()) and "_class_name" not in config:  # e.g. a model config's to_dict()
        config = {"_class_name": conv.CLASS_NAMES[0], **config}
    src = DictSource({k: np.asarray(v) for k, v in params.items()}, name=f"<{model} params>")
    plan = conv.key_map(config).plan(src, "to_diffusers")
    entries = [(r.flax_key, dt, r.flax_shape) for r, _, dt, _ in plan]
    write_sharded(dst, FLAX_WEIGHTS, entries, src.get, max_shard_bytes, metadata={"format": "flax"})
    out = dict(config)
    out[FORMAT_KEY] = {"format": "flax", "model": conv.NAME, "weights": FLAX_WEIGHTS}
    write_config(dst, out)
    return pathlib.Path(dst)
