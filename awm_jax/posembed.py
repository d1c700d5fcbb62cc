"""Fixed sin-cos position tables (host numpy, float64 maths), shared by the models and the converters.

:func:`sincos_2d_table` is diffusers' ``get_2d_sincos_pos_embed``: SD3's ``pos_embed.pos_embed`` buffer is
this table, which the Flax model recomputes and the converters write back into diffusers folders.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["sincos_2d_table"]


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    if dim % 2:
        raise ValueError(f"sincos position embedding: dim must be even, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=32)
def sincos_2d_table(embed_dim: int, grid_h: int, grid_w: int, base_size: float,
                    interpolation_scale: float = 1.0) -> np.ndarray:
    """diffusers ``get_2d_sincos_pos_embed(embed_dim, (grid_h, grid_w), base_size=...)`` as float32 numpy.

    Rows are positions in row-major ``(h, w)`` order; the first half of the features encodes the
    column (w) coordinate and the second half the row (h) coordinate, exactly as diffusers lays it out.
    """
    if embed_dim % 2:
        raise ValueError(f"sincos_2d_table: embed_dim must be even, got {embed_dim}")
    isc = np.float32(interpolation_scale)
    gh = np.arange(grid_h, dtype=np.float32) / np.float32(grid_h / base_size) / isc
    gw = np.arange(grid_w, dtype=np.float32) / np.float32(grid_w / base_size) / isc
    ww, hh = np.meshgrid(gw, gh, indexing="xy")  # both (grid_h, grid_w)
    emb = np.concatenate([_sincos_1d(embed_dim // 2, ww), _sincos_1d(embed_dim // 2, hh)], axis=1)
    out = emb.astype(np.float32)
    out.setflags(write=False)
    return out
