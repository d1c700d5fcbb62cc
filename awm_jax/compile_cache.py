"""JAX's persistent compilation cache, on by default for the trainer and the sampler.

Compiled XLA executables are kept in one per-user directory shared by every workdir:
``$XDG_CACHE_HOME/awm_jax/jax_cache`` (else ``~/.cache/awm_jax/jax_cache``), so a restarted or resumed run,
and a second run of the same config, skips the compilation of its train step and samplers. The config key
``compile.cache_dir`` moves it (a path) or disables it (``"off"``); the environment variable
``AWM_JAX_COMPILE_CACHE`` (same values) overrides the key, which the test suite uses to keep the cache out
of the user's home.
"""

from __future__ import annotations

import logging
import os

__all__ = ["CompileCounter", "default_cache_dir", "resolve_cache_dir", "enable"]

log = logging.getLogger("awm_jax.compile_cache")
ENV = "AWM_JAX_COMPILE_CACHE"
_OFF = ("off", "none", "false", "0")


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/awm_jax/jax_cache``, else ``~/.cache/awm_jax/jax_cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "awm_jax", "jax_cache")


def resolve_cache_dir(setting: str | None = "") -> str | None:
    """The cache directory for a ``compile.cache_dir`` value ("" = the per-user default, "off" = None);
    ``$AWM_JAX_COMPILE_CACHE`` takes precedence when set."""
    value = os.environ.get(ENV, setting if setting is not None else "")
    value = str(value).strip()
    if value.lower() in _OFF:
        return None
    return os.path.abspath(os.path.expanduser(value)) if value else default_cache_dir()


def enable(setting: str | None = "") -> str | None:
    """Point JAX's persistent compilation cache at :func:`resolve_cache_dir` (``setting``); returns the
    directory or None (disabled, or not creatable: a warning, the run goes on without the cache)."""
    import jax

    path = resolve_cache_dir(setting)
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache %s cannot be created (%s): compiling without it", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # cache every executable that took a measurable time to compile (JAX's default: >= 1 s only)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return path


class CompileCounter:
    """Counts JAX compilations while active (``with CompileCounter() as c: ...``) through ``jax.monitoring``:
    ``c.lowerings`` (every jit lowering to StableHLO: a trace that reached XLA, cache hit or not),
    ``c.backend_compiles`` (XLA compiles not served by the persistent cache) and ``c.compile_s`` (their
    seconds)."""

    _LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
    _BACKEND = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.lowerings = 0
        self.backend_compiles = 0
        self.compile_s = 0.0

    def _listen(self, event: str, duration: float, **_):
        if event == self._LOWER:
            self.lowerings += 1
        elif event == self._BACKEND:
            self.backend_compiles += 1
            self.compile_s += float(duration)

    def __enter__(self):
        from jax import monitoring

        monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        from jax import monitoring

        monitoring.unregister_event_duration_listener(self._listen)
