"""The layout pipeline (RADM, CIKM 2023), read top to bottom. Architecture: networks/layout/__init__.py.

Per request, ONCE: each selling point through the text encoder (its pooled end-of-text vector),
and the canvas (the product placed on grey, resized so its long side is the preset's
`layout.image_side`, sides multiples of 32) through the ResNet-50 + FPN backbone. Then
`layout_steps` calls of the cascaded box head (the reference: one DDIM step from t = 999),
sampling with DiffusionDet's box diffusion (runtime/diffusion/boxes.py, box renewal on), and
RADM's post-processing (runtime/layout/postprocess.py: top-k over (box, class) pairs,
class-aware NMS at IoU 0.15, score > 0.25, the selling points given the text boxes in reading
order). The picture is the canvas with every element drawn in its class colour.

`--layout-fixed` boxes occupy the first slots, hold the user's box at every step and come out
exactly as given; the rest is planned around them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from runtime.artifacts.weights import WeightsSource
from runtime.backends.base import Component, run_cast
from runtime.diffusion.boxes import BoxDenoiser, BoxSample, FixedBoxes, sample_boxes
from runtime.diffusion.loop import StepCallback
from runtime.inputs.images import PlacedProduct, Product, product_only, to_model_image
from runtime.inputs.tokenizer import Tokenizer, load_tokenizer
from runtime.layout.elements import FixedBox, check_texts, draw_layout, load_fixed_boxes
from runtime.layout.postprocess import Layout, layout_report, scored_layout, select_elements
from runtime.pipelines.base import Call, PipelineDefinition, PipelineOutput, Prepared, Schedule
from runtime.pipelines.checks import check_batch, check_seed, require_components
from runtime.pipelines.conditioning import selling_point_features
from runtime.pipelines.processing import LAYOUT, LayoutProcessing, Profile
from runtime.presets import Preset
from runtime.specs.layout import (
    FPN_LEVELS,
    PIXEL_MEAN,
    layout_image_size,
    padded_image_size,
    reference_image_size,
)
from runtime.specs.pipelines import PIPELINE_SPECS
from runtime.timing import StageTimer

DEFAULT_LAYOUT_STEPS = 1  # RADM's reference sampling


@dataclass(frozen=True)
class LayoutRequest:
    """One canvas to plan: the product placed on it, the selling points, boxes the user fixed."""

    product: Product
    texts: tuple[str, ...]
    fixed: tuple[FixedBox, ...] = ()
    seed: int = 0
    processing: LayoutProcessing = LAYOUT[Profile.ADGEN]

    def validate(self) -> None:
        check_texts(self.texts)
        check_seed(self.seed)


@dataclass
class LayoutOutput(PipelineOutput):
    layouts: list[Layout] = field(default_factory=list)


# the [-1, 1] input the backbone's normalisation maps to 0, per channel: its padding value
BACKBONE_PAD = (np.array(PIXEL_MEAN, dtype=np.float32) / 127.5 - 1.0)[:, None, None]


def frame_factors(preset: Preset, width: int, height: int) -> np.ndarray:
    """(4,) factors from the normalized boxes the layout head works in to the canvas's normalized
    x0, y0, x1, y1, for a backbone input of `width` x `height`: ones in adgen's frame; in RADM's
    ("hwhw": x was scaled by the height) (H/W, W/H, H/W, W/H)."""
    if preset.layout.proposal_frame != "hwhw":
        return np.ones(4)
    return np.array([height / width, width / height] * 2)


class LayoutPipeline:
    name = "layout"
    needs = ("text_encoder", "layout_backbone", "layout_head")

    def __init__(self, components: Mapping[str, Component], preset: Preset, tokenizer: Tokenizer):
        require_components(components, self.needs, self.name)
        self.components = components
        self.preset = preset
        self.tokenizer = tokenizer

    def __call__(
        self, requests: Sequence[LayoutRequest], steps: int = DEFAULT_LAYOUT_STEPS, on_step: StepCallback | None = None
    ) -> LayoutOutput:
        check_batch(requests, steps, self.preset)
        timer = StageTimer()
        c, slots = self.components, self.preset.layout.num_boxes
        with timer.stage("total"):
            with timer.stage("text_encode"):
                # RADM's weights (reference_views) saw its data loader's 20 slots, zeros after the texts
                text_slots = self.preset.layout.max_texts if self.preset.layout.reference_views else 0
                features, text_mask = selling_point_features(
                    c["text_encoder"], self.tokenizer, [r.texts for r in requests], self.preset.max_batch, text_slots
                )
            size, padded = self._input_sizes(requests[0])
            with timer.stage("layout_backbone"):
                pyramid = run_cast(c["layout_backbone"], {"image": self._backbone_images(requests, size, padded)})
            image_size = np.array([[size[1], size[0]]] * len(requests), dtype=np.float32)  # (height, width)
            head = BoxDenoiser(
                c["layout_head"],
                {**{level: pyramid[level] for level in FPN_LEVELS}, "text_features": features, "text_mask": text_mask,
                 "image_size": image_size},
                boxes="boxes", output="pred_boxes", logits="class_logits", timer=timer,
            )
            # the head's frame -> the canvas's: (1, 1, 1, 1) but for RADM's weights on a non-square canvas
            to_canvas = frame_factors(self.preset, *size)
            fixed = FixedBoxes.of(
                [{i: box.normalized(r.product.width, r.product.height) / to_canvas for i, box in enumerate(r.fixed)}
                 for r in requests],
                slots,
            )
            generators = [np.random.Generator(np.random.PCG64(r.seed)) for r in requests]
            sample = sample_boxes(head, generators, slots, steps, fixed=fixed, renewal=True, on_step=on_step,
                                  renewal_threshold=[r.processing.renewal_threshold for r in requests])
            sample = sample.rescaled(to_canvas)
            with timer.stage("postprocess"):
                layouts = [self._layout(r, sample, b) for b, r in enumerate(requests)]
            with timer.stage("draw"):
                images = [draw_layout(product_only(r.product), layout.elements, r.texts) for r, layout in zip(requests, layouts)]
        return LayoutOutput(images, layouts=layouts, timings=timer.summary())

    def _input_sizes(self, request: LayoutRequest) -> tuple[tuple[int, int], tuple[int, int]]:
        """(width, height) of the image the backbone sees and of its input, padding included (the
        same but for the reference's input, runtime/pipelines/processing.py)."""
        p = request.product
        if request.processing.reference_input:
            size = reference_image_size(self.preset, p.width, p.height)
            return size, padded_image_size(*size)
        size = layout_image_size(self.preset, p.width, p.height)
        return size, size

    def _backbone_images(self, requests: Sequence[LayoutRequest], size: tuple[int, int],
                         padded: tuple[int, int]) -> np.ndarray:
        """The canvases resized to `size`, padded at the bottom and right to `padded` with the
        value the backbone's normalisation maps to 0 (detectron2 pads after normalising)."""
        (w, h), (pw, ph) = size, padded
        images = np.concatenate([
            to_model_image(np.asarray(Image.fromarray(product_only(r.product)).resize((w, h), Image.BILINEAR)))
            for r in requests
        ])
        if (pw, ph) == (w, h):
            return images
        out = np.broadcast_to(BACKBONE_PAD, (len(requests), 3, ph, pw)).astype(np.float32)
        out[:, :, :h, :w] = images
        return out

    def _layout(self, request: LayoutRequest, sample: BoxSample, b: int) -> Layout:
        w, h = request.product.width, request.product.height
        p = request.processing
        earlier = [(boxes[b], logits[b]) for boxes, logits in sample.predictions[:-1]] if p.merge_steps else []
        elements, unused = select_elements(sample.boxes[b], sample.class_logits[b], request.fixed, len(request.texts),
                                           w, h, earlier=earlier, drop_empty=p.drop_empty)
        return scored_layout(elements, request.product, unused)


class LayoutDefinition(PipelineDefinition):
    name = "layout"
    spec_builders = PIPELINE_SPECS["layout"]
    options = ("product", "mask", "text", "layout_fixed", "width", "height", "layout_steps", "seed", "processing")
    required = ("product", "text")
    default_layout_steps = DEFAULT_LAYOUT_STEPS
    step_components = ("layout_head",)
    steps_option = "layout_steps"
    step_stage = "layout_step"


    def prepare(
        self,
        preset: Preset,
        text: Sequence[str],
        layout_fixed: str | Path | None = None,
        seed: int = 0,
        processing: str | Profile | None = None,
        **common: Any,
    ) -> Prepared:
        texts = check_texts(text, min(preset.layout.max_texts, preset.layout.num_boxes))
        proc = LAYOUT[Profile.parse(processing)]

        def build(placed: PlacedProduct, schedule: Schedule) -> LayoutRequest:
            canvas = placed.product
            fixed = () if layout_fixed is None else load_fixed_boxes(
                layout_fixed, canvas.width, canvas.height, texts, max_boxes=preset.layout.num_boxes - len(texts)
            )
            return LayoutRequest(canvas, texts, fixed, seed, proc)

        return self.prepared(preset, common, build, layout_fixed=layout_fixed)

    def create(self, components: Mapping[str, Component], preset: Preset, weights: WeightsSource) -> LayoutPipeline:
        return LayoutPipeline(components, preset, load_tokenizer(preset, weights))

    def loop_arguments(self, schedule: Schedule) -> dict:
        return {"steps": schedule.layout_steps}

    def request_report(self, prepared: Prepared, output: LayoutOutput, index: int) -> dict:
        r = prepared.request
        layout = layout_report(output.layouts[index], r.texts, prepared.files.get("layout_fixed"))
        return {"texts": list(r.texts), "layout": layout, "processing": r.processing.profile.value}

    def call_plan(self, requests: int, steps: int) -> dict[str, Call]:
        return {
            "text_encoder": Call("text_encode", requests * 2, 1),  # two selling points per request in example_options
            "layout_backbone": Call("layout_backbone", requests, 1),
            "layout_head": Call("layout_step", requests, steps),
        }

    def example_options(self, folder: Path, preset: Preset) -> dict:
        return {**super().example_options(folder, preset), "text": ["Breathable mesh", "40% off"]}


DEFINITION = LayoutDefinition()
