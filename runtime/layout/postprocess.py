"""RADM's post-processing of a sampled layout and the repairs of a planned one, in numpy.

`select_elements` (RADM): top-k over (box, class) pairs, class-aware NMS at IoU 0.15, score >
0.25; the selling points take the best-scored text boxes in reading order (top to bottom, then
left to right), then the next text boxes that passed NMS, then the best remaining text-class
slots (those marked `below_threshold`). Planned boxes that overlap a user-fixed one (IoU above
the NMS threshold, same class, or any two classes neither of which is an underlay) are dropped.

Repairs of a planned text box (the poster's PlanNet boxes): `grow_box` to a legible size,
`move_off_product` to where it covers the least of the product.

`scored_layout` attaches the layout metrics (runtime/layout/metrics.py); `layout_report` is
its part of a pipeline's report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from runtime.errors import InputError
from runtime.inputs.images import Product
from runtime.layout.boxes import area, iou, nms, to_pixels
from runtime.layout.elements import TEXT_CLASS, Element, FixedBox
from runtime.layout.metrics import layout_metrics
from runtime.specs.layout import LAYOUT_CLASSES, NMS_IOU, SCORE_THRESHOLD

UNDERLAY = LAYOUT_CLASSES.index("underlay")
MIN_BOX_FRACTION = (0.25, 0.06)  # a planned text box is at least this share of the canvas width, height


@dataclass
class Layout:
    elements: list[Element]
    metrics: dict[str, float]
    unused_text_boxes: int = 0


def scored_layout(elements: list[Element], product: Product, unused_text_boxes: int = 0) -> Layout:
    """The elements with their layout metrics on the product's canvas."""
    metrics = layout_metrics(
        np.array([e.box for e in elements], dtype=np.float64).reshape(-1, 4),
        [e.class_name for e in elements], (product.width, product.height), product.mask,
    )
    return Layout(elements, metrics, unused_text_boxes)


def layout_report(layout: Layout, texts: Sequence[str], fixed_path: str | None) -> dict:
    return {
        "classes": list(LAYOUT_CLASSES),
        "elements": [e.to_dict(texts) for e in layout.elements],
        "metrics": layout.metrics,
        "unused_text_boxes": layout.unused_text_boxes,
        "fixed_from": fixed_path,
    }


def select_elements(
    boxes: np.ndarray,
    logits: np.ndarray,
    fixed: Sequence[FixedBox],
    n_texts: int,
    width: int,
    height: int,
    iou_threshold: float = NMS_IOU,
    score_threshold: float = SCORE_THRESHOLD,
    earlier: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    drop_empty: bool = False,
) -> tuple[list[Element], int]:
    """RADM's post-processing for one canvas, plus the selling-point assignment (module docstring).

    `boxes` (N, 4) normalized xyxy and `logits` (N, C), the first len(fixed) slots the fixed
    boxes. `earlier`: the earlier steps' (boxes, logits), whose top-k candidates join this step's
    before NMS (RADM's multi-step merge). `drop_empty`: a candidate left with no area once
    clipped to the canvas is dropped (RADM's order: NMS on raw boxes, then clip, then drop empty;
    otherwise it is kept at the edge, one pixel wide). Returns the elements (fixed first, then
    planned by score) and how many confident text boxes were left without a selling point."""
    k = len(fixed)
    scores = _sigmoid(logits[k:])  # (N - k, C)
    slot, cls, cand_scores = _top_k(scores)
    cand_boxes = boxes[k + slot]
    for step_boxes, step_logits in earlier:
        _, step_cls, step_scores = step = _top_k(_sigmoid(step_logits[k:]))
        cand_boxes = np.concatenate([cand_boxes, step_boxes[k + step[0]]])
        cls, cand_scores = np.concatenate([cls, step_cls]), np.concatenate([cand_scores, step_scores])
    keep = nms(cand_boxes, cand_scores, cls, iou_threshold)
    if drop_empty:
        keep = keep[area(np.clip(cand_boxes[keep], 0.0, 1.0)) > 0]
    if k:
        fixed_boxes = np.stack([f.normalized(width, height) for f in fixed])
        fixed_cls = np.array([LAYOUT_CLASSES.index(f.class_name) for f in fixed])
        kc = cls[keep][:, None]
        related = (kc == fixed_cls[None]) | ((kc != UNDERLAY) & (fixed_cls[None] != UNDERLAY))
        keep = keep[~((iou(cand_boxes[keep], fixed_boxes) > iou_threshold) & related).any(1)]
    confident = keep[cand_scores[keep] > score_threshold]

    held = {f.text for f in fixed if f.text is not None}
    free_texts = [t for t in range(n_texts) if t not in held]
    text_picks = [int(i) for i in confident if cls[i] == TEXT_CLASS][: len(free_texts)]
    below = [int(i) for i in keep if cls[i] == TEXT_CLASS and int(i) not in text_picks and cand_scores[i] <= score_threshold]
    picks_below = below[: len(free_texts) - len(text_picks)]
    taken = [cand_boxes[i] for i in text_picks + picks_below] + [f.normalized(width, height) for f in fixed]
    used = {int(slot[i]) for i in text_picks + picks_below if i < len(slot)}  # this step's slots (not earlier steps')
    spare = _spare_slots(boxes[k:], scores[:, TEXT_CLASS], used, taken,
                         len(free_texts) - len(text_picks) - len(picks_below), iou_threshold)
    if len(text_picks) + len(picks_below) + len(spare) < len(free_texts):
        raise InputError("text", f"expected at most {len(scores)} selling points besides the fixed boxes", len(free_texts))

    text_boxes = [(to_pixels(cand_boxes[i], width, height), cand_scores[i], False) for i in text_picks]
    text_boxes += [(to_pixels(cand_boxes[i], width, height), cand_scores[i], True) for i in picks_below]
    text_boxes += [(to_pixels(boxes[k + s], width, height), scores[s, TEXT_CLASS], True) for s in spare]
    text_boxes.sort(key=lambda item: (int(item[0][1]), int(item[0][0])))  # reading order
    elements = [Element(f.class_name, f.box, 1.0, f.text, fixed=True) for f in fixed]
    elements += [
        Element("text", tuple(int(v) for v in box), float(score), t, below_threshold=below_thr)
        for (box, score, below_thr), t in zip(text_boxes, free_texts)
    ]
    for i in confident:
        if cls[i] != TEXT_CLASS:
            px = to_pixels(cand_boxes[i], width, height)
            elements.append(Element(LAYOUT_CLASSES[cls[i]], tuple(int(v) for v in px), float(cand_scores[i])))
    unused = sum(1 for i in confident if cls[i] == TEXT_CLASS) - len(text_picks)
    return elements, unused


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-logits.astype(np.float64)))


def _top_k(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k over (slot, class) pairs of (N, C) scores, k = N (ties: lower index first): the
    pairs' slots, classes and scores."""
    order = np.lexsort((np.arange(scores.size), -scores.ravel()))[: len(scores)]
    slot, cls = np.divmod(order, scores.shape[1])
    return slot, cls, scores.ravel()[order]


def _spare_slots(
    boxes: np.ndarray, text_scores: np.ndarray, used: set[int], taken: list[np.ndarray], wanted: int, iou_threshold: float
) -> list[int]:
    """The best text-scored free slots for selling points still without a box: first those that
    overlap no box already taken (above the NMS threshold), then, only if that is not enough, any."""
    order = [int(s) for s in np.argsort(-text_scores, kind="stable") if int(s) not in used]
    picked: list[int] = []
    for s in order:
        if len(picked) == wanted:
            return picked
        others = np.array(taken + [boxes[p] for p in picked]).reshape(-1, 4)
        if not len(others) or iou(boxes[s : s + 1], others).max() <= iou_threshold:
            picked.append(s)
    return picked + [s for s in order if s not in picked][: wanted - len(picked)]


def grow_box(box: np.ndarray, width: int, height: int) -> tuple[np.ndarray, bool]:
    """A pixel box grown around its centre to at least MIN_BOX_FRACTION of the canvas, kept inside it."""
    min_w = max(int(round(MIN_BOX_FRACTION[0] * width)), 1)
    min_h = max(int(round(MIN_BOX_FRACTION[1] * height)), 1)
    x0, y0, x1, y1 = (int(v) for v in box)
    grown = False
    for lo, hi, least, side in ((0, 2, min_w, width), (1, 3, min_h, height)):
        a, b = (x0, x1) if lo == 0 else (y0, y1)
        if b - a < least:
            grown = True
            centre = (a + b) / 2
            a = int(round(min(max(centre - least / 2, 0), side - least)))
            b = a + least
        if lo == 0:
            x0, x1 = a, b
        else:
            y0, y1 = a, b
    return np.array([x0, y0, x1, y1]), grown


def move_off_product(box: Sequence[int], mask: np.ndarray, tolerance: float = 0.1, stride: int = 2) -> tuple[tuple[int, int, int, int], bool]:
    """A pixel box slid to where it covers the least of the product (`mask` (H, W) bool), the
    nearest such place first; unchanged when it covers at most `tolerance` of its area already."""
    x0, y0, x1, y1 = (int(v) for v in box)
    w, h = x1 - x0, y1 - y0
    H, W = mask.shape
    table = np.zeros((H + 1, W + 1), dtype=np.int64)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)  # summed-area table

    def covered(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return table[y + h, x + w] - table[y, x + w] - table[y + h, x] + table[y, x]

    if covered(np.array(x0), np.array(y0)) <= tolerance * w * h:
        return (x0, y0, x1, y1), False
    xs = np.unique(np.append(np.arange(0, W - w + 1, stride), [x0, W - w]))
    ys = np.unique(np.append(np.arange(0, H - h + 1, stride), [y0, H - h]))
    gx, gy = np.meshgrid(xs, ys)
    cost = covered(gx, gy)
    distance = (gx - x0) ** 2 + (gy - y0) ** 2
    best = np.lexsort((distance.ravel(), cost.ravel()))[0]
    nx, ny = int(gx.ravel()[best]), int(gy.ravel()[best])
    return (nx, ny, nx + w, ny + h), True
