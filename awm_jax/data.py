"""Prompt datasets and the grouped sampler.

Formats:
  - ``text``: one prompt per line (blank lines ignored).
  - ``geneval``: JSONL, one object per line with at least ``prompt`` (GenEval metadata: ``tag``,
    ``include``, ``exclude``); the whole object is kept as the prompt's metadata.
  - ``ocr``: one prompt per line, each containing a double-quoted target text; metadata
    ``{"target": ...}``.
Malformed input raises ``PromptFileError`` naming the file and line.

``GroupedSampler`` picks ``prompts_per_step`` prompts per optimizer step and repeats each
``group_size`` times over the *global* batch (all devices and hosts); the choice is a pure
function of ``(seed, step)``, so a resumed run sees exactly the same data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

__all__ = [
    "PromptFileError", "PromptDataset", "load_prompts", "load_dataset", "dataset_from_records",
    "GroupedSampler", "ocr_target",
]

_QUOTED = re.compile(r'"([^"]+)"|\u201c([^\u201d]+)\u201d')


class PromptFileError(ValueError):
    """A prompt file is missing, empty or malformed."""


@dataclasses.dataclass
class PromptDataset:
    """Prompts with one metadata dict each (``{}`` for plain text)."""

    prompts: list[str]
    metadata: list[dict]
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, indices) -> tuple[list[str], list[dict]]:
        """Prompts and metadata at ``indices``."""
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        return [self.prompts[i] for i in idx], [self.metadata[i] for i in idx]


def ocr_target(prompt: str) -> str | None:
    """The first double-quoted span of ``prompt`` (straight or curly quotes), or None."""
    m = _QUOTED.search(prompt)
    if m is None:
        return None
    return m.group(1) if m.group(1) is not None else m.group(2)


def load_prompts(path: str, fmt: str) -> PromptDataset:
    """Load a prompt file in format ``fmt`` ("text" | "geneval" | "ocr")."""
    if fmt not in ("text", "geneval", "ocr"):
        raise PromptFileError(f"{path}: unknown prompt format {fmt!r} (expected text, geneval or ocr)")
    if not path or not os.path.isfile(path):
        raise PromptFileError(f"prompt file not found: {path!r}")
    prompts: list[str] = []
    metadata: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            if fmt == "geneval":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptFileError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                    raise PromptFileError(f"{path}:{lineno}: expected an object with a non-empty 'prompt'")
                prompts.append(obj["prompt"])
                metadata.append(obj)
            elif fmt == "ocr":
                target = ocr_target(line)
                if target is None:
                    raise PromptFileError(
                        f"{path}:{lineno}: OCR prompt has no double-quoted target text: {line[:80]!r}"
                    )
                prompts.append(line)
                metadata.append({"target": target})
            else:
                prompts.append(line)
                metadata.append({})
    if not prompts:
        raise PromptFileError(f"{path}: no prompts (empty file)")
    return PromptDataset(prompts, metadata, source=path)


_PROMPT_SOURCES: dict = {}


def register_prompt_source(scheme: str, fn) -> None:
    """Make ``"<scheme>:<spec>"`` data specs resolve to ``fn(spec) -> list of GenEval-style records``
    (a model family registers its built-in prompt sets this way, e.g. the toy world's ``toy:``)."""
    _PROMPT_SOURCES[scheme] = fn


def _source(spec: str):
    scheme = spec.split(":", 1)[0] if ":" in spec else ""
    if not scheme or "/" in scheme or "." in scheme:
        return None
    if scheme not in _PROMPT_SOURCES:
        from awm_jax.models.family import BUILTIN_FAMILIES, get_family

        if scheme in BUILTIN_FAMILIES:  # families register their prompt sources on import
            get_family(scheme)
    return _PROMPT_SOURCES.get(scheme)


def load_dataset(spec: str, fmt: str) -> PromptDataset:
    """A prompt file (:func:`load_prompts`) or a registered built-in prompt set ``"<scheme>:<spec>"``.

    The toy world registers ``"toy:<split>"`` (train / heldout / all) and ``"toy:<split>@<n>"`` with every tag
    repeated or cut to ``n`` prompts (``@balanced``: to the largest tag's count); see
    ``awm_jax.toy.shapes.prompt_split``.
    """
    fn = _source(spec)
    if fn is not None:
        try:
            records = fn(spec.split(":", 1)[1])
        except ValueError as e:
            raise PromptFileError(f"data spec {spec!r}: {e}") from e
        return dataset_from_records(records, source=spec)
    return load_prompts(spec, fmt)


def dataset_from_records(records: list[dict], source: str) -> PromptDataset:
    """Build a dataset from GenEval-style dicts (each with a ``prompt``)."""
    if not records:
        raise PromptFileError(f"{source}: no prompts")
    for i, r in enumerate(records):
        if not isinstance(r.get("prompt"), str):
            raise PromptFileError(f"{source}: record {i} has no 'prompt'")
    return PromptDataset([r["prompt"] for r in records], [dict(r) for r in records], source=source)


class GroupedSampler:
    """Deterministic grouped prompt sampler.

    Each step draws ``prompts_per_step`` distinct prompts (walking a per-epoch permutation of the
    dataset, so every prompt is seen once per epoch) and repeats each ``group_size`` times. The
    global batch of ``prompts_per_step * group_size`` entries is laid out prompt-major and split
    contiguously over processes; ``group_ids`` tell which entries share a prompt.
    """

    def __init__(self, num_prompts: int, prompts_per_step: int, group_size: int, seed: int):
        if num_prompts <= 0:
            raise ValueError("GroupedSampler needs at least one prompt")
        self.num_prompts = num_prompts
        self.prompts_per_step = prompts_per_step
        self.group_size = group_size
        self.seed = seed

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all hosts."""
        return self.prompts_per_step * self.group_size

    def _perm(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 0x5A])
        return rng.permutation(self.num_prompts)

    def step_prompts(self, step: int) -> np.ndarray:
        """The ``prompts_per_step`` dataset indices of ``step`` (distinct when the dataset allows)."""
        start = step * self.prompts_per_step
        out = []
        pos = start
        while len(out) < self.prompts_per_step:
            epoch, off = divmod(pos, self.num_prompts)
            perm = self._perm(epoch)
            take = min(self.prompts_per_step - len(out), self.num_prompts - off)
            out.extend(perm[off:off + take].tolist())
            pos += take
        return np.asarray(out, dtype=np.int64)

    def global_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(dataset_indices, group_ids)`` of the whole global batch, each ``(global_batch,)``."""
        prompts = self.step_prompts(step)
        idx = np.repeat(prompts, self.group_size)
        groups = np.repeat(np.arange(self.prompts_per_step), self.group_size)
        return idx, groups

    def local_indices(self, step: int, process_index: int = 0, process_count: int = 1):
        """This process's contiguous share of :meth:`global_indices`."""
        idx, groups = self.global_indices(step)
        if self.global_batch % process_count:
            raise ValueError(
                f"global batch {self.global_batch} (prompts_per_step x group_size) is not divisible "
                f"by the number of processes {process_count}"
            )
        n = self.global_batch // process_count
        sl = slice(process_index * n, (process_index + 1) * n)
        return idx[sl], groups[sl]
