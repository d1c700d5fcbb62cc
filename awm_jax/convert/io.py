"""Streaming safetensors I/O and model-folder helpers for the converters.

The safetensors format is read and written directly (8-byte little-endian header length, JSON header,
raw row-major bytes), so every dtype -- bf16 and fp8 included, via ``ml_dtypes`` -- round-trips bit-exactly
through numpy, and no more than one tensor is held in memory at a time:

* :class:`SafetensorsReader` opens a single file, a sharded checkpoint (``*.safetensors.index.json``) or a
  folder holding either, and reads tensors one by one (``get``) after validating every header.
* :func:`write_sharded` plans shards (<= ``max_shard_bytes`` each) from ``(key, dtype, shape)`` entries
  alone, writes each header first and then streams tensor data from a ``get(key)`` callback.
* :func:`resolve_model_dir` accepts a model folder or a full pipeline folder (``<subfolder>/`` inside).
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from awm_jax.convert.keymap import ConversionError

Shape = tuple[int, ...]

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def dtype_name(dtype) -> str:
    """The safetensors name (``"BF16"``, ...) of a numpy dtype."""
    dt = np.dtype(dtype)
    if dt not in DTYPE_NAMES:
        raise ConversionError(f"dtype {dt} cannot be stored in safetensors")
    return DTYPE_NAMES[dt]


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """``(header, data_start)`` of one safetensors file; raises ConversionError naming the file if invalid."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ConversionError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > size - 8:
                raise ConversionError(f"{path}: not a safetensors file (header length {n} > file size)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ConversionError(f"safetensors file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: invalid safetensors header ({e})") from None
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise ConversionError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        nbytes = int(np.prod(info["shape"], dtype=np.int64)) * DTYPES[info["dtype"]].itemsize
        if end - start != nbytes or end > data_len or start < 0:
            raise ConversionError(f"{path}: tensor {key!r} has inconsistent data offsets {start, end}")
    return header, 8 + n


class SafetensorsReader:
    """Lazily reads named tensors from one or several safetensors files.

    ``path``: a ``.safetensors`` file, a ``*.safetensors.index.json`` or a folder holding exactly one of
    those (``prefer`` picks among several, e.g. ``"diffusion_pytorch_model"``). Implements the
    :class:`awm_jax.convert.keymap.TensorSource` protocol.
    """

    def __init__(self, path: str | os.PathLike, prefer: Sequence[str] = ()):
        self.path = pathlib.Path(path)
        files = _weight_files(self.path, prefer)
        self.files = files
        self._index: dict[str, tuple[pathlib.Path, dict, int]] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            header, start = read_header(file)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for key, info in header.items():
                if key in self._index:
                    raise ConversionError(f"tensor {key!r} appears in both {self._index[key][0]} and {file}")
                self._index[key] = (file, info, start)
        self._handles: dict[pathlib.Path, object] = {}

    def keys(self) -> list[str]:
        return list(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def _info(self, key: str) -> tuple[pathlib.Path, dict, int]:
        if key not in self._index:
            raise ConversionError(f"tensor {key!r} not found in {self.where()}")
        return self._index[key]

    def shape(self, key: str) -> Shape:
        return tuple(int(s) for s in self._info(key)[1]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return DTYPES[self._info(key)[1]["dtype"]]

    def where(self, key: str | None = None) -> str:
        """The file holding ``key`` (or the checkpoint path when ``key`` is None), for messages."""
        if key is None or key not in self._index:
            return str(self.path)
        return str(self._index[key][0])

    def nbytes(self) -> int:
        return sum(int(np.prod(i["shape"], dtype=np.int64)) * DTYPES[i["dtype"]].itemsize
                   for _, i, _ in self._index.values())

    def get(self, key: str) -> np.ndarray:
        """Read one tensor (a fresh, writable array of the stored dtype and shape)."""
        file, info, base = self._info(key)
        start, end = info["data_offsets"]
        f = self._handles.get(file)
        if f is None:
            f = self._handles[file] = open(file, "rb")  # noqa: SIM115 -- closed by close()
        f.seek(base + start)
        buf = bytearray(end - start)
        if f.readinto(buf) != end - start:
            raise ConversionError(f"{file}: tensor {key!r} is truncated")
        return np.frombuffer(buf, dtype=DTYPES[info["dtype"]]).reshape(info["shape"])

    def get_slice(self, key: str, index: tuple) -> np.ndarray:
        """Read only ``tensor[index]`` (``index``: a tuple of slices, as ``jax.make_array_from_callback``
        passes), through a read-only memory map of the file: only the pages of that slice are read."""
        file, info, base = self._info(key)
        start, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        if start == end:
            return np.zeros(shape, DTYPES[info["dtype"]])[index]
        mm = np.memmap(file, dtype=DTYPES[info["dtype"]], mode="r", offset=base + start, shape=shape)
        out = np.array(mm[index])
        del mm
        return out

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sliced_reader(source, key: str, transform) -> Callable[[tuple], np.ndarray]:
    """``read(index)`` -> ``transform.forward(source[key])[index]``, reading only the source slice that
    index needs when the transform is an axis permutation (Identity, Transpose, a Chain of those) and the
    source can slice (``get_slice``); otherwise the whole tensor is read once on the host and sliced."""
    from awm_jax.convert.keymap import Chain, Identity, Transpose

    steps = list(transform.steps) if isinstance(transform, Chain) else [transform]
    perm = list(range(len(source.shape(key))))
    for t in steps:
        if isinstance(t, Transpose):
            perm = [perm[i] for i in t.perm]  # target axis i is source axis perm[i]
        elif not isinstance(t, Identity):
            perm = None
            break
    if perm is not None and hasattr(source, "get_slice"):
        inv = np.argsort(perm)

        def read(index: tuple) -> np.ndarray:
            index = tuple(index) + (slice(None),) * (len(perm) - len(index))
            src = tuple(index[int(inv[a])] for a in range(len(perm)))
            return np.transpose(source.get_slice(key, src), perm)

        return read
    full: list = []

    def read_full(index: tuple) -> np.ndarray:
        if not full:
            full.append(transform.forward(source.get(key)))
        return full[0][tuple(index)]

    return read_full


class DictSource:
    """An in-memory :class:`TensorSource` over ``{key: array}`` (arrays are converted with ``np.asarray``)."""

    def __init__(self, tensors: Mapping[str, object], name: str = "<in-memory tensors>"):
        self.tensors = dict(tensors)
        self.name = name

    def keys(self):
        return list(self.tensors)

    def shape(self, key):
        return tuple(np.shape(self.tensors[key]))

    def dtype(self, key):
        dt = getattr(self.tensors[key], "dtype", None)
        return np.dtype(dt) if dt is not None else np.asarray(self.tensors[key]).dtype

    def get(self, key):
        return np.asarray(self.tensors[key])

    def where(self, key=None):
        return self.name


def _weight_files(path: pathlib.Path, prefer: Sequence[str]) -> list[pathlib.Path]:
    if path.is_file():
        if path.name.endswith(".safetensors.index.json"):
            return _index_files(path)
        if path.suffix == ".safetensors":
            return [path]
        raise ConversionError(f"{path}: expected a .safetensors file or a .safetensors.index.json")
    if not path.is_dir():
        raise ConversionError(f"checkpoint not found: {path}")
    for name in prefer:
        if (path / f"{name}.safetensors.index.json").exists():
            return _index_files(path / f"{name}.safetensors.index.json")
        if (path / f"{name}.safetensors").exists():
            return [path / f"{name}.safetensors"]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _index_files(indexes[0])
    singles = sorted(path.glob("*.safetensors"))
    if len(indexes) == 0 and len(singles) == 1:
        return singles
    if not indexes and not singles:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {bins}; only safetensors is supported)" if bins else ""
        raise ConversionError(f"no safetensors weights in {path}{hint}")
    names = [p.name for p in indexes or singles]
    raise ConversionError(f"{path}: ambiguous weights, several candidates {names}")


def _index_files(index: pathlib.Path) -> list[pathlib.Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{index}: invalid safetensors index ({e!r})") from None
    files = []
    for name in weight_map.values():
        if (index.parent / name) not in files:
            files.append(index.parent / name)
    for f in files:
        if not f.exists():
            raise ConversionError(f"{index}: shard {f.name} listed in the index does not exist")
    return files


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


Entry = tuple[str, np.dtype, Shape]


def _nbytes(entry: Entry) -> int:
    return int(np.prod(entry[2], dtype=np.int64)) * np.dtype(entry[1]).itemsize


def write_safetensors(path: str | os.PathLike, entries: Sequence[Entry], get: Callable[[str], np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write one safetensors file, streaming tensor data from ``get(key)``; returns the data size in bytes.

    Tensors are laid out by decreasing dtype size (so every tensor is aligned) then in ``entries`` order.
    ``get(key)`` must return an array of exactly the planned dtype and shape.
    """
    order = sorted(entries, key=lambda e: -np.dtype(e[1]).itemsize)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, dt, shape in order:
        n = _nbytes((key, dt, shape))
        shp = [int(s) for s in shape]
        header[key] = {"dtype": dtype_name(dt), "shape": shp, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = pathlib.Path(str(path) + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for key, dt, shape in order:
                x = get(key)
                if np.dtype(x.dtype) != np.dtype(dt) or tuple(x.shape) != tuple(shape):
                    got = f"{x.dtype}{tuple(x.shape)}"
                    raise ConversionError(f"{path}: tensor {key!r} is {got}, planned {dt}{tuple(shape)}")
                # raw bytes through a uint8 view (memoryview rejects ml_dtypes such as bfloat16)
                f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
                del x
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return offset


def plan_shards(entries: Sequence[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Greedy in-order split of ``entries`` into shards of at most ``max_shard_bytes`` (a bigger tensor
    gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = _nbytes(e)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def write_sharded(dst: str | os.PathLike, base_name: str, entries: Sequence[Entry],
                  get: Callable[[str], np.ndarray], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  metadata: Mapping[str, str] | None = None) -> list[pathlib.Path]:
    """Write ``<base_name>.safetensors``, or shards ``<base_name>-0000i-of-0000n.safetensors`` plus
    ``<base_name>.safetensors.index.json`` (the Hugging Face layout) when the total exceeds
    ``max_shard_bytes``. Stale weight files of the same base name in ``dst`` are removed first."""
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    patterns = (f"{base_name}.safetensors", f"{base_name}-?????-of-?????.safetensors",
                f"{base_name}.safetensors.index.json")
    stale = [p for pat in patterns for p in dst.glob(pat)]
    for old in stale:
        old.unlink()
    shards = plan_shards(entries, max_shard_bytes)
    if len(shards) == 1:
        path = dst / f"{base_name}.safetensors"
        write_safetensors(path, shards[0], get, metadata)
        return [path]
    weight_map: dict[str, str] = {}
    paths, total = [], 0
    for i, shard in enumerate(shards):
        path = dst / f"{base_name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(path, shard, get, metadata)
        weight_map.update({k: path.name for k, _, _ in shard})
        paths.append(path)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / f"{base_name}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


# ----------------------------------------------------------------------------------------------------
# Folders and configs
# ----------------------------------------------------------------------------------------------------


def resolve_model_dir(path: str | os.PathLike, subfolder: str) -> pathlib.Path:
    """The folder holding the model's ``config.json``: ``path`` itself, or ``path/<subfolder>`` for a
    pipeline folder (one with ``model_index.json`` or a ``<subfolder>/config.json``)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ConversionError(f"model folder not found: {path}")
    if path.is_file():
        raise ConversionError(f"{path}: expected a model folder (with config.json), got a file")
    if (path / subfolder / "config.json").exists():
        return path / subfolder
    if (path / "config.json").exists():
        return path
    if (path / "model_index.json").exists():
        raise ConversionError(f"{path}: pipeline folder has no {subfolder}/config.json")
    raise ConversionError(f"{path}: no config.json (nor {subfolder}/config.json)")


def read_config(model_dir: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a model folder (error names the file)."""
    p = pathlib.Path(model_dir) / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConversionError(f"missing {p}") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{p}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{p}: expected a JSON object")
    return cfg


def write_config(model_dir: str | os.PathLike, config: Mapping) -> pathlib.Path:
    """Write ``config.json`` (indent 2, key order kept, like diffusers)."""
    p = pathlib.Path(model_dir) / "config.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(dict(config), indent=2) + "\n")
    return p


def total_bytes(entries: Iterable[Entry]) -> int:
    """Sum of the tensor sizes of ``entries``."""
    return sum(_nbytes(e) for e in entries)
