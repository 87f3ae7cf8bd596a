"""Layout quality metrics after PKU PosterLayout (Hsu et al., CVPR 2023, `eval.py` of
PKU-ICST-MIPL/PosterLayout-CVPR2023), numpy only. RADM (liuan0803/RADM, `metrics.py`) reports
differently defined R_ove, R_ali and R_und; of those only one choice is taken here, which classes
overlap counts (see below), and none of their formulas.

A layout is N boxes (pixel x0, y0, x1, y1 on a canvas of w x h) with classes from
`LAYOUT_CLASSES` (runtime/specs/layout.py). Boxes are clipped to the canvas first. An element
is valid when its clipped area is at least 0.1% of the canvas; every metric but validity uses
only valid elements. "Content" elements are text and logo: PosterLayout's classes are text,
logo and underlay, and its overlap and underlay metrics use the non-underlay ones;
embellishments are left out of those two as RADM's R_ove leaves them out (decorations may
overlap by design).

    validity        Val = #valid / #elements                                        (higher better)
    overlap         Ove = sum_{i<j} IoU(b_i, b_j) / n, over the n content elements    (lower better)
    alignment       Ali = sum_i g(min_{c, j!=i} |c_i - c_j|), g(x) = -log10(1 - x),
                    c over the 6 coordinates left, x-centre, right (/ w), top, y-centre,
                    bottom (/ h), over all valid elements                           (lower better)
    underlay_loose  Und_L = mean_u max_k |u & b_k| / |b_k|, u underlays, b_k content (higher better)
    underlay_strict Und_S = mean_u [some content b_k lies inside u]                 (higher better)
    occlusion       Occ = mean of the product mask over the union of element pixels  (lower better)
    utility         Uti = sum((1 - mask) * covered) / sum(1 - mask)                  (higher better)

Deviations from the released PosterLayout code, each on purpose:

* Every metric works on boxes clipped to the canvas, overlap included: the released code
  takes the raw boxes, so a box reaching past the canvas counts its outside part there.
* Ali is summed over the elements (as PosterLayout's paper and code), not averaged per element
  as RALF reports it, nor RADM's R_ali (the per-element min of separate x and y gaps, natural
  log, averaged per layout): compare Ali only with PosterLayout's numbers.
* Ove is PosterLayout's (pairwise IoU summed over i < j, divided by n), not RADM's R_ove (the
  intersection over one box's own area, averaged over ordered pairs).
* Occ and Uti use the product mask (where the product was placed) in place of the saliency
  map (the max of two saliency detectors); a float mask in [0, 1] works as a saliency map.
  With no mask, the product is taken as absent: Occ = 0 and Uti = covered share of canvas.
* Ali follows the paper's per-element definition: the released loop over elements ignores
  its index and adds n times g of the smallest gap of any pair. Like the released code it
  sums over elements (so it grows with n) and uses log base 10.
* Und_S tests real containment: the released `is_contain` compares `xr_2 >= xr_2`, so it
  never checks the right edge.
* Empty cases are defined instead of dividing by zero: validity of no elements is 0; Ove
  with no content element, Ali with fewer than 2 elements, Occ with nothing covered and
  Uti with no free canvas are 0; Und_L / Und_S average over the layouts that have an
  underlay and are 0 when none has (as the released code returns).

Over several layouts (`metrics_for_layouts`), validity pools the elements of all layouts,
underlay metrics average over layouts with an underlay, and the rest average per layout, as
PosterLayout reports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from runtime.errors import InputError
from runtime.layout.boxes import area, intersection, iou
from runtime.specs.layout import LAYOUT_CLASSES

__all__ = ["METRIC_NAMES", "MIN_AREA_FRACTION", "layout_metrics", "metrics_for_layouts"]

CONTENT_CLASSES = ("logo", "text")
MIN_AREA_FRACTION = 0.001
METRIC_NAMES = ("validity", "overlap", "alignment", "underlay_loose", "underlay_strict", "occlusion", "utility")


@dataclass(frozen=True)
class _Scores:
    n_elements: int
    n_valid: int
    overlap: float
    alignment: float
    underlay_loose: float | None  # None: the layout has no underlay
    underlay_strict: float | None
    occlusion: float
    utility: float


def _overlap(content: np.ndarray) -> float:
    n = len(content)
    if n == 0:
        return 0.0
    return float(np.triu(iou(content, content), k=1).sum() / n)


def _alignment(boxes: np.ndarray, width: int, height: int) -> float:
    n = len(boxes)
    if n < 2:
        return 0.0
    x0, y0, x1, y1 = boxes[:, 0] / width, boxes[:, 1] / height, boxes[:, 2] / width, boxes[:, 3] / height
    coords = np.stack([x0, (x0 + x1) / 2, x1, y0, (y0 + y1) / 2, y1], axis=1)  # (n, 6)
    gaps = np.abs(coords[:, None, :] - coords[None, :, :])  # (n, n, 6)
    gaps[np.arange(n), np.arange(n)] = np.inf  # an element is not aligned with itself
    nearest = np.clip(gaps.min(axis=(1, 2)), 0.0, 1.0 - 1e-9)  # (n,); 1 would be log(0)
    return float(np.sum(-np.log10(1.0 - nearest)))


def _underlay(underlays: np.ndarray, content: np.ndarray) -> tuple[float | None, float | None]:
    if len(underlays) == 0:
        return None, None
    if len(content) == 0:
        return 0.0, 0.0
    inter = intersection(underlays, content)  # (U, K)
    areas = area(content)
    share = np.divide(inter, areas[None, :], out=np.zeros_like(inter), where=areas[None, :] > 0)
    inside = (
        (underlays[:, None, 0] <= content[None, :, 0])
        & (underlays[:, None, 1] <= content[None, :, 1])
        & (underlays[:, None, 2] >= content[None, :, 2])
        & (underlays[:, None, 3] >= content[None, :, 3])
    )  # (U, K)
    return float(share.max(axis=1).mean()), float(inside.any(axis=1).mean())


def _coverage(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(h, w) float mask, 1 where any box covers the pixel (boxes rounded to whole pixels)."""
    covered = np.zeros((height, width), dtype=np.float64)
    for x0, y0, x1, y1 in np.round(boxes).astype(np.int64):
        covered[y0:y1, x0:x1] = 1.0
    return covered


def _check_layout(boxes: object, classes: Sequence[str], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.all(np.isfinite(boxes)):
        raise InputError("boxes", "expected an (N, 4) array of finite pixel x0, y0, x1, y1", boxes.shape)
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        raise InputError("boxes", "expected x1 >= x0 and y1 >= y0", boxes.tolist())
    if len(classes) != len(boxes):
        raise InputError("classes", f"expected one class per box ({len(boxes)} boxes)", len(classes))
    unknown = [c for c in classes if c not in LAYOUT_CLASSES]
    if unknown:
        raise InputError("classes", f"expected names from {LAYOUT_CLASSES}", unknown[0])
    clipped = np.clip(boxes, 0, [width, height, width, height])
    return clipped, np.asarray(classes, dtype=object)


def _check_mask(mask: np.ndarray | None, width: int, height: int) -> np.ndarray:
    if mask is None:
        return np.zeros((height, width), dtype=np.float64)
    mask = np.asarray(mask)
    if mask.shape != (height, width):
        raise InputError("product_mask", f"expected shape (h, w) = ({height}, {width})", mask.shape)
    mask = mask.astype(np.float64)
    if not np.all((mask >= 0) & (mask <= 1)):
        raise InputError("product_mask", "expected a bool mask or values in [0, 1]")
    return mask


def _score(boxes: np.ndarray, classes: np.ndarray, width: int, height: int, mask: np.ndarray) -> _Scores:
    valid = area(boxes) >= MIN_AREA_FRACTION * width * height
    boxes, classes = boxes[valid], classes[valid]
    content = boxes[np.isin(classes, CONTENT_CLASSES)]
    loose, strict = _underlay(boxes[classes == "underlay"], content)
    covered = _coverage(boxes, width, height)
    covered_area = covered.sum()
    free = (1.0 - mask).sum()
    return _Scores(
        n_elements=len(valid),
        n_valid=int(valid.sum()),
        overlap=_overlap(content),
        alignment=_alignment(boxes, width, height),
        underlay_loose=loose,
        underlay_strict=strict,
        occlusion=float((mask * covered).sum() / covered_area) if covered_area > 0 else 0.0,
        utility=float(((1.0 - mask) * covered).sum() / free) if free > 0 else 0.0,
    )


def _check_canvas(canvas: tuple[int, int]) -> tuple[int, int]:
    if len(canvas) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in canvas):
        raise InputError("canvas", "expected positive integer (w, h)", canvas)
    return int(canvas[0]), int(canvas[1])


def metrics_for_layouts(
    layouts: Sequence[tuple[np.ndarray, Sequence[str]]],
    canvas: tuple[int, int],
    product_masks: Sequence[np.ndarray | None] | None = None,
) -> dict[str, float]:
    """The metrics over several layouts on canvases of the same size (see the module docstring).

    layouts: (boxes (N_i, 4) pixel xyxy, classes (N_i,) names). canvas: (w, h).
    product_masks: one (h, w) mask (or None) per layout, or None for no product anywhere.
    """
    width, height = _check_canvas(canvas)
    if product_masks is None:
        product_masks = [None] * len(layouts)
    if len(product_masks) != len(layouts):
        raise InputError("product_masks", f"expected one mask per layout ({len(layouts)} layouts)", len(product_masks))
    scores = [
        _score(*_check_layout(boxes, classes, width, height), width, height, _check_mask(mask, width, height))
        for (boxes, classes), mask in zip(layouts, product_masks)
    ]
    if not scores:
        return {name: 0.0 for name in METRIC_NAMES}
    n_elements = sum(s.n_elements for s in scores)
    with_underlay = [s for s in scores if s.underlay_loose is not None]
    return {
        "validity": sum(s.n_valid for s in scores) / n_elements if n_elements else 0.0,
        "overlap": float(np.mean([s.overlap for s in scores])),
        "alignment": float(np.mean([s.alignment for s in scores])),
        "underlay_loose": float(np.mean([s.underlay_loose for s in with_underlay])) if with_underlay else 0.0,
        "underlay_strict": float(np.mean([s.underlay_strict for s in with_underlay])) if with_underlay else 0.0,
        "occlusion": float(np.mean([s.occlusion for s in scores])),
        "utility": float(np.mean([s.utility for s in scores])),
    }


def layout_metrics(
    boxes: np.ndarray,
    classes: Sequence[str],
    canvas: tuple[int, int],
    product_mask: np.ndarray | None = None,
) -> dict[str, float]:
    """The metrics of one layout: boxes (N, 4) pixel xyxy, classes (N,) from `LAYOUT_CLASSES`,
    canvas (w, h), product_mask (h, w) bool or [0, 1] float, None for no product."""
    return metrics_for_layouts([(boxes, classes)], canvas, [product_mask])
