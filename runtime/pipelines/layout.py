"""The layout pipeline (RADM, CIKM 2023), read top to bottom. Architecture: networks/layout/__init__.py.

Per request, ONCE: each selling point through the text encoder (its pooled end-of-text vector),
and the canvas (the product placed on grey, resized so its long side is the preset's
`layout.image_side`, sides multiples of 32) through the ResNet-50 + FPN backbone. Then
`layout_steps` calls of the cascaded box head (the reference: one DDIM step from t = 999),
sampling with DiffusionDet's box diffusion (runtime/diffusion/boxes.py, box renewal on), and the
post-processing in numpy: top-k over (box, class) pairs, class-aware NMS at IoU 0.15, score >
0.25.

Selling points get the text boxes: the best-scored text boxes, as many as there are texts not
already held by a fixed box, in reading order (top to bottom, then left to right). When fewer
confident text boxes survive than there are texts, the next text boxes that pass NMS are used,
then the best remaining text-class slots; those are marked `below_threshold` in the report.

`--layout-fixed` boxes occupy the first slots, hold the user's box at every step and come out
exactly as given; planned boxes that overlap one (IoU above the NMS threshold, same class, or
any two classes neither of which is an underlay) are dropped, so the rest is planned around them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from runtime.artifacts.weights import WeightsSource
from runtime.backends.base import Component
from runtime.diffusion.boxes import FixedBoxes, sample_boxes, time_pairs
from runtime.errors import InputError
from runtime.inputs.images import MAX_IMAGE_PIXELS, Placement, Product, to_model_image
from runtime.inputs.tokenizer import Tokenizer, load_tokenizer
from runtime.layout.boxes import iou, nms, to_pixels
from runtime.layout.elements import (
    LAYOUT_CLASSES,
    TEXT_CLASS,
    Element,
    FixedBox,
    check_texts,
    draw_layout,
    load_fixed_boxes,
)
from runtime.layout.metrics import layout_metrics
from runtime.pipelines.base import Call, GenerateResult, PipelineDefinition, StepCallback
from runtime.pipelines.common import (
    check_batch,
    check_seed,
    placed_product,
    placement_dict,
    product_only,
    require_components,
    run_cast,
    selling_point_features,
)
from runtime.presets import Preset
from runtime.specs.core import ComponentSpec, Precision
from runtime.specs.layout import FPN_LEVELS, NMS_IOU, SCORE_THRESHOLD, layout_image_size, layout_specs
from runtime.timing import StageTimer

COMPONENTS = ("text_encoder", "layout_backbone", "layout_head")
DEFAULT_LAYOUT_STEPS = 1  # RADM's reference sampling
UNDERLAY = LAYOUT_CLASSES.index("underlay")


@dataclass(frozen=True)
class LayoutRequest:
    """One canvas to plan: the product placed on it, the selling points, boxes the user fixed."""

    product: Product
    texts: tuple[str, ...]
    fixed: tuple[FixedBox, ...] = ()
    seed: int = 0

    def validate(self) -> None:
        check_texts(self.texts)
        check_seed(self.seed)


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


@dataclass
class LayoutOutput:
    layouts: list[Layout]
    timings: dict[str, object] = field(default_factory=dict)


class LayoutPipeline:
    def __init__(self, components: Mapping[str, Component], preset: Preset, tokenizer: Tokenizer):
        require_components(components, COMPONENTS, "layout")
        self.components = components
        self.preset = preset
        self.tokenizer = tokenizer

    def __call__(
        self, requests: Sequence[LayoutRequest], steps: int = DEFAULT_LAYOUT_STEPS, on_step: StepCallback | None = None
    ) -> LayoutOutput:
        check_batch(requests, steps, self.preset)
        timer = StageTimer()
        slots = self.preset.layout.num_boxes
        with timer.stage("total"):
            with timer.stage("text_encode"):
                features, text_mask = selling_point_features(
                    self.components["text_encoder"], self.tokenizer, [r.texts for r in requests], self.preset.max_batch
                )
            with timer.stage("layout_backbone"):
                pyramid = run_cast(self.components["layout_backbone"], {"image": self._backbone_images(requests)})
            invariant = {**{level: pyramid[level] for level in FPN_LEVELS}, "text_features": features, "text_mask": text_mask}
            head = self.components["layout_head"]

            def predict(x: np.ndarray, t: np.ndarray):
                with timer.stage("layout_step", repeated=True):
                    out = run_cast(head, {"boxes": x, "timestep": t, **invariant})
                return out["pred_boxes"].astype(np.float32), out["class_logits"].astype(np.float32)

            sample = sample_boxes(
                predict,
                [np.random.Generator(np.random.PCG64(r.seed)) for r in requests],
                slots,
                steps,
                fixed=self._fixed(requests, slots),
                renewal=True,
                on_step=on_step,
            )
            with timer.stage("postprocess"):
                layouts = [
                    self._layout(r, sample.boxes[b], sample.class_logits[b]) for b, r in enumerate(requests)
                ]
        return LayoutOutput(layouts, timer.summary())

    def _backbone_images(self, requests: Sequence[LayoutRequest]) -> np.ndarray:
        p = requests[0].product
        w, h = layout_image_size(self.preset, p.width, p.height)
        return np.concatenate([
            to_model_image(np.asarray(Image.fromarray(product_only(r.product)).resize((w, h), Image.BILINEAR)))
            for r in requests
        ])

    def _fixed(self, requests: Sequence[LayoutRequest], slots: int) -> FixedBoxes:
        fixed = FixedBoxes.none(len(requests), slots)
        for b, r in enumerate(requests):
            for i, box in enumerate(r.fixed):
                fixed.mask[b, i] = True
                fixed.boxes[b, i] = box.normalized(r.product.width, r.product.height)
        return fixed

    def _layout(self, request: LayoutRequest, boxes: np.ndarray, logits: np.ndarray) -> Layout:
        w, h = request.product.width, request.product.height
        elements, unused = select_elements(boxes, logits, request.fixed, len(request.texts), w, h)
        return scored_layout(elements, request.product, unused)


def select_elements(
    boxes: np.ndarray,
    logits: np.ndarray,
    fixed: Sequence[FixedBox],
    n_texts: int,
    width: int,
    height: int,
    iou_threshold: float = NMS_IOU,
    score_threshold: float = SCORE_THRESHOLD,
) -> tuple[list[Element], int]:
    """RADM's post-processing for one canvas, plus the selling-point assignment (module docstring).

    `boxes` (N, 4) normalized xyxy and `logits` (N, C), the first len(fixed) slots the fixed
    boxes. Returns the elements (fixed first, then planned by score) and how many confident text
    boxes were left without a selling point."""
    k = len(fixed)
    scores = 1 / (1 + np.exp(-logits[k:].astype(np.float64)))  # (N - k, C)
    n_classes = scores.shape[1]
    order = np.lexsort((np.arange(scores.size), -scores.ravel()))[: len(scores)]  # top-k over (box, class)
    slot, cls = np.divmod(order, n_classes)
    cand_boxes, cand_scores = boxes[k + slot], scores.ravel()[order]
    keep = nms(cand_boxes, cand_scores, cls, iou_threshold)
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
    taken = [boxes[k + slot[i]] for i in text_picks + picks_below] + [f.normalized(width, height) for f in fixed]
    spare = _spare_slots(boxes[k:], scores[:, TEXT_CLASS], {int(slot[i]) for i in text_picks + picks_below}, taken,
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


@dataclass(frozen=True)
class PreparedLayout:
    request: LayoutRequest
    product_path: str
    product_size: tuple[int, int]
    placement: Placement
    layout_fixed_path: str | None
    steps: int
    seconds: float


class LayoutDefinition(PipelineDefinition):
    name = "layout"
    options = ("product", "mask", "text", "layout_fixed", "width", "height", "layout_steps", "seed")
    required = ("product", "text")
    step_components = ("layout_head",)
    steps_option = "layout_steps"
    step_stage = "layout_step"

    def specs(self, preset: Preset, precision: Precision = Precision.FP32) -> dict[str, ComponentSpec]:
        return layout_specs(preset, precision)

    def prepare(
        self,
        preset: Preset,
        product: str | Path,
        text: Sequence[str],
        mask: str | Path | None = None,
        layout_fixed: str | Path | None = None,
        width: int | None = None,
        height: int | None = None,
        layout_steps: int | None = None,
        seed: int = 0,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> PreparedLayout:
        started = time.perf_counter()
        texts = check_texts(text, min(preset.layout.max_texts, preset.layout.num_boxes))
        steps = DEFAULT_LAYOUT_STEPS if layout_steps is None else layout_steps
        time_pairs(steps)
        item, placed, placement = placed_product(preset, product, mask, width, height, max_pixels)
        fixed = () if layout_fixed is None else load_fixed_boxes(
            layout_fixed, placed.width, placed.height, texts, max_boxes=preset.layout.num_boxes - len(texts)
        )
        request = LayoutRequest(placed, texts, fixed, seed)
        request.validate()
        return PreparedLayout(request, str(product), (item.width, item.height), placement,
                              None if layout_fixed is None else str(layout_fixed), steps, time.perf_counter() - started)

    def create(self, components: Mapping[str, Component], preset: Preset, weights: WeightsSource) -> LayoutPipeline:
        return LayoutPipeline(components, preset, load_tokenizer(preset, weights))

    def run_batch(
        self, runner: LayoutPipeline, prepared: list[PreparedLayout], on_step: StepCallback | None = None
    ) -> list[GenerateResult]:
        steps = {p.steps for p in prepared}
        if len(steps) != 1:
            raise InputError("requests", "expected one layout step count per batch", sorted(steps))
        output = runner([p.request for p in prepared], steps=steps.pop(), on_step=on_step)
        results = []
        for p, layout in zip(prepared, output.layouts):
            r = p.request
            picture = draw_layout(product_only(r.product), layout.elements, r.texts)
            results.append(GenerateResult(picture, {
                "seed": r.seed,
                "width": r.product.width,
                "height": r.product.height,
                "layout_steps": p.steps,
                "texts": list(r.texts),
                "layout": layout_report(layout, r.texts, p.layout_fixed_path),
                "product": {"path": p.product_path, "size": list(p.product_size), "placement": placement_dict(p.placement)},
                "batch": len(prepared),
                "timings_s": {"load_inputs": round(p.seconds, 6), **output.timings},
            }))
        return results

    def call_plan(self, requests: int, steps: int) -> dict[str, Call]:
        return {
            "text_encoder": Call("text_encode", requests * 2, 1),  # two selling points per request in example_options
            "layout_backbone": Call("layout_backbone", requests, 1),
            "layout_head": Call("layout_step", requests, steps),
        }

    def example_options(self, folder: Path, preset: Preset) -> dict:
        return {**super().example_options(folder, preset), "text": ["Breathable mesh", "40% off"]}


def layout_report(layout: Layout, texts: Sequence[str], fixed_path: str | None) -> dict:
    return {
        "classes": list(LAYOUT_CLASSES),
        "elements": [e.to_dict(texts) for e in layout.elements],
        "metrics": layout.metrics,
        "unused_text_boxes": layout.unused_text_boxes,
        "fixed_from": fixed_path,
    }


DEFINITION = LayoutDefinition()
