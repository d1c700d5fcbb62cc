"""Accelerator environment set before JAX starts its backends: one GPU shared by JAX and the PyTorch reward
models, and libtpu beside other JAX processes.

**JAX + PyTorch on one GPU.** JAX preallocates 75 % of a GPU's memory when its backend starts
(``XLA_PYTHON_CLIENT_MEM_FRACTION``, default 0.75), so a reward model on ``cuda`` (``reward.*.device``) runs
out of memory. :func:`configure_gpu` (called by the trainer and ``python -m awm_jax.evaluate`` before JAX
starts its backends) sets ``XLA_PYTHON_CLIENT_MEM_FRACTION`` to ``gpu.jax_mem_fraction`` when a reward runs on
cuda, leaves an allocator setting the user exported alone, and returns the one pre-flight line that says
what it did (or, when JAX's backends already started, what to export instead).

**libtpu's lock.** Every JAX process with libtpu installed (the ``dev`` / ``tpu`` extras) takes
``<tmp>/libtpu_lockfile`` when its backends start, and a second one that loads the TPU plugin fails with
``ABORTED: ... lockfile``. ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` (what jax's own multi-process tests set) lets a
process load libtpu beside others; :func:`lock_holders` names the processes that hold the lock.
"""

from __future__ import annotations

import os
import tempfile

ALLOCATOR_VARS = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                  "XLA_PYTHON_CLIENT_ALLOCATOR")


def reward_devices(config) -> list[str]:
    """The torch devices of the config's reward (``reward.<section>.device``, ``reward.kwargs.device``)."""
    r = config.reward
    out = []
    for name in ("geneval", "pickscore"):
        if name == r.name and "device" in r[name]:
            out.append(str(r[name].device))
    if "device" in r.kwargs:
        out.append(str(r.kwargs.device))
    return out


def backends_started() -> bool:
    """Whether JAX has already created its backends (the allocator settings are read then)."""
    import sys

    if "jax" not in sys.modules:
        return False
    bridge = sys.modules.get("jax._src.xla_bridge")  # jax's backend registry (no public query exists)
    probe = getattr(bridge, "backends_are_initialized", None)
    if probe is None:
        return True  # cannot tell: assume it is too late to change the environment
    return bool(probe())


def configure_gpu(torch_devices, fraction: float, environ=None, started: bool | None = None) -> str | None:
    """Make JAX leave GPU memory to PyTorch when a device of ``torch_devices`` is cuda; returns the
    pre-flight line (None when no reward runs on cuda or ``fraction`` is 0)."""
    env = os.environ if environ is None else environ
    cuda = sorted({d for d in torch_devices if str(d).startswith("cuda")})
    if not cuda or not fraction:
        return None
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"config key 'gpu.jax_mem_fraction' = {fraction!r}: expected a fraction in (0, 1) "
                         "(0 = leave JAX's allocator alone)")
    user = {k: env[k] for k in ALLOCATOR_VARS if k in env}
    if user:
        return (f"rewards on {', '.join(cuda)}: JAX's GPU allocator as you set it "
                f"({', '.join(f'{k}={v}' for k, v in user.items())}); PyTorch gets what JAX leaves")
    if started if started is not None else backends_started():
        return (f"rewards on {', '.join(cuda)}: JAX's backend already started and preallocates 75 % of the "
                f"GPU; export XLA_PYTHON_CLIENT_MEM_FRACTION={float(fraction):.2f} before starting Python so "
                "PyTorch has room")
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{float(fraction):.2f}"
    return (f"rewards on {', '.join(cuda)}: JAX preallocates {float(fraction):.0%} of the GPU memory "
            f"(XLA_PYTHON_CLIENT_MEM_FRACTION={float(fraction):.2f}, gpu.jax_mem_fraction), PyTorch uses the "
            "rest")


def configure_from_config(config) -> str | None:
    """:func:`configure_gpu` for a trainer config (``gpu.jax_mem_fraction``, the rewards' devices)."""
    return configure_gpu(reward_devices(config), float(config.gpu.jax_mem_fraction))


def allow_shared_libtpu(environ=None) -> None:
    """Let this process load libtpu beside other JAX processes (before its backends start)."""
    env = os.environ if environ is None else environ
    env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def lockfile() -> str:
    return os.path.join(tempfile.gettempdir(), "libtpu_lockfile")


def lock_holders(path: str | None = None, proc: str = "/proc") -> list[tuple[int, str]]:
    """``(pid, command line)`` of the processes with ``path`` (libtpu's lockfile) open (Linux /proc)."""
    path = os.path.realpath(path or lockfile())
    out = []
    try:
        pids = [int(p) for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        fd_dir = os.path.join(proc, str(pid), "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.path.realpath(os.path.join(fd_dir, fd)) == path:
                    with open(os.path.join(proc, str(pid), "cmdline"), "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    out.append((pid, cmd))
                    break
            except OSError:
                continue
    return out


def lock_message(path: str | None = None) -> str:
    """One line naming libtpu's lockfile, who holds it and the way around it."""
    path = path or lockfile()
    holders = lock_holders(path)
    who = "; ".join(f"pid {pid}: {cmd[:80]}" for pid, cmd in holders) or "no process found holding it"
    return (f"libtpu's lockfile {path} is held ({who}); set ALLOW_MULTIPLE_LIBTPU_LOAD=1 in every JAX "
            "process (awm_jax sets it for plan) or stop the holder")
