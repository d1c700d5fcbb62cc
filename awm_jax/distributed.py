"""Multi-host training: one JAX process per host (TPU pod workers, GPU cluster nodes, CPU processes in tests).

Every host runs the same program. The global batch of a step is cut into rollout *blocks* of
``sample.batch_size x jax.device_count()`` samples (the last may be smaller); each host owns one equal,
contiguous slice of every block (:func:`local_positions`), encodes, rolls out, decodes and scores only those
samples, and the block becomes one global array on the mesh (:func:`to_global`,
``jax.make_array_from_process_local_data``). With the usual device order (devices sorted by process) a
block's global array holds the samples in the same order as on one process with all the devices, so a run
gives the same numbers on 2 processes x 2 devices as on 1 process x 4 devices. Rewards (and group ids) are
gathered once per step (:func:`gather_rows`), every host computes the same advantages from them, and keeps
its own rows. One process: every helper here is the identity or plain numpy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["initialize", "detected_cluster", "local_positions", "to_global", "local_rows", "gather_rows",
           "broadcast_flag", "gather_status", "replicate", "gather_padded", "gather_strings", "block_slices",
           "DISTRIBUTED_FLAGS", "pop_distributed_flags"]

log = logging.getLogger(__name__)

DISTRIBUTED_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")


def pop_distributed_flags(argv: Sequence[str]) -> tuple[list[str], dict]:
    """Split ``--coordinator_address A --num_processes N --process_id I`` (``=`` or space separated) off
    ``argv``; returns ``(rest, {name: value})`` with ints for the counts."""
    rest, found, argv, i = [], {}, list(argv), 0
    while i < len(argv):
        arg = argv[i]
        name, _, value = arg.partition("=")
        if name in DISTRIBUTED_FLAGS:
            if not _:
                if i + 1 >= len(argv):
                    raise ValueError(f"argument {name} needs a value")
                value, i = argv[i + 1], i + 1
            key = name[2:]
            if key != "coordinator_address":
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"argument {name}={value!r}: expected an integer") from None
            found[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, found


FORCE_ENV = "AWM_JAX_DISTRIBUTED"  # =1: call jax.distributed.initialize() and let jax detect the cluster


def _count(var: str) -> int:
    try:
        return int(os.environ.get(var, "1"))
    except ValueError:
        return 1


def detected_cluster() -> str | None:
    """Name of the multi-process environment this process runs in, as ``jax.distributed.initialize()``
    detects it (SLURM ``srun`` with several tasks, Open MPI ``mpirun -n N``, TPU workers listed in
    ``TPU_WORKER_HOSTNAMES``), ``"forced"`` with ``AWM_JAX_DISTRIBUTED=1``, or None (a single host)."""
    env = os.environ
    if env.get(FORCE_ENV, "") == "1":
        return "forced"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm) and _count("SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _count("OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "tpu"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """``jax.distributed.initialize`` when flags are given or a multi-process cluster is detected; returns
    whether it ran. A single host (no flags, no cluster) is left as it is."""
    given = (("coordinator_address", coordinator_address), ("num_processes", num_processes),
             ("process_id", process_id))
    manual = {k: v for k, v in given if v is not None}
    cluster = None if manual else detected_cluster()
    if not manual and cluster is None:
        return False
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu" or jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over gloo
    jax.distributed.initialize(**manual)
    log.info("jax.distributed: process %d of %d (%s), %d local / %d global devices", jax.process_index(),
             jax.process_count(), cluster or "manual", jax.local_device_count(), jax.device_count())
    return True


def local_positions(n: int, block: int, process_index: int | None = None,
                    process_count: int | None = None) -> np.ndarray:
    """Positions in the step's global batch ``[0, n)`` that this process owns: its ``1/process_count``
    contiguous slice of every block of ``block`` samples (the last block may be shorter)."""
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    out = []
    for start in range(0, n, max(block, 1)):
        size = min(block, n - start)
        if size % count:
            raise ValueError(f"a rollout block of {size} samples (of a batch of {n}, blocks of {block}) is "
                             f"not divisible by the {count} processes")
        share = size // count
        out.append(np.arange(start + p * share, start + (p + 1) * share))
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def batch_spec(ndim: int, axis: int = 0) -> PartitionSpec:
    spec = [None] * ndim
    spec[axis] = ("data", "fsdp")
    return PartitionSpec(*spec)


def to_global(x, mesh: Mesh | None, axis: int = 0):
    """This host's rows of a batch (leading ``axis``) as one global array sharded over (data, fsdp).
    One process: returned as given (the step functions place it)."""
    if jax.process_count() == 1 or mesh is None:
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, batch_spec(x.ndim, axis)), x)


def local_rows(x, axis: int = 0) -> np.ndarray:
    """The rows (along ``axis``) of a global batch-sharded array that this host's devices hold, in order, as
    numpy (the inverse of :func:`to_global`); a host-local array comes back unchanged."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return x
    pieces = {}
    for s in x.addressable_shards:
        start = (s.index[axis].start or 0) if len(s.index) > axis else 0
        pieces.setdefault(start, s.data)  # shards repeated over the tensor axis hold the same rows
    return np.concatenate([np.asarray(pieces[k]) for k in sorted(pieces)], axis=axis)


def gather_rows(x: np.ndarray, positions: np.ndarray, n: int) -> np.ndarray:
    """Every host's rows of a step (``x[i]`` sits at global ``positions[i]``) as the full ``(n, ...)`` array
    in global order, on every host (one all-gather)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        out = np.empty((n,) + x.shape[1:], x.dtype)
        out[positions] = x
        return out
    from jax.experimental import multihost_utils

    allx = np.asarray(multihost_utils.process_allgather(x, tiled=False))  # (P, n_local, ...)
    allpos = np.asarray(multihost_utils.process_allgather(np.asarray(positions), tiled=False))
    out = np.empty((n,) + x.shape[1:], x.dtype)
    out[allpos.reshape(-1)] = allx.reshape((-1,) + x.shape[1:])
    return out


def gather_padded(x: np.ndarray) -> np.ndarray:
    """Element-wise maximum over the hosts of an array each host fills where it owns rows (zeros elsewhere):
    the few grid images of an evaluation collected on every host."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False)).max(axis=0)


def gather_strings(strings: Sequence[str], positions: np.ndarray, n: int, width: int = 128) -> list[str]:
    """:func:`gather_rows` for strings (UTF-8, at most ``width`` bytes each)."""
    buf = np.zeros((len(strings), width), np.uint8)
    for i, s in enumerate(strings):
        b = str(s).encode()[:width]
        buf[i, :len(b)] = np.frombuffer(b, np.uint8)
    full = gather_rows(buf, positions, n)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in full]


def block_slices(n: int, block: int, process_count: int | None = None) -> list[slice]:
    """Slices of this host's rows (in :func:`local_positions` order), one per rollout block."""
    count = jax.process_count() if process_count is None else process_count
    out, off = [], 0
    for start in range(0, n, max(block, 1)):
        share = min(block, n - start) // count
        out.append(slice(off, off + share))
        off += share
    return out


def broadcast_flag(flag: bool) -> bool:
    """Process 0's value of ``flag`` on every process (decisions read from files only process 0 wrote)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32))))


def gather_status(ok: bool, message: str = "", width: int = 1024) -> list[tuple[int, str]]:
    """``[(process index, message)]`` of every process whose ``ok`` is False, on every process (one
    all-gather): how a host whose scorer failed tells the others, who then stop with the same error instead of
    waiting for it in the next collective. One process: its own status."""
    if jax.process_count() == 1:
        return [] if ok else [(0, message)]
    from jax.experimental import multihost_utils

    buf = np.zeros((width + 1,), np.uint8)
    buf[0] = 0 if ok else 1
    b = str(message).encode()[:width]
    buf[1:1 + len(b)] = np.frombuffer(b, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf, tiled=False))
    return [(i, bytes(r[1:]).rstrip(b"\0").decode(errors="replace")) for i, r in enumerate(rows) if r[0]]


def replicate(x, mesh: Mesh | None):
    """A host-local value that is the same on every host as a replicated global array on ``mesh`` (what
    multi-host orbax saves); one process without a mesh: unchanged."""
    if mesh is None:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec()), lambda idx: x[idx])
