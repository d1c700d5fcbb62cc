"""JPEG (in)compressibility rewards (DDPO / Flow-GRPO): file size of the image saved as JPEG.

``jpeg_incompressibility = kB / 500`` and ``jpeg_compressibility = -kB / 500`` with
``kB = bytes / 1000`` at PIL JPEG ``quality`` (95 by default).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from awm_jax.rewards.base import RewardConfigError, check_batch


def jpeg_kilobytes(images: np.ndarray, quality: int = 95) -> np.ndarray:
    """Size in kB (1000 bytes) of each uint8 (B,H,W,3) image encoded as JPEG at ``quality``."""
    out = np.empty(len(images), np.float64)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out[i] = buf.tell() / 1000.0
    return out


class JpegIncompressibility:
    """``r = kB / scale`` (larger files score higher)."""

    sign = 1.0

    def __init__(self, quality: int = 95, scale: float = 500.0):
        if not 1 <= int(quality) <= 100:
            raise RewardConfigError(f"jpeg: quality must be in 1..100, got {quality!r}")
        if not float(scale) > 0:
            raise RewardConfigError(f"jpeg: scale must be > 0, got {scale!r}")
        self.quality, self.scale = int(quality), float(scale)

    def __call__(self, images, prompts, metadata=None) -> np.ndarray:
        """Score a batch; see the module docstring."""
        images, _, _ = check_batch(images, prompts, metadata, type(self).__name__)
        return (self.sign * jpeg_kilobytes(images, self.quality) / self.scale).astype(np.float32)


class JpegCompressibility(JpegIncompressibility):
    """``r = -kB / scale`` (smaller files score higher)."""

    sign = -1.0
