"""Shared helpers of the host-side (transformers) text encoders of diffusers pipeline folders.

Reading ``model_index.json``, loading one (tokenizer, text encoder) pair of a pipeline folder with the
classes it names and a vocabulary check, a cheap fingerprint of component folders, and the one-time
warning about prompts truncated to the tokenizer length (diffusers truncates silently but for a log line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from collections.abc import Iterable

from awm_jax.text.base import check_vocab_size

__all__ = ["CachedEncoders", "TruncationWarning", "component_class", "files_signature", "folder_fingerprint",
           "load_component_pair", "open_pipeline_folder", "read_json", "transformers_class"]

logger = logging.getLogger(__name__)


def read_json(path: pathlib.Path) -> dict:
    """The JSON object at ``path`` (FileNotFoundError / ValueError naming the file)."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def component_class(index: dict, name: str, root: pathlib.Path) -> str | None:
    """Class name of a pipeline component from model_index.json; None when the entry is null/absent."""
    entry = index.get(name)
    if entry is None or (isinstance(entry, (list, tuple)) and (len(entry) != 2 or entry[1] is None)):
        return None
    if not isinstance(entry, (list, tuple)):
        raise ValueError(f"{root / 'model_index.json'}: entry {name!r} = {entry!r} is not [library, class]")
    return str(entry[1])


def transformers_class(cls_name: str, root: pathlib.Path, component: str):
    """The ``transformers`` class named by a model_index.json entry (ValueError naming the entry)."""
    import transformers

    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ValueError(
            f"{root / 'model_index.json'}: component {component!r} names class {cls_name!r}, which "
            f"transformers {transformers.__version__} does not provide"
        )
    return cls


def files_signature(folder: pathlib.Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of every file of a component folder: cheap, no hashing of GB of weights."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())


def open_pipeline_folder(path, what: str) -> tuple[pathlib.Path, dict]:
    """``(resolved root, model_index.json)`` of the diffusers pipeline folder ``path`` of family ``what``
    (FileNotFoundError / ValueError naming the folder or file)."""
    root = pathlib.Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{what} pipeline folder {root} does not exist")
    return root, read_json(root / "model_index.json")


def folder_fingerprint(name: str, parts: dict, root: pathlib.Path, subfolders: Iterable[str]) -> str:
    """``"<name>:<sha256>"`` of ``parts`` plus the :func:`files_signature` of each existing subfolder."""
    parts = dict(parts)
    for sub in subfolders:
        if (root / sub).is_dir():
            parts[sub] = files_signature(root / sub)
    return f"{name}:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load_component_pair(root: pathlib.Path, index: dict, tok_name: str, enc_name: str, *, dtype,
                        min_vocab_fraction: float = 0.5, expect: tuple[str, ...] = ()):
    """Load ``root/tok_name`` + ``root/enc_name`` (offline) with the classes model_index.json names.

    Returns ``(None, None)`` when either entry is null/absent. ``expect``: allowed encoder class names
    (empty: any). Raises FileNotFoundError for a listed but missing folder, ValueError for an unexpected
    class, :class:`~awm_jax.text.base.VocabularyError` for a tokenizer that does not fit its encoder.
    """
    tok_cls_name = component_class(index, tok_name, root)
    enc_cls_name = component_class(index, enc_name, root)
    if tok_cls_name is None or enc_cls_name is None:
        return None, None
    if expect and enc_cls_name not in expect:
        raise ValueError(f"{root / 'model_index.json'}: component {enc_name!r} is {enc_cls_name!r}, "
                         f"expected one of {list(expect)}")
    tok_dir, enc_dir = root / tok_name, root / enc_name
    for d in (tok_dir, enc_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"model_index.json lists {d.name!r} but folder {d} is missing")
    tok = transformers_class(tok_cls_name, root, tok_name).from_pretrained(str(tok_dir),
                                                                           local_files_only=True)
    enc = transformers_class(enc_cls_name, root, enc_name).from_pretrained(
        str(enc_dir), local_files_only=True, dtype=dtype)
    check_vocab_size(len(tok), int(enc.config.vocab_size), tok_dir, what=f"{tok_name} ({tok_cls_name})",
                     min_fraction=min_vocab_fraction)
    return tok, enc


class TruncationWarning:
    """Logs once (per instance) that prompts exceeded a tokenizer's length and were truncated."""

    def __init__(self):
        self.warned = False

    def check(self, tokenizer, prompts: list[str], max_length: int, which: str) -> None:
        """Count the prompts of more than ``max_length`` tokens (special tokens included); warn once."""
        if self.warned:
            return
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True, verbose=False).input_ids]
        n = sum(length > max_length for length in lengths)
        if n:
            self.warned = True
            logger.warning(
                "%d of %d prompts exceed %d %s tokens and were truncated (as diffusers does); "
                "further truncations are not reported", n, len(prompts), max_length, which,
            )


class CachedEncoders:
    """Base of a pipeline's host text encoders: ``encode`` through one LRU :class:`CachedTextEncoder` over the
    subclass's ``encode_uncached``, on-disk prompt sets, and truncation warnings. Subclasses call
    :meth:`_init_cache` at the end of ``__init__`` (after setting ``fingerprint``)."""

    def _init_cache(self, cache_size: int, chunk_size: int | None) -> None:
        from awm_jax.text.base import CachedTextEncoder

        self._truncation = TruncationWarning()
        self.cache = CachedTextEncoder(self.encode_uncached, max_entries=cache_size, chunk_size=chunk_size,
                                       fingerprint=self.fingerprint)

    def encode_uncached(self, prompts):
        raise NotImplementedError

    def encode(self, prompts):
        """Encode prompts (LRU-cached by prompt): float32 numpy ``(prompt_embeds (B,T,D), pooled (B,P))``."""
        return self.cache.encode(prompts)

    def load_prompt_set(self, prompts, cache_dir) -> pathlib.Path:
        """Pin a fixed prompt set's embeddings from/to ``cache_dir/<hash>.npz`` (see CachedTextEncoder)."""
        return self.cache.load_prompt_set(prompts, cache_dir)
