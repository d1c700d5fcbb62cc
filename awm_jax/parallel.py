"""Device meshes, THE logical-axis rule table, and multi-host helpers.

Parameters carry *logical* axis names as metadata (``sharding_names``, stored by Flax as
``out_sharding``); :data:`LOGICAL_AXIS_RULES` maps each name to mesh axes of the 3-axis mesh
``("data", "fsdp", "tensor")``. :func:`logical_to_mesh_sharding` turns a model state (or its
``jax.eval_shape`` abstract) into a pytree of ``NamedSharding`` s. A mesh axis is used at most once per
array, and a dimension whose size is not divisible by its mesh axes is replicated instead.

Activations use the same table: inside a program traced under :func:`activation_mesh` with ``constrain``
(config key ``mesh.constrain_activations``; off by default, see its comment) the model blocks put
:func:`constrain` on their residual stream (``("batch", None, None)``), q/k/v (``("batch", None, "heads",
None)``) and feed-forward hidden (``("batch", None, "mlp")``), so the batch stays on ``data`` x ``fsdp`` and
XLA gathers the FSDP-sharded weights of a scanned stack one layer at a time inside the loop (as MaxText /
MaxDiffusion constrain their activations) instead of choosing its own layout.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (str), tuple of mesh axes, or None (replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", None),
    ("norm", None),
    ("lora_rank", None),
)


_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("awm_activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None, constrain: bool = False):
    """Trace programs inside this block with ``mesh`` as the mesh of the splash kernel's ``shard_map`` and,
    with ``constrain`` (config key ``mesh.constrain_activations``), of the activation constraints of
    :func:`constrain`. Enter it around the *first call* (the trace) of a jitted function; every later call
    of that function reuses the trace."""
    token = _ACTIVATION_MESH.set((mesh, bool(constrain)))
    try:
        yield mesh
    finally:
        _ACTIVATION_MESH.reset(token)


def current_mesh() -> Mesh | None:
    """The mesh of the enclosing :func:`activation_mesh` (None outside one)."""
    cur = _ACTIVATION_MESH.get()
    return None if cur is None else cur[0]


def constrain(x, names: Sequence[str | None]):
    """``with_sharding_constraint`` of activation ``x`` per its logical ``names`` under the current
    :func:`activation_mesh` with ``constrain=True`` (else a no-op, as on a one-device mesh); a ``None`` name
    leaves that dimension to XLA."""
    cur = _ACTIVATION_MESH.get()
    mesh = None if cur is None or not cur[1] else cur[0]
    if mesh is None or mesh.size == 1:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: names {tuple(names)} do not match activation shape {x.shape}")
    spec = logical_to_spec(names, x.shape, mesh)
    # dimensions named None are left to XLA (UNCONSTRAINED), not forced to be replicated
    spec = PartitionSpec(*(PartitionSpec.UNCONSTRAINED if n is None else a for n, a in zip(names, spec)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh with Auto axis types; ``data=-1`` takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, v in (("fsdp", fsdp), ("tensor", tensor)):
        if v < 1:
            raise ValueError(f"make_mesh: {name}={v} must be >= 1")
    if data == -1:
        if n % (fsdp * tensor):
            raise ValueError(f"make_mesh: {n} devices not divisible by fsdp*tensor={fsdp * tensor}")
        data = n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise ValueError(f"make_mesh: data*fsdp*tensor={data}*{fsdp}*{tensor} != {n} devices")
    arr = np.asarray(devices, dtype=object).reshape(data, fsdp, tensor)
    why = three_axis_problem(data, fsdp, tensor)
    if why:
        warnings.warn(why, stacklevel=2)
    return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


THREE_AXIS_MISCOMPILE = (
    "XLA's SPMD partitioner miscompiles on a mesh whose data, fsdp and tensor axes are all > 1: with the "
    "batch on (data, fsdp) and weights on tensor / (tensor, fsdp) (this rule table's layout) some batch "
    "shards get wrong values, Shardy and GSPMD alike (jax 0.10.2; 8-line reproducer: "
    "tests/test_xla_three_axis_mesh.py; every two-axis mesh computes correctly)")


def three_axis_problem(data: int, fsdp: int, tensor: int) -> str | None:
    """Why a ``data x fsdp x tensor`` mesh must not be used (all three axes > 1), or None."""
    if data > 1 and fsdp > 1 and tensor > 1:
        return f"mesh data {data} x fsdp {fsdp} x tensor {tensor}: {THREE_AXIS_MISCOMPILE}"
    return None


def config_mesh(config, devices: Sequence | None = None) -> Mesh:
    """The run's mesh from config keys ``mesh.data`` / ``mesh.fsdp`` / ``mesh.tensor``. ValueError naming the
    keys when they do not fit the devices or when all three axes are > 1 (:data:`THREE_AXIS_MISCOMPILE`)."""
    m = config.mesh
    keys = f"config keys 'mesh.data' = {m.data}, 'mesh.fsdp' = {m.fsdp}, 'mesh.tensor' = {m.tensor}"
    n = len(jax.devices() if devices is None else devices)
    try:
        with warnings.catch_warnings():  # a three-axis mesh is refused below, not warned about
            warnings.simplefilter("ignore")
            mesh = make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor, devices=devices)
    except ValueError as e:
        raise ValueError(f"{keys} do not fit the {n} devices ({e}; mesh.data=-1 takes all the remaining "
                         "devices)") from e
    why = three_axis_problem(*(mesh.shape[a] for a in MESH_AXES))
    if why:
        raise ValueError(f"{keys}: {why}; use at most two axes > 1 (e.g. mesh.tensor = 1)")
    return mesh


def _rules_dict(rules) -> dict:
    d = {}
    for name, axes in rules:
        d[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return d


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int] | None, mesh: Mesh,
                    rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """PartitionSpec for one array from its logical ``names`` (unknown names raise, naming them)."""
    if names is None:
        return PartitionSpec()
    table = _rules_dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis name {name!r} has no rule in LOGICAL_AXIS_RULES "
                             f"({sorted(table)})")
        axes = tuple(a for a in table[name] if a in mesh.shape and a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if axes and shape is not None and shape[i] % size:
            axes = ()
        used.update(axes)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*spec)


def _names_of(var) -> tuple | None:
    for k in ("out_sharding", "sharding_names", "sharding"):
        if var.has_metadata(k) and var.get_metadata(k) is not None:
            return tuple(var.get_metadata(k))
    return None


def logical_to_mesh_sharding(state, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Pytree of ``NamedSharding`` (same structure as ``state``) from each Variable's logical axis names."""

    def one(var):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        shape = getattr(value, "shape", None)
        names = _names_of(var) if isinstance(var, nnx.Variable) else None
        if names is not None and shape is not None and len(names) != len(shape):
            raise ValueError(f"sharding names {names} do not match array shape {shape}")
        sh = NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))
        return var.replace(value=sh) if isinstance(var, nnx.Variable) else sh

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model_state(state, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """``jax.device_put`` every array of ``state`` onto ``mesh`` per its logical names."""
    shardings = logical_to_mesh_sharding(state, mesh, rules)
    return jax.device_put(state, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch-leading array of rank ``ndim`` (batch over ``data`` x ``fsdp``)."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def process_allgather(x, tiled: bool = False):
    """Gather a (possibly multi-host, sharded) pytree to every host as numpy arrays.

    Single-process: returns ``np.asarray`` of the (global) arrays. Multi-process: wraps
    ``jax.experimental.multihost_utils.process_allgather``.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, x)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=tiled)


def state_shardings(tree, mesh: Mesh | None):
    """``logical_to_mesh_sharding(tree, mesh)``, or None without a mesh."""
    return None if mesh is None else logical_to_mesh_sharding(tree, mesh)


def num_batch_shards(mesh: Mesh | None) -> int:
    """How many shards the batch axis is split into (``data`` x ``fsdp``; 1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])


def place(tree, shardings):
    """``device_put`` the leaves whose sharding differs (no copy for already-placed leaves)."""
    if shardings is None:
        return tree

    def one(x, s):
        return x if getattr(x, "sharding", None) == s else put(x, s)

    return jax.tree.map(one, tree, shardings)


def put(x, sharding):
    """``jax.device_put`` that also works across hosts: a host-local value that is the same on every host
    (initial weights, keys) becomes a global array with each host building only its devices' pieces."""
    if jax.process_count() == 1 or getattr(sharding, "is_fully_addressable", True):
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # global -> global: a reshard
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = np.asarray(jax.random.key_data(x))
        impl = jax.random.key_impl(x)
        arr = jax.make_array_from_callback(data.shape, sharding, lambda idx: data[idx])
        return jax.random.wrap_key_data(arr, impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


_PLACED: list = []  # [(source tree, shardings, placed tree)], most recent first


def place_once(tree, shardings):
    """:func:`place` for an unchanging tree (the frozen base weights): one device copy shared by every
    step and rollout function that places the same object with the same shardings."""
    if shardings is None:
        return tree
    leaves = jax.tree.leaves(shardings)
    for src, sh, out in _PLACED:
        if src is tree and sh == leaves:
            return out
    out = place(tree, shardings)
    _PLACED.insert(0, (tree, leaves, out))
    del _PLACED[4:]
    return out


def constrain_batch(x, mesh: Mesh | None, axis: int = 0):
    """Shard ``x``'s ``axis`` over (data, fsdp) inside jit (no-op without a mesh)."""
    if mesh is None:
        return x
    spec = [None] * x.ndim
    spec[axis] = ("data", "fsdp")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def is_main_process() -> bool:
    """True on process 0 (logging / checkpoint-writing host)."""
    return jax.process_index() == 0
