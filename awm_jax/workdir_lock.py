"""One writer per workdir: the trainer holds ``WORKDIR/.lock`` while it runs.

The lock file holds the holder's host name, pid and start time (JSON) and is held with an exclusive
``fcntl.flock`` on an open descriptor, which the kernel drops when the holder dies (``kill -9`` included).
A second trainer on the same workdir finds the flock taken and stops with :class:`WorkdirLockedError` naming
the holder. A lock file left by a process that no longer runs (its flock is free) is taken over with a
message naming the old holder. In a multi-host run only process 0 takes the lock; every process learns the
outcome (:func:`awm_jax.distributed.broadcast_flag`), so all stop together when the workdir is taken.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

__all__ = ["LOCK_NAME", "WorkdirLock", "WorkdirLockedError", "holder_of"]

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another trainer holds the workdir (the message names its host and pid)."""


def holder_of(path: str) -> dict:
    """The holder recorded in the lock file ``path`` (``{}`` when unreadable or empty)."""
    try:
        with open(path) as f:
            return dict(json.loads(f.read() or "{}"))
    except (OSError, ValueError, TypeError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    pid, host, since = (holder.get(k, "?") for k in ("pid", "host", "since"))
    return f"pid {pid} on host {host} (since {since})"


class WorkdirLock:
    """``with WorkdirLock(workdir, primary=True) as lock:`` -- hold ``workdir/.lock`` for the block.

    ``primary``: this process takes the lock (process 0 of a multi-host run); others only wait for the
    outcome through ``agree`` (a callable ``bool -> bool`` that returns process 0's value on every process,
    e.g. :func:`awm_jax.distributed.broadcast_flag`). ``messages``: what happened (a taken-over stale lock).
    """

    def __init__(self, workdir: str, primary: bool = True, agree=None):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.primary, self.agree = primary, agree
        self.messages: list[str] = []
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        """Take the lock; raise :class:`WorkdirLockedError` when another live trainer holds it."""
        error = None
        if self.primary:
            try:
                self._take()
            except WorkdirLockedError as e:
                error = e
        ok = error is None
        if self.agree is not None:
            ok = self.agree(ok)
        if error is not None:
            raise error
        if not ok:
            raise WorkdirLockedError(f"workdir {self.workdir} is locked by another trainer (see process 0's "
                                     f"error, {self.path})")
        return self

    def _take(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        for _ in range(20):  # the file we locked must still be the one at the path (a holder removes it)
            fd = self._flock()
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise WorkdirLockedError(f"workdir {self.workdir}: could not take {self.path} (keeps changing)")
        old = holder_of(self.path)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if old.get("pid"):
            same_host = old.get("host") == me["host"]
            if same_host and int(old["pid"]) != me["pid"] and _alive(int(old["pid"])):
                state = "still running but no longer holding it"
            else:
                state = "no longer running" if same_host else "its lock was released"
            self.messages.append(f"took over the stale workdir lock {self.path} of {_describe(old)}: {state}")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        self._fd = fd

    def _flock(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = holder_of(self.path)
            raise WorkdirLockedError(
                f"workdir {self.workdir} is in use by another trainer: {_describe(holder)} holds "
                f"{self.path}; "
                "stop it, or use another --workdir") from None
        return fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            if holder_of(self.path).get("pid") == os.getpid():
                os.remove(self.path)
        except OSError:
            pass
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
