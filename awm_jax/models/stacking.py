"""Per-layer <-> stacked (scanned) parameter layouts, for any number of named block stacks.

A model built with ``scan_layers=True`` keeps each run of identical blocks as one module whose parameters
have a leading ``layers`` axis: ``<grouped>.<g>.<...>`` instead of ``<per_layer>.<i>.<...>``. A
:class:`Stack` names both lists and the runs (SD3: ``transformer_blocks`` / ``transformer_block_groups``;
FLUX has two stacks, double- and single-stream). :func:`unstack_state` and :func:`stack_state` convert an
``nnx.State`` (Variables; the ``layers`` sharding name is dropped / added) or a nested dict of arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

__all__ = ["Stack", "flatten", "layer_paths", "nest", "runs", "stack_state", "unstack_state"]


@dataclasses.dataclass(frozen=True)
class Stack:
    """``per_layer`` list name, ``grouped`` list name and the ``(start, count)`` runs of the stack."""

    per_layer: str
    grouped: str
    groups: tuple[tuple[int, int], ...]


def runs(kinds: Sequence) -> tuple[tuple[int, int], ...]:
    """Runs of equal consecutive entries of ``kinds`` as ``((start, count), ...)``."""
    out: list[list[int]] = []
    for i, k in enumerate(kinds):
        if out and kinds[out[-1][0]] == k:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return tuple((s, c) for s, c in out)


def _meta_names(var):
    for k in ("out_sharding", "sharding_names", "sharding"):
        if var.has_metadata(k) and var.get_metadata(k) is not None:
            return k, tuple(var.get_metadata(k))
    return None, None


def flatten(d: dict, prefix: tuple = ()):
    """``(path tuple, leaf)`` pairs of a nested dict."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def nest(flat) -> dict:
    """The nested dict of ``(path tuple, leaf)`` pairs (or a ``{path tuple: leaf}`` mapping)."""
    out: dict = {}
    for path, v in (flat.items() if isinstance(flat, dict) else flat):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _flat(state):
    if isinstance(state, nnx.State):
        yield from nnx.to_flat_state(state)
    else:
        yield from flatten(state)


def _slice(v, j):
    if isinstance(v, nnx.Variable):
        k, names = _meta_names(v)
        kw = {k: names[1:]} if k else {}
        return v.replace(value=v[...][j], **kw)
    return v[j]


def _stack(parts):
    if isinstance(parts[0], nnx.Variable):
        k, names = _meta_names(parts[0])
        kw = {k: ("layers",) + names} if k else {}
        return parts[0].replace(value=jnp.stack([p[...] for p in parts]), **kw)
    return jnp.stack(parts)


def _rebuild(flat, like):
    return nnx.from_flat_state(flat) if isinstance(like, nnx.State) else nest(flat)


def _index(key) -> int:
    return int(getattr(key, "key", key))


def unstack_state(state, stacks: Sequence[Stack]):
    """Stacked state -> per-layer state (paths outside the stacks pass through)."""
    by_name = {s.grouped: s for s in stacks}
    flat = []
    for path, v in _flat(state):
        s = by_name.get(str(path[0])) if path else None
        if s is None:
            flat.append((tuple(path), v))
            continue
        start, count = s.groups[_index(path[1])]
        for j in range(count):
            flat.append(((s.per_layer, start + j) + tuple(path[2:]), _slice(v, j)))
    return _rebuild(flat, state)


def stack_state(state, stacks: Sequence[Stack]):
    """Per-layer state -> stacked state (inverse of :func:`unstack_state`)."""
    where = {}
    names = {s.per_layer for s in stacks}
    for s in stacks:
        for g, (start, count) in enumerate(s.groups):
            for j in range(count):
                where[(s.per_layer, start + j)] = (s.grouped, g, j, count)
    per: dict[tuple, list] = {}
    flat = []
    for path, v in _flat(state):
        loc = where.get((str(path[0]), _index(path[1]))) if len(path) > 1 and str(path[0]) in names else None
        if loc is None:
            flat.append((tuple(path), v))
            continue
        grouped, g, j, count = loc
        per.setdefault((grouped, g) + tuple(path[2:]), [None] * count)[j] = v
    for key, parts in per.items():
        if any(p is None for p in parts):
            raise ValueError(f"stack_state: missing layers for {'.'.join(map(str, key))}")
        flat.append((key, _stack(parts)))
    return _rebuild(flat, state)


def layer_paths(path: tuple, stacks: Sequence[Stack]) -> list[tuple] | None:
    """The per-layer paths whose tensors, stacked in order, make the stacked ``path``
    (``(grouped, g, ...)``); None for a path outside the stacks. Lets a loader stack each shard on the
    host instead of stacking whole tensors on a device."""
    by_name = {s.grouped: s for s in stacks}
    s = by_name.get(str(path[0])) if len(path) > 1 else None
    if s is None:
        return None
    start, count = s.groups[_index(path[1])]
    return [(s.per_layer, start + j) + tuple(path[2:]) for j in range(count)]
