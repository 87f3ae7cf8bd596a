"""Box geometry in numpy: conversions, IoU and class-aware non-maximum suppression.

Boxes are (N, 4) float arrays. `xyxy` is (x0, y0, x1, y1); `cxcywh` is (centre x, centre y,
width, height). Both pipelines that plan layouts (RADM, PlanNet) work on normalized canvas
coordinates in [0, 1] and convert to pixels only at the end.
"""

from __future__ import annotations

import numpy as np


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    cx, cy, w, h = np.moveaxis(b, -1, 0)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_cxcywh(b: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = np.moveaxis(b, -1, 0)
    return np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def area(b: np.ndarray) -> np.ndarray:
    """(...,) areas of (..., 4) xyxy boxes; inverted boxes count as empty."""
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection areas of (N, 4) and (M, 4) xyxy boxes."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(hi - lo, 0, None)
    return wh[..., 0] * wh[..., 1]


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union; 0 where both boxes are empty."""
    inter = intersection(a, b)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter, dtype=np.float64), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-aware greedy NMS: indices of the kept boxes, highest score first.

    A box is dropped when a higher-scored box of the same class overlaps it with IoU strictly
    above `iou_threshold` (torchvision's `batched_nms` rule). Ties in score keep the lower index.
    """
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))
    overlaps = iou(boxes, boxes)
    same = classes[:, None] == classes[None, :]
    suppressed = np.zeros(len(scores), dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= same[i] & (overlaps[i] > iou_threshold)
    return np.array(keep, dtype=np.int64)


def to_pixels(b: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalized xyxy -> integer pixel xyxy, clipped to the canvas, at least one pixel wide."""
    scaled = np.asarray(b, dtype=np.float64) * np.array([width, height, width, height])
    px = np.rint(scaled).astype(np.int64)
    px[..., [0, 2]] = np.clip(px[..., [0, 2]], 0, width)
    px[..., [1, 3]] = np.clip(px[..., [1, 3]], 0, height)
    px[..., 2] = np.maximum(px[..., 2], np.minimum(px[..., 0] + 1, width))
    px[..., 0] = np.minimum(px[..., 0], px[..., 2] - 1)
    px[..., 3] = np.maximum(px[..., 3], np.minimum(px[..., 1] + 1, height))
    px[..., 1] = np.minimum(px[..., 1], px[..., 3] - 1)
    return px
