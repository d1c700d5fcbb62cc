"""Time grids for flow-matching samplers (host-side numpy, float64).

A grid is a decreasing 1-D array ``t[0] > t[1] > ... > t[N] = 0`` of ``N + 1`` times in [0, 1]
(t = 1 is noise).  Grids are static: samplers turn them into constants, so they are numpy arrays.
"""

from __future__ import annotations

import math

import numpy as np

from awm_jax.deprecation import aliases as _deprecated_aliases


def shift_times(t, shift: float):
    """SD3 time shift ``t' = s t / (1 + (s - 1) t)`` (elementwise, numpy or jnp)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def dynamic_shift_times(t, mu: float):
    """FLUX resolution-dependent shift ``t' = e^mu / (e^mu + (1/t - 1))`` (t > 0; t = 0 stays 0)."""
    t = np.asarray(t, np.float64)
    out = np.zeros_like(t)
    pos = t > 0
    out[pos] = math.exp(mu) / (math.exp(mu) + (1.0 / t[pos] - 1.0))
    return out


def _check_steps(num_steps) -> int:
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    return int(num_steps)


def shifted_grid(num_steps: int, shift: float = 3.0, *, diffusers_exact: bool = True,
             num_train_timesteps: int = 1000) -> np.ndarray:
    """Shifted grid of ``num_steps + 1`` times ending at 0 (the SD3 / SD3.5 flow-matching schedule).

    ``diffusers_exact=True`` (default, what the public AWM / Flow-GRPO code samples with) reproduces
    ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps).sigmas``: the unshifted
    times are ``linspace(1, sigma_min, N)`` with ``sigma_min = shift(1 / num_train_timesteps)``, then
    shifted, then 0 appended.  ``diffusers_exact=False`` shifts the plain ``linspace(1, 0, N + 1)``.
    """
    n = _check_steps(num_steps)
    if diffusers_exact:
        sigma_min = float(shift_times(1.0 / num_train_timesteps, shift))
        base = np.linspace(1.0, sigma_min, n)
        return np.concatenate([shift_times(base, shift), [0.0]])
    return shift_times(np.linspace(1.0, 0.0, n + 1), shift)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX ``mu``: linear in the image token count (diffusers defaults)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(base_shift + slope * (image_seq_len - base_seq_len))


def flux_image_seq_len(latent_shape) -> int:
    """Image token count of FLUX for an unpacked latent ``(C, h, w)`` (2x2 packing)."""
    if len(latent_shape) != 3:
        raise ValueError(f"latent_shape must be (C, h, w), got {tuple(latent_shape)}")
    return (int(latent_shape[1]) // 2) * (int(latent_shape[2]) // 2)


def flux_grid(num_steps: int, image_seq_len: int | None = None, *, mu: float | None = None,
              **shift_kwargs) -> np.ndarray:
    """Dynamically shifted grid (FLUX pipeline): ``linspace(1, 1/N, N)`` shifted by ``mu``, then 0.

    Give either ``mu`` or ``image_seq_len`` (then ``mu = calculate_shift(image_seq_len, **shift_kwargs)``).
    """
    n = _check_steps(num_steps)
    if (mu is None) == (image_seq_len is None):
        raise ValueError("flux_grid needs exactly one of image_seq_len or mu")
    if mu is None:
        mu = calculate_shift(image_seq_len, **shift_kwargs)
    base = np.linspace(1.0, 1.0 / n, n)
    return np.concatenate([dynamic_shift_times(base, mu), [0.0]])


def awm_sa_solver_grid(grid) -> np.ndarray:
    """The AWM rollout tweaks of a grid: ``t[0] = 0.999`` and ``t[-2] = t[-3] / 2`` (needs >= 3 steps)."""
    g = np.array(grid, np.float64)
    if g.ndim != 1 or g.shape[0] < 4:
        raise ValueError(f"awm_sa_solver_grid needs a 1-D grid of >= 4 points, got shape {g.shape}")
    g[0] = 1.0 - 1e-3
    g[-2] = g[-3] / 2.0
    return g


def check_grid(grid, name: str = "grid") -> np.ndarray:
    """Validate a concrete, strictly decreasing grid in [0, 1]; returns it as float64 numpy."""
    try:
        g = np.asarray(grid, np.float64)
    except Exception as exc:  # a jax tracer cannot become numpy
        raise TypeError(f"{name} must be a concrete (numpy) array, not a traced value: {exc}") from exc
    if g.ndim != 1 or g.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with >= 2 points, got shape {g.shape}")
    if not (np.all(np.diff(g) < 0) and g[0] <= 1.0 and g[-1] >= 0.0):
        raise ValueError(f"{name} must be strictly decreasing within [0, 1], got {g}")
    return g


# deprecated aliases of names that moved (awm_jax/deprecation.py, CHANGELOG.md)
__getattr__ = _deprecated_aliases(__name__)
