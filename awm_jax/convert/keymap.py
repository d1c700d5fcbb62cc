"""Declarative, invertible key maps between diffusers (PyTorch) and Flax parameter trees.

A model's key map is generated from its config as a list of *modules*::

    Module(diffusers="transformer_blocks.0.attn.to_q", flax="transformer_blocks.0.attn.to_q",
           kind="linear", dims={"in_features": 1536, "out_features": 1536})

Each module *kind* (table ``KINDS``: ``linear``, ``conv2d``, ``norm``, ``rms_norm``, ``embedding``,
``tensor``) expands into per-tensor :class:`Rule` s ``(diffusers key, flax key, diffusers shape,
transform)``. Transforms are invertible objects (:class:`Identity`, :class:`Transpose`,
:class:`Reshape`, :class:`Chain`): ``forward`` maps a diffusers tensor to the Flax layout, ``inverse``
maps it back, and both have shape counterparts so everything can be planned (and validated) from
file headers before a single tensor is read. Transforms never change dtype or values, so a round trip
is bit-exact.

:class:`KeyMap` validates a tensor *source* (anything with ``keys()``, ``shape(key)``, ``dtype(key)``,
``get(key)`` and ``where(key)``, e.g. :class:`awm_jax.convert.io.SafetensorsReader`) against the map
and converts it lazily, tensor by tensor, in either direction. Any missing, unexpected or mis-shaped
tensor raises :class:`ConversionError` naming the key, the expected and actual shapes and the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

Shape = tuple[int, ...]
DIRECTIONS = ("to_flax", "to_diffusers")


class ConversionError(ValueError):
    """A tensor is missing, unexpected or mis-shaped, or a config cannot be mapped (message says which)."""


# ----------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------


class Transform:
    """Base class: an invertible, value-preserving layout change (diffusers -> Flax is ``forward``)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Diffusers layout -> Flax layout."""
        raise NotImplementedError

    def inverse(self, x: np.ndarray) -> np.ndarray:
        """Flax layout -> diffusers layout."""
        raise NotImplementedError

    def forward_shape(self, shape: Shape) -> Shape:
        """The Flax shape of a tensor of diffusers shape ``shape``."""
        raise NotImplementedError

    def inverse_shape(self, shape: Shape) -> Shape:
        """The diffusers shape of a tensor of Flax shape ``shape``."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Identity(Transform):
    """Same layout on both sides (biases, norm scales, buffers)."""

    def forward(self, x):
        return x

    def inverse(self, x):
        return x

    def forward_shape(self, shape):
        return tuple(shape)

    def inverse_shape(self, shape):
        return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Transpose(Transform):
    """Axis permutation: Flax tensor = ``diffusers.transpose(perm)``.

    ``Transpose((1, 0))``: Linear ``weight (out, in)`` <-> ``kernel (in, out)``;
    ``Transpose((2, 3, 1, 0))``: Conv ``weight OIHW`` <-> ``kernel HWIO``.
    """

    perm: tuple[int, ...]

    def __post_init__(self):
        if sorted(self.perm) != list(range(len(self.perm))):
            raise ValueError(f"Transpose: {self.perm} is not a permutation")

    @property
    def inverse_perm(self) -> tuple[int, ...]:
        return tuple(int(i) for i in np.argsort(self.perm))

    def forward(self, x):
        return np.transpose(x, self.perm)

    def inverse(self, x):
        return np.transpose(x, self.inverse_perm)

    def forward_shape(self, shape):
        _check_rank(shape, len(self.perm), self)
        return tuple(shape[i] for i in self.perm)

    def inverse_shape(self, shape):
        _check_rank(shape, len(self.perm), self)
        return tuple(shape[i] for i in self.inverse_perm)


@dataclasses.dataclass(frozen=True)
class Reshape(Transform):
    """Row-major reshape between a fixed diffusers shape and a fixed Flax shape (same element count)."""

    diffusers_shape: Shape
    flax_shape: Shape

    def __post_init__(self):
        if int(np.prod(self.diffusers_shape)) != int(np.prod(self.flax_shape)):
            raise ValueError(f"Reshape {self.diffusers_shape} -> {self.flax_shape}: sizes differ")

    def forward(self, x):
        return np.reshape(x, self.flax_shape)

    def inverse(self, x):
        return np.reshape(x, self.diffusers_shape)

    def forward_shape(self, shape):
        if tuple(shape) != tuple(self.diffusers_shape):
            raise ConversionError(f"{self}: got shape {tuple(shape)}")
        return tuple(self.flax_shape)

    def inverse_shape(self, shape):
        if tuple(shape) != tuple(self.flax_shape):
            raise ConversionError(f"{self}: got shape {tuple(shape)}")
        return tuple(self.diffusers_shape)


@dataclasses.dataclass(frozen=True)
class Chain(Transform):
    """Composition: ``forward`` applies ``steps`` in order, ``inverse`` undoes them in reverse order."""

    steps: tuple[Transform, ...]

    def forward(self, x):
        for t in self.steps:
            x = t.forward(x)
        return x

    def inverse(self, x):
        for t in reversed(self.steps):
            x = t.inverse(x)
        return x

    def forward_shape(self, shape):
        for t in self.steps:
            shape = t.forward_shape(shape)
        return tuple(shape)

    def inverse_shape(self, shape):
        for t in reversed(self.steps):
            shape = t.inverse_shape(shape)
        return tuple(shape)


def _check_rank(shape: Shape, rank: int, t: Transform) -> None:
    if len(shape) != rank:
        raise ConversionError(f"{t} expects a rank-{rank} tensor, got shape {tuple(shape)}")


LINEAR_T = Transpose((1, 0))
CONV2D_T = Transpose((2, 3, 1, 0))


# ----------------------------------------------------------------------------------------------------
# Rules, module kinds, modules
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """One tensor: ``diffusers_key`` <-> ``flax_key`` (dot-joined Flax path) with its transform.

    ``diffusers_shape`` is the expected shape on the diffusers side; ``flax_shape`` follows from the
    transform. ``optional`` tensors (e.g. persistent buffers the Flax model recomputes) may be absent
    from a source, but are converted when present.
    """

    diffusers_key: str
    flax_key: str
    diffusers_shape: Shape
    transform: Transform = Identity()
    optional: bool = False

    @property
    def flax_shape(self) -> Shape:
        return self.transform.forward_shape(self.diffusers_shape)

    def source_key(self, direction: str) -> str:
        return self.diffusers_key if direction == "to_flax" else self.flax_key

    def target_key(self, direction: str) -> str:
        return self.flax_key if direction == "to_flax" else self.diffusers_key

    def source_shape(self, direction: str) -> Shape:
        return self.diffusers_shape if direction == "to_flax" else self.flax_shape

    def target_shape(self, direction: str) -> Shape:
        return self.flax_shape if direction == "to_flax" else self.diffusers_shape

    def apply(self, x: np.ndarray, direction: str) -> np.ndarray:
        return self.transform.forward(x) if direction == "to_flax" else self.transform.inverse(x)


# A kind turns a module's dims into [(diffusers param name, flax param name, diffusers shape, transform)].
ParamSpec = tuple[str, str, Shape, Transform]
KindFn = Callable[..., list[ParamSpec]]
KINDS: dict[str, KindFn] = {}


def register_kind(name: str) -> Callable[[KindFn], KindFn]:
    """Decorator adding a module kind to ``KINDS`` (for model families that need a new one)."""

    def deco(fn: KindFn) -> KindFn:
        if name in KINDS:
            raise ValueError(f"module kind {name!r} is already registered")
        KINDS[name] = fn
        return fn

    return deco


@register_kind("linear")
def _linear(in_features: int, out_features: int, bias: bool = True) -> list[ParamSpec]:
    """``nn.Linear``: weight (out, in) <-> kernel (in, out); bias."""
    specs = [("weight", "kernel", (out_features, in_features), LINEAR_T)]
    if bias:
        specs.append(("bias", "bias", (out_features,), Identity()))
    return specs


@register_kind("conv2d")
def _conv2d(in_channels: int, out_channels: int, kernel_size: int | Sequence[int], bias: bool = True):
    """``nn.Conv2d``: weight OIHW <-> kernel HWIO; bias."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    specs = [("weight", "kernel", (out_channels, in_channels, kh, kw), CONV2D_T)]
    if bias:
        specs.append(("bias", "bias", (out_channels,), Identity()))
    return specs


@register_kind("norm")
def _norm(dim: int, bias: bool = True) -> list[ParamSpec]:
    """Affine LayerNorm / GroupNorm: weight <-> scale; bias."""
    specs = [("weight", "scale", (dim,), Identity())]
    if bias:
        specs.append(("bias", "bias", (dim,), Identity()))
    return specs


@register_kind("rms_norm")
def _rms_norm(dim: int) -> list[ParamSpec]:
    """RMSNorm with a weight: weight <-> scale."""
    return [("weight", "scale", (dim,), Identity())]


@register_kind("embedding")
def _embedding(num_embeddings: int, features: int) -> list[ParamSpec]:
    """``nn.Embedding``: weight <-> embedding (same layout)."""
    return [("weight", "embedding", (num_embeddings, features), Identity())]


@register_kind("tensor")
def _tensor(shape: Sequence[int], transform: Transform | None = None) -> list[ParamSpec]:
    """A bare parameter / buffer: the module prefix *is* the key on both sides."""
    return [("", "", tuple(shape), transform or Identity())]


@dataclasses.dataclass(frozen=True)
class Module:
    """One module of a model: diffusers prefix <-> Flax prefix, its kind and the kind's dims."""

    diffusers: str
    flax: str
    kind: str
    dims: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optional: bool = False

    def rules(self) -> list[Rule]:
        """Expand into per-tensor rules through the kind table."""
        if self.kind not in KINDS:
            known = sorted(KINDS)
            raise ConversionError(f"module {self.diffusers!r}: unknown kind {self.kind!r}; known: {known}")
        out = []
        for d_name, f_name, shape, transform in KINDS[self.kind](**self.dims):
            out.append(
                Rule(
                    diffusers_key=_join(self.diffusers, d_name),
                    flax_key=_join(self.flax, f_name),
                    diffusers_shape=tuple(int(s) for s in shape),
                    transform=transform,
                    optional=self.optional,
                )
            )
        return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def same(prefix: str, kind: str, optional: bool = False, **dims: Any) -> Module:
    """A module whose diffusers and Flax prefixes coincide (the usual case: Flax names mirror diffusers)."""
    return Module(prefix, prefix, kind, dims, optional)


# ----------------------------------------------------------------------------------------------------
# The key map
# ----------------------------------------------------------------------------------------------------


class TensorSource(Protocol):
    """What :meth:`KeyMap.convert` reads: a lazily readable set of named tensors."""

    def keys(self) -> Iterable[str]: ...

    def shape(self, key: str) -> Shape: ...

    def dtype(self, key: str) -> np.dtype: ...

    def get(self, key: str) -> np.ndarray: ...

    def where(self, key: str | None = None) -> str: ...


class KeyMap:
    """An ordered, duplicate-free list of :class:`Rule` s for one model config (``name`` for messages)."""

    def __init__(self, rules: Iterable[Rule], name: str = "model"):
        self.name = name
        self.rules: list[Rule] = list(rules)
        self.by_diffusers: dict[str, Rule] = {}
        self.by_flax: dict[str, Rule] = {}
        for r in self.rules:
            for table, key in ((self.by_diffusers, r.diffusers_key), (self.by_flax, r.flax_key)):
                if key in table:
                    raise ValueError(f"{name} key map: duplicate key {key!r}")
                table[key] = r

    @classmethod
    def from_modules(cls, modules: Iterable[Module], name: str = "model") -> KeyMap:
        """Expand a declarative module list through the kind table."""
        return cls([r for m in modules for r in m.rules()], name=name)

    def __len__(self) -> int:
        return len(self.rules)

    def diffusers_keys(self) -> list[str]:
        return [r.diffusers_key for r in self.rules]

    def flax_keys(self) -> list[str]:
        return [r.flax_key for r in self.rules]

    def _table(self, direction: str) -> dict[str, Rule]:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        return self.by_diffusers if direction == "to_flax" else self.by_flax

    def plan(self, source: TensorSource, direction: str) -> list[tuple[Rule, str, np.dtype, Shape]]:
        """Validate ``source`` against the map from metadata alone.

        Returns ``[(rule, target_key, dtype, target_shape)]`` in map order for the tensors present.
        Raises :class:`ConversionError` for missing (non-optional), unexpected or mis-shaped tensors.
        """
        table = self._table(direction)
        side = "diffusers" if direction == "to_flax" else "Flax"
        present = set(source.keys())
        unexpected = sorted(present - set(table))
        if unexpected:
            shown = ", ".join(f"{k!r} {tuple(source.shape(k))} in {source.where(k)}" for k in unexpected[:5])
            more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
            raise ConversionError(
                f"{self.name}: {len(unexpected)} unexpected {side} tensor(s) not in the key map: "
                f"{shown}{more}"
            )
        missing = [k for k, r in table.items() if k not in present and not r.optional]
        if missing:
            shown = ", ".join(
                f"{k!r} (expected shape {table[k].source_shape(direction)})" for k in missing[:5]
            )
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ConversionError(
                f"{self.name}: {len(missing)} {side} tensor(s) missing from {source.where()}: {shown}{more}"
            )
        plan = []
        for r in self.rules:
            key = r.source_key(direction)
            if key not in present:
                continue
            got, want = tuple(source.shape(key)), r.source_shape(direction)
            if got != want:
                raise ConversionError(
                    f"{self.name}: {side} tensor {key!r} in {source.where(key)} has shape {got}, "
                    f"expected {want}"
                )
            plan.append((r, r.target_key(direction), np.dtype(source.dtype(key)), r.target_shape(direction)))
        return plan

    def convert(self, source: TensorSource, direction: str) -> Iterator[tuple[str, np.ndarray]]:
        """Validate, then yield ``(target_key, array)`` one tensor at a time (dtype as stored)."""
        for rule, target, _, shape in self.plan(source, direction):
            x = rule.apply(source.get(rule.source_key(direction)), direction)
            assert tuple(x.shape) == shape, (rule, x.shape, shape)
            yield target, x

    def converter(self, source: TensorSource, direction: str) -> tuple[list, Callable[[str], np.ndarray]]:
        """``(entries, get)`` for a streaming writer: ``entries = [(target_key, dtype, shape)]`` and
        ``get(target_key)`` reads + transforms that one tensor on demand."""
        plan = self.plan(source, direction)
        by_target = {t: r for r, t, _, _ in plan}

        def get(target: str) -> np.ndarray:
            r = by_target[target]
            return r.apply(source.get(r.source_key(direction)), direction)

        return [(t, dt, shp) for _, t, dt, shp in plan], get
