"""Text-encoder interface, prompt-embedding caches (in-memory LRU + on-disk prompt sets), vocab checks.

Every text encoder of the project (the SD3 CLIP-L/CLIP-G/T5 stack, the toy world's small encoder, ...)
implements :class:`TextEncoder`: ``encode(prompts) -> (prompt_embeds (B,T,D), pooled (B,P))`` as float32
numpy arrays. :class:`CachedTextEncoder` wraps any such encoder (or a bare ``encode`` function) with

* an in-memory LRU cache keyed by the prompt string (only the misses of a batch are encoded), and
* an optional on-disk cache for a *fixed* prompt set (an evaluation set, a small training set):
  :meth:`CachedTextEncoder.load_prompt_set` writes/reads one ``<sha256>.npz`` file per (encoder
  fingerprint, ordered prompt list) and pins its entries in memory (they are never evicted).

A cache entry of the real SD3 stack is ``(77 + 128, 4096) + (2048,)`` float32, about 3.4 MB: size the
LRU (``max_entries``) accordingly.
"""

from __future__ import annotations

import collections
import hashlib
import os
import pathlib
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "TextEncoder",
    "CachedTextEncoder",
    "VocabularyError",
    "check_vocab_size",
    "prompt_set_key",
]

EncodeFn = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


@runtime_checkable
class TextEncoder(Protocol):
    """What the trainer consumes: prompts -> (prompt_embeds (B,T,D) f32, pooled (B,P) f32) numpy arrays."""

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode a batch of prompts (float32 numpy arrays, batch order preserved)."""
        ...


class VocabularyError(ValueError):
    """A tokenizer whose vocabulary does not fit its text encoder (e.g. a near-empty offline load)."""


def check_vocab_size(
    tokenizer_size: int,
    model_vocab_size: int,
    folder: str | os.PathLike,
    *,
    what: str = "tokenizer",
    min_fraction: float = 0.5,
) -> None:
    """Fail loudly when a tokenizer's vocabulary does not fit the embedding table of its model.

    A tokenizer loaded offline from an incomplete folder can silently come back with a handful of
    special tokens only; encoding then "works" and produces garbage. We require
    ``min_fraction * model_vocab_size <= tokenizer_size <= model_vocab_size`` (real pairs: CLIP
    49408/49408, T5 32100/32128).

    Raises:
        VocabularyError: naming ``folder`` and both sizes.
    """
    if tokenizer_size > model_vocab_size:
        raise VocabularyError(
            f"{what} at {folder} has {tokenizer_size} tokens but the text encoder's embedding table has only "
            f"{model_vocab_size} rows: token ids would index out of range (wrong tokenizer for this model?)"
        )
    if tokenizer_size < min_fraction * model_vocab_size:
        raise VocabularyError(
            f"{what} at {folder} has only {tokenizer_size} tokens while the text encoder expects "
            f"{model_vocab_size} (< {min_fraction:.0%}): the tokenizer files (tokenizer.json / vocab.json / "
            "merges.txt / spiece.model) are missing or incomplete, likely an offline load that fell back "
            "to an empty vocabulary"
        )


def prompt_set_key(fingerprint: str, prompts: Sequence[str]) -> str:
    """sha256 hex digest identifying (encoder fingerprint, ordered prompt list); the disk-cache file stem."""
    h = hashlib.sha256()
    h.update(fingerprint.encode("utf-8"))
    h.update(b"\x00")
    h.update(str(len(prompts)).encode())
    for p in prompts:
        b = p.encode("utf-8")
        h.update(b"\x00" + str(len(b)).encode() + b"\x00" + b)
    return h.hexdigest()


def _check_batch(out: tuple[np.ndarray, np.ndarray], n: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"{source}.encode must return (prompt_embeds, pooled); got {type(out).__name__}")
    emb, pooled = (np.asarray(x) for x in out)
    if emb.ndim != 3 or pooled.ndim != 2 or emb.shape[0] != n or pooled.shape[0] != n:
        raise ValueError(
            f"{source}.encode returned shapes {emb.shape}, {pooled.shape} for {n} prompts; "
            "expected (B,T,D) and (B,P)"
        )
    return emb.astype(np.float32, copy=False), pooled.astype(np.float32, copy=False)


class CachedTextEncoder:
    """LRU-cached wrapper around any text encoder (or bare ``encode`` function).

    Args:
        encoder: an object with ``encode(prompts)`` or a function ``prompts -> (embeds, pooled)``.
        max_entries: LRU capacity in prompts (0 disables the LRU, None: bounded by ``max_bytes`` only;
            pinned prompt sets are extra).
        max_bytes: LRU capacity in bytes of the cached arrays (None: no byte bound; 0 disables the LRU).
        chunk_size: encode cache misses in chunks of at most this many prompts (None: all at once).
        fingerprint: identifies the encoder + settings for the disk cache; defaults to
            ``encoder.fingerprint`` when the encoder has one.

    Attributes ``hits`` and ``misses`` count prompts served from / not found in the caches. Thread safe.
    """

    def __init__(
        self,
        encoder: TextEncoder | EncodeFn,
        *,
        max_entries: int | None = 256,
        max_bytes: int | None = None,
        chunk_size: int | None = None,
        fingerprint: str | None = None,
    ):
        if max_entries is not None and max_entries < 0:
            raise ValueError(f"max_entries must be >= 0 or None, got {max_entries}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        if hasattr(encoder, "encode"):
            self._encode_fn: EncodeFn = encoder.encode
            self._name = type(encoder).__name__
        elif callable(encoder):
            self._encode_fn = encoder
            self._name = getattr(encoder, "__qualname__", repr(encoder))
        else:
            raise TypeError(
                f"encoder must have .encode(prompts) or be callable; got {type(encoder).__name__}"
            )
        self.encoder = encoder
        self.max_entries = None if max_entries is None else int(max_entries)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.nbytes = 0  # bytes held by the LRU (pinned sets not counted)
        self.chunk_size = chunk_size
        self.fingerprint = fingerprint if fingerprint is not None else getattr(encoder, "fingerprint", None)
        self._lru: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._pinned: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ in-memory cache
    def __len__(self) -> int:
        with self._lock:
            return len(self._lru) + len(self._pinned)

    def __contains__(self, prompt: str) -> bool:
        with self._lock:
            return prompt in self._pinned or prompt in self._lru

    def clear(self) -> None:
        """Drop every cached entry (LRU and pinned) and reset the hit/miss counters."""
        with self._lock:
            self._lru.clear()
            self._pinned.clear()
            self.hits = self.misses = 0
            self.nbytes = 0

    def _lookup(self, prompt: str) -> tuple[np.ndarray, np.ndarray] | None:
        if prompt in self._pinned:
            return self._pinned[prompt]
        if prompt in self._lru:
            self._lru.move_to_end(prompt)
            return self._lru[prompt]
        return None

    def _store(self, prompt: str, entry: tuple[np.ndarray, np.ndarray]) -> None:
        size = _entry_bytes(entry)
        cap = np.inf if self.max_bytes is None else self.max_bytes
        if self.max_entries == 0 or prompt in self._pinned or size > cap:
            return
        if prompt in self._lru:
            self.nbytes -= _entry_bytes(self._lru[prompt])
        self._lru[prompt] = entry
        self._lru.move_to_end(prompt)
        self.nbytes += size
        entries = np.inf if self.max_entries is None else self.max_entries
        while len(self._lru) > entries or self.nbytes > cap:
            _, old = self._lru.popitem(last=False)
            self.nbytes -= _entry_bytes(old)

    def encode_uncached(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode with the wrapped encoder in chunks of ``chunk_size``, bypassing (and not filling) caches."""
        prompts = _as_prompt_list(prompts)
        step = self.chunk_size or max(len(prompts), 1)
        embs, pools = [], []
        for i in range(0, len(prompts), step):
            chunk = prompts[i : i + step]
            emb, pooled = _check_batch(self._encode_fn(list(chunk)), len(chunk), self._name)
            embs.append(emb)
            pools.append(pooled)
        return np.concatenate(embs, 0), np.concatenate(pools, 0)

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode prompts, serving repeats from the caches; returns fresh float32 arrays (B,T,D), (B,P)."""
        prompts = _as_prompt_list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt, got an empty list")
        with self._lock:
            found = {p: e for p in dict.fromkeys(prompts) if (e := self._lookup(p)) is not None}
            todo = [p for p in dict.fromkeys(prompts) if p not in found]
            self.hits += sum(p in found for p in prompts)
            self.misses += len(prompts) - sum(p in found for p in prompts)
        if todo:
            emb, pooled = self.encode_uncached(todo)
            with self._lock:
                for i, p in enumerate(todo):
                    entry = (emb[i].copy(), pooled[i].copy())
                    found[p] = entry
                    self._store(p, entry)
        emb = np.stack([found[p][0] for p in prompts])
        pooled = np.stack([found[p][1] for p in prompts])
        return emb, pooled

    # ------------------------------------------------------------------ on-disk prompt sets
    def load_prompt_set(
        self, prompts: Sequence[str], cache_dir: str | os.PathLike, *, fingerprint: str | None = None
    ) -> pathlib.Path:
        """Pin the embeddings of a fixed prompt set, reading ``cache_dir/<key>.npz`` or creating it.

        The key hashes the encoder fingerprint and the ordered prompt list, so a changed model, setting
        or prompt file gives a new file. Returns the file's path. Pinned prompts are never evicted.

        Raises:
            ValueError: without a fingerprint, or when the file's content does not match the prompts.
        """
        prompts = _as_prompt_list(prompts)
        fp = fingerprint if fingerprint is not None else self.fingerprint
        if not fp:
            raise ValueError(
                f"the disk cache needs an encoder fingerprint ({self._name} has no .fingerprint; pass one)"
            )
        path = pathlib.Path(cache_dir) / f"{prompt_set_key(fp, prompts)}.npz"
        if path.exists():
            emb, pooled = _read_prompt_set(path, prompts)
        else:
            unique = list(dict.fromkeys(prompts))
            emb_u, pooled_u = self.encode_uncached(unique)
            index = {p: i for i, p in enumerate(unique)}
            emb, pooled = emb_u[[index[p] for p in prompts]], pooled_u[[index[p] for p in prompts]]
            _write_prompt_set(path, prompts, emb, pooled, fp)
        with self._lock:
            for i, p in enumerate(prompts):
                old = self._lru.pop(p, None)
                if old is not None:
                    self.nbytes -= _entry_bytes(old)
                self._pinned[p] = (emb[i], pooled[i])
        return path

    def __getattr__(self, name: str):
        # Forward unknown attributes (embed_dim, seq_len, ...) to the wrapped encoder.
        if name in ("encoder", "__setstate__", "__getstate__"):
            raise AttributeError(name)
        return getattr(self.encoder, name)


def _entry_bytes(entry: tuple[np.ndarray, np.ndarray]) -> int:
    return int(sum(np.asarray(x).nbytes for x in entry))


def _as_prompt_list(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, got a single string {prompts[:60]!r}")
    out = list(prompts)
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise TypeError(f"prompt #{i} is {type(p).__name__} ({p!r}), expected str")
    return out


def _write_prompt_set(path: pathlib.Path, prompts, emb, pooled, fingerprint: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
    np.savez(
        tmp,
        prompts=np.asarray(prompts, dtype=np.str_),
        prompt_embeds=np.ascontiguousarray(emb, np.float32),
        pooled=np.ascontiguousarray(pooled, np.float32),
        fingerprint=np.asarray(fingerprint, dtype=np.str_),
    )
    os.replace(tmp, path)  # atomic: concurrent readers never see a partial file


def _read_prompt_set(path: pathlib.Path, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = [str(p) for p in z["prompts"]]
            emb = np.asarray(z["prompt_embeds"], np.float32)
            pooled = np.asarray(z["pooled"], np.float32)
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"prompt-embedding cache {path} is unreadable or lacks a key: {e}") from e
    if stored != prompts:
        raise ValueError(
            f"prompt-embedding cache {path} holds a different prompt list ({len(stored)} prompts)"
        )
    if emb.ndim != 3 or pooled.ndim != 2 or emb.shape[0] != len(prompts) or pooled.shape[0] != len(prompts):
        raise ValueError(f"prompt-embedding cache {path} has shapes {emb.shape}, {pooled.shape}")
    return emb, pooled
