"""Deterministic detector for the toy shapes world.

Pipeline per image: every pixel is assigned to the nearest palette colour (or background when
the background is nearer or the colour is too far from every palette entry); connected
components (4-connectivity) of each colour are objects; each component is classified by its
fill ratio (area / bounding-box area: square ~1, circle ~0.79, triangle ~0.5).

Detections use the format shared with the GenEval rules
(``awm_jax.toy.reward``): ``{class_name: [{"box": (x0, y0, x1, y1), "score": float,
"color": str, "centroid": (x, y), "area": int}, ...]}`` with boxes in pixels, x1/y1 exclusive.
"""

from __future__ import annotations

import numpy as np

from awm_jax.toy.shapes import BACKGROUND, CLASSES, COLORS

MIN_AREA = 6  # components smaller than this are noise
MAX_COLOR_DIST = 110.0  # pixels farther than this from every palette colour count as background
SQUARE_MIN_FILL = 0.93
CIRCLE_MIN_FILL = 0.69

_PALETTE = np.array([BACKGROUND] + list(COLORS.values()), np.float32)
_NAMES = ["background"] + list(COLORS)


def color_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) int labels: 0 background, k >= 1 the k-th palette colour of ``COLORS``."""
    img = np.asarray(image, np.float32)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"toy detector expects (H, W, 3) images, got shape {img.shape}")
    d = np.linalg.norm(img[:, :, None, :] - _PALETTE[None, None], axis=-1)
    lab = d.argmin(-1)
    lab[d.min(-1) > MAX_COLOR_DIST] = 0
    return lab


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask as arrays of (y, x) pixel coordinates."""
    h, w = mask.shape
    seen = np.zeros_like(mask, bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        comps.append(np.array(pix))
    return comps


def classify_shape(pix: np.ndarray) -> tuple[str, float]:
    """(class, fill ratio) of one component given its (y, x) pixels."""
    y0, x0 = pix.min(0)
    y1, x1 = pix.max(0) + 1
    fill = len(pix) / float((y1 - y0) * (x1 - x0))
    if fill >= SQUARE_MIN_FILL:
        return "square", fill
    if fill >= CIRCLE_MIN_FILL:
        return "circle", fill
    return "triangle", fill


def detect(image: np.ndarray, min_area: int = MIN_AREA) -> dict[str, list[dict]]:
    """Detections of one (H, W, 3) uint8 image, grouped by class (every class key present)."""
    lab = color_labels(image)
    out: dict[str, list[dict]] = {c: [] for c in CLASSES}
    for k in range(1, len(_NAMES)):
        for pix in connected_components(lab == k):
            if len(pix) < min_area:
                continue
            cls, _ = classify_shape(pix)
            y0, x0 = pix.min(0)
            y1, x1 = pix.max(0) + 1
            cy, cx = pix.mean(0)
            out[cls].append(
                {
                    "box": (int(x0), int(y0), int(x1), int(y1)),
                    "score": 1.0,
                    "color": _NAMES[k],
                    "centroid": (float(cx), float(cy)),
                    "area": int(len(pix)),
                }
            )
    for c in CLASSES:
        out[c].sort(key=lambda d: (d["box"][0], d["box"][1]))
    return out


def detect_batch(images: np.ndarray) -> list[dict[str, list[dict]]]:
    """``detect`` over a (B, H, W, 3) batch."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"toy detector expects (B, H, W, 3) batches, got shape {images.shape}")
    return [detect(im) for im in images]
