"""CLIP image preprocessing in JAX, bit-exact with the PIL path of transformers' ``CLIPImageProcessor``.

``CLIPImageProcessor`` (its PIL backend, ``image_processing_backends.PilBackend._preprocess``; open_clip's
``image_transform`` does the same with torchvision's ``Resize`` on PIL images) resizes the shortest side to
``size`` with PIL's bicubic filter (``Image.resize``, no ``reducing_gap``), center-crops ``crop_size``,
rescales by 1/255 and normalises with ``image_mean`` / ``image_std``. PIL resamples uint8 images in two
separable passes (horizontal, then vertical; ``libImaging/Resample.c``), each a sum of taps with
fixed-point weights (22 fractional bits, rounded from the double-precision normalised bicubic kernel,
``a = -0.5``, support scaled by the reduction factor) and an 8-bit rounded, clipped result.

:func:`resample_matrix` computes exactly those integer weights on the host (numpy, double precision, the
same formulas); on the device each pass is a matmul of the uint8 pixels with the weights split into three
8-bit pieces: every product and partial sum is an integer below 2^24, so float32 accumulation (any matmul
precision: the operands are exact in bfloat16) is exact, and the pieces are recombined in int32, rounded
and clipped as PIL does.

Exactness (measured against Pillow 13.0, ``tests/test_rewards_device.py``): for square images (the trainer's
``resolution x resolution`` samples), downscaled or upscaled, the uint8 image equals PIL's bit for bit and
``pixel_values`` agree to the float rounding of the normalisation (max |diff| 2.4e-7). For non-square images
Pillow 13 chooses the order of the two passes by a rule this port does not reproduce (it always runs the
horizontal pass first, the order of ``Resample.c``); with the other order the 8-bit rounding (and
clipping of bicubic overshoot) of the intermediate image differs: measured max |diff| 0 levels on a smooth
48x80 gradient (the test bounds it by 1 level, ~0.015 in ``pixel_values``) and up to 24 levels on
uniform-noise images. The torchvision backend
of ``CLIPImageProcessor`` (used when torchvision is installed) resizes in float with antialiasing and is
not reproduced bit-exactly either.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax.rewards.base import RewardConfigError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISION_BITS = 32 - 8 - 2  # libImaging/Resample.c
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """The steps: shortest side -> ``size`` (bicubic), crop ``crop`` (h, w), normalise."""

    size: int = 224
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    rescale: float = 1 / 255

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> PreprocessSpec:
        """Read a CLIP processor folder's image-processor settings (``preprocessor_config.json``, or the
        ``image_processor`` entry of transformers 5's ``processor_config.json``); options this port does
        not implement (another resample filter, no resize / crop, a fixed (h, w) size) raise naming
        the file and key."""
        folder = pathlib.Path(path)
        cfg, p = None, folder / "preprocessor_config.json"
        try:
            if p.exists():
                cfg = json.loads(p.read_text())
            elif (folder / "processor_config.json").exists():
                p = folder / "processor_config.json"
                cfg = json.loads(p.read_text()).get("image_processor")
        except json.JSONDecodeError as e:
            raise RewardConfigError(f"{p}: invalid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise RewardConfigError(f"{folder}: no CLIP image-processor settings (preprocessor_config.json "
                                    "or processor_config.json with an 'image_processor' entry)")
        for key, want in (
            ("do_resize", True),
            ("do_center_crop", True),
            ("do_rescale", True),
            ("do_normalize", True),
            ("resample", BICUBIC),
        ):
            if cfg.get(key, want) != want:
                raise RewardConfigError(
                    f"{p}: {key}={cfg[key]!r} is not supported on the accelerator (only {want!r})"
                )
        size, crop = cfg.get("size", {"shortest_edge": 224}), cfg.get("crop_size", 224)
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if not isinstance(size, dict) or set(size) != {"shortest_edge"}:
            raise RewardConfigError(f"{p}: size={size!r}: only {{'shortest_edge': N}} is supported")
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        return cls(
            size=int(size["shortest_edge"]),
            crop=(int(crop["height"]), int(crop["width"])),
            mean=tuple(float(x) for x in cfg.get("image_mean", OPENAI_MEAN)),
            std=tuple(float(x) for x in cfg.get("image_std", OPENAI_STD)),
            rescale=float(cfg.get("rescale_factor", 1 / 255)),
        )


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=32)
def resample_matrix(in_size: int, out_size: int) -> np.ndarray:
    """PIL's fixed-point bicubic weights ``(in_size, out_size)`` int64 (``precompute_coeffs`` +
    ``normalize_coeffs_8bpc`` of ``libImaging/Resample.c``, full-image box)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    w = np.zeros((in_size, out_size), np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        k = np.array([_bicubic((x - center + 0.5) / filterscale) for x in range(xmin, xmax)], np.float64)
        total = k.sum()
        if total != 0:
            k = k / total
        one = float(1 << PRECISION_BITS)
        w[xmin:xmax, xx] = [math.trunc(v * one - 0.5) if v < 0 else math.trunc(v * one + 0.5) for v in k]
    return w


def _resample_axis(x: jax.Array, weights: np.ndarray, axis: int) -> jax.Array:
    """One PIL pass along ``axis`` of a uint8-valued int32 image batch: exact integer arithmetic."""
    w = weights.astype(np.int64)
    pieces = [(w >> 16), (w >> 8) & 0xFF, w & 0xFF]  # w = p0 * 2^16 + p1 * 2^8 + p2 (p0 signed)
    xf = jnp.moveaxis(x, axis, -1).astype(jnp.float32)
    sums = [
        jnp.dot(xf, jnp.asarray(p, jnp.float32), precision=jax.lax.Precision.HIGHEST).astype(jnp.int32)
        for p in pieces
    ]
    acc = (sums[0] << 16) + (sums[1] << 8) + sums[2] + (1 << (PRECISION_BITS - 1))
    out = jnp.clip(acc >> PRECISION_BITS, 0, 255)
    return jnp.moveaxis(out, -1, axis)


def resize_shortest(images: jax.Array, size: int) -> jax.Array:
    """uint8 ``(B, H, W, 3)`` -> int32 (values 0..255) with the shortest side ``size``, as PIL bicubic."""
    h, w = images.shape[1:3]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    nh, nw = (new_long, size) if w <= h else (size, new_long)
    x = images.astype(jnp.int32)
    if nw != w:  # PIL: horizontal pass first, then vertical; a pass is skipped when its size is unchanged
        x = _resample_axis(x, resample_matrix(w, nw), axis=2)
    if nh != h:
        x = _resample_axis(x, resample_matrix(h, nh), axis=1)
    return x


def clip_preprocess(images: jax.Array, spec: PreprocessSpec) -> jax.Array:
    """uint8 ``(B, H, W, 3)`` -> CLIP ``pixel_values`` float32 ``(B, 3, crop_h, crop_w)`` (jittable)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"clip_preprocess: images must be (B, H, W, 3), got shape {images.shape}")
    x = resize_shortest(images, spec.size)
    (ch, cw), (h, w) = spec.crop, x.shape[1:3]
    if ch > h or cw > w:
        raise ValueError(f"clip_preprocess: crop {spec.crop} is larger than the resized image {(h, w)}")
    top, left = (h - ch) // 2, (w - cw) // 2
    x = x[:, top : top + ch, left : left + cw].astype(jnp.float32) * np.float32(spec.rescale)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return jnp.transpose(x, (0, 3, 1, 2))
