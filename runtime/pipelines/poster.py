"""The poster pipeline (Planning & Rendering, arXiv 2312.08822), read top to bottom.
Architecture and assumptions: networks/poster.py.

Per request, ONCE: the prompt (and the negative prompt, for guidance) and every selling point
(pooled) through the text encoder; the product canvas through the image encoder. Then two loops:

1. PlanNet plans one box per selling point: `layout_steps` calls, DiffusionDet's box diffusion
   (runtime/diffusion/boxes.py) from a random layout. Boxes from `--layout-fixed` (text boxes
   only: PlanNet plans text) hold their selling point's slot and come out exactly as given.
   A planned box smaller than the smallest legible text block is grown around its centre, and
   one that covers more than a tenth of the product slides to the nearest place that covers
   the least of it (runtime/layout/postprocess.py; both recorded under `repairs` in the
   report): the selling points stay visible.
2. The text boxes become a layout mask; RenderNet encodes it with the product image ONCE; then
   the shared denoising loop (runtime/diffusion/loop.py) runs ControlNet + U-Net every step, one
   batch of 2B (conditional first), ControlNet's residuals feeding the U-Net's skip connections.

Then the VAE decoder, compositing the product through its mask (its pixels exact), and
typesetting every selling point inside its box (runtime/finishing/typeset.py). A selling point
no installed font can draw is refused when the request is prepared, before any model runs. Text is never drawn over
the product: its pixels are restored after typesetting, so the product stays exact even where a
box overlaps it (a fixed box, or where no place is free; the `occlusion` metric says how much).
"""


from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.artifacts.weights import WeightsSource
from runtime.backends.base import Component, run_cast
from runtime.diffusion.boxes import BoxDenoiser, FixedBoxes, sample_boxes, time_pairs
from runtime.diffusion.loop import Denoiser, Guidance
from runtime.errors import InputError
from runtime.finishing.typeset import check_drawable, typeset
from runtime.inputs.images import PlacedProduct, Product, product_only, to_model_image
from runtime.inputs.tokenizer import check_prompt, load_tokenizer
from runtime.layout.boxes import to_pixels
from runtime.layout.elements import Element, FixedBox, check_texts, layout_mask, load_fixed_boxes
from runtime.layout.postprocess import Layout, grow_box, layout_report, move_off_product, scored_layout
from runtime.pipelines.base import (
    Call,
    Conditioning,
    LatentPipeline,
    PipelineDefinition,
    PipelineOutput,
    Prepared,
    Schedule,
)
from runtime.pipelines.checks import DEFAULT_GUIDANCE, Guided, check_range
from runtime.pipelines.conditioning import image_tokens, prompt_embeddings, selling_point_features
from runtime.presets import Preset
from runtime.specs.pipelines import PIPELINE_SPECS
from runtime.timing import StageTimer

DEFAULT_LAYOUT_STEPS = 20
CONTROL_SCALE_RANGE = (0.0, 2.0)


@dataclass(frozen=True)
class PosterRequest(Guided):
    """One poster: the product placed on the canvas, a prompt, the selling points and the text
    boxes the user fixed."""

    product: Product
    prompt: str
    texts: tuple[str, ...]
    fixed: tuple[FixedBox, ...] = ()
    control_scale: float = 1.0
    layout_steps: int = DEFAULT_LAYOUT_STEPS

    def validate(self) -> None:
        check_prompt("prompt", self.prompt)
        check_texts(self.texts)
        self.check_guided()
        check_range("control_scale", self.control_scale, *CONTROL_SCALE_RANGE)
        time_pairs(self.layout_steps)


@dataclass
class PosterOutput(PipelineOutput):
    layouts: list[Layout] = field(default_factory=list)
    placements: list[list[dict]] = field(default_factory=list)  # typeset text per request


class PosterPipeline(LatentPipeline):
    name = "poster"
    needs = ("text_encoder", "image_encoder", "plannet", "render_cond", "controlnet", "poster_unet", "vae_decoder")

    def condition(self, requests: Sequence[PosterRequest], guidance: Guidance, timer: StageTimer) -> Conditioning:
        c = self.components
        layout_steps = {r.layout_steps for r in requests}
        if len(layout_steps) != 1:
            raise InputError("requests", "expected one layout step count per batch", sorted(layout_steps))
        with timer.stage("text_encode"):
            text_embeds = prompt_embeddings(c["text_encoder"], self.tokenizer, [r.prompt for r in requests],
                                            [r.negative_prompt for r in requests], guidance)
            features, text_mask = selling_point_features(
                c["text_encoder"], self.tokenizer, [r.texts for r in requests], self.preset.max_batch
            )
        with timer.stage("image_encode"):
            tokens = image_tokens(c["image_encoder"], self.preset.image.image_size, [r.product for r in requests])
        plans = self._plan(requests, layout_steps.pop(), timer, tokens, features, text_mask)
        with timer.stage("render_cond"):
            masks = np.stack([layout_mask(b, r.product.width, r.product.height)[None] for b, r in zip(plans, requests)])
            control_cond = run_cast(c["render_cond"], {
                "layout_mask": masks,
                "product_image": np.concatenate([to_model_image(product_only(r.product)) for r in requests]),
            })["control_cond"]
        control_scale = np.array([r.control_scale for r in requests], dtype=np.float32)
        denoiser = Denoiser(
            components=[c["controlnet"], c["poster_unet"]],
            conditioning={
                "text_embeds": text_embeds,
                "control_cond": guidance.double(control_cond),
                "control_scale": guidance.double(control_scale),
            },
        )
        return Conditioning(denoiser, carry=plans)

    def finish(self, requests: Sequence[PosterRequest], images: list[np.ndarray], generated: list[np.ndarray],
               carry: list[list[Element]], timer: StageTimer) -> PosterOutput:
        drawn_images, placements, layouts = [], [], []
        with timer.stage("typeset"):
            for image, elements, r in zip(images, carry, requests):
                text_elements = sorted((e for e in elements if e.text is not None), key=lambda e: e.text)
                drawn, placed = typeset(image, [e.box for e in text_elements], [r.texts[e.text] for e in text_elements])
                drawn = drawn.copy()
                drawn[r.product.mask] = r.product.rgb[r.product.mask]  # text never covers the product
                drawn_images.append(drawn)
                placements.append([p.to_dict() for p in placed])
                layouts.append(scored_layout(elements, r.product))
        return PosterOutput(drawn_images, generated, layouts=layouts, placements=placements)

    def _plan(
        self,
        requests: Sequence[PosterRequest],
        layout_steps: int,
        timer: StageTimer,
        image_tokens: np.ndarray,
        features: np.ndarray,
        text_mask: np.ndarray,
    ) -> list[list[Element]]:
        """PlanNet's loop: one box per selling point, in canvas pixels (module docstring)."""
        slots = features.shape[1]
        plannet = BoxDenoiser(
            self.components["plannet"],
            {"image_tokens": image_tokens, "text_features": features, "text_mask": text_mask},
            boxes="layout", output="layout_pred", timer=timer,
        )
        fixed = FixedBoxes.of(
            [{box.text: box.normalized(r.product.width, r.product.height) for box in r.fixed} for r in requests], slots
        )
        generators = [np.random.Generator(np.random.PCG64([r.seed, 1])) for r in requests]
        sample = sample_boxes(plannet, generators, slots, layout_steps, fixed=fixed)
        plans = []
        for b, r in enumerate(requests):
            w, h = r.product.width, r.product.height
            held = {f.text: f for f in r.fixed}
            elements = []
            for t in range(len(r.texts)):
                if t in held:
                    elements.append(Element("text", held[t].box, 1.0, t, fixed=True))
                else:
                    px, grown = grow_box(to_pixels(sample.boxes[b, t], w, h), w, h)
                    px, moved = move_off_product(px, r.product.mask)
                    repairs = ("grown",) * grown + ("moved",) * moved
                    elements.append(Element("text", tuple(int(v) for v in px), None, t, repairs=repairs))
            plans.append(elements)
        return plans


class PosterDefinition(PipelineDefinition):
    name = "poster"
    spec_builders = PIPELINE_SPECS["poster"]
    options = ("product", "mask", "prompt", "text", "layout_fixed", "negative_prompt", "width", "height", "steps",
               "layout_steps", "guidance", "control_scale", "seed", "scheduler", "latents")
    required = ("product", "prompt", "text")
    default_layout_steps = DEFAULT_LAYOUT_STEPS
    step_components = ("controlnet", "poster_unet")


    def prepare(
        self,
        preset: Preset,
        prompt: str,
        text: Sequence[str],
        layout_fixed: str | Path | None = None,
        negative_prompt: str = "",
        guidance: float | None = None,
        control_scale: float | None = None,
        seed: int = 0,
        **common: Any,
    ) -> Prepared:
        texts = check_texts(text, preset.layout.max_texts)
        check_drawable(texts)  # before any model runs, not after the whole loop

        def build(placed: PlacedProduct, schedule: Schedule) -> PosterRequest:
            canvas = placed.product
            fixed = () if layout_fixed is None else load_fixed_boxes(
                layout_fixed, canvas.width, canvas.height, texts, classes=("text",)
            )
            return PosterRequest(
                canvas, prompt, texts, fixed, 1.0 if control_scale is None else control_scale, schedule.layout_steps,
                negative_prompt=negative_prompt, seed=seed, guidance=DEFAULT_GUIDANCE if guidance is None else guidance,
            )

        return self.prepared(preset, common, build, layout_fixed=layout_fixed)

    def create(self, components: Mapping[str, Component], preset: Preset, weights: WeightsSource) -> PosterPipeline:
        return PosterPipeline(components, preset, load_tokenizer(preset, weights))

    def request_report(self, prepared: Prepared, output: PosterOutput, index: int) -> dict:
        r = prepared.request
        return {
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "guidance": r.guidance,
            "control_scale": r.control_scale,
            "texts": list(r.texts),
            "layout": layout_report(output.layouts[index], r.texts, prepared.files.get("layout_fixed")),
            "typeset": output.placements[index],
        }

    def call_plan(self, requests: int, steps: int) -> dict[str, Call]:
        guided = 2 * requests
        return {
            "text_encoder": Call("text_encode", guided, 2),  # prompts; then two selling points per request
            "image_encoder": Call("image_encode", requests, 1),
            "plannet": Call("layout_step", requests, DEFAULT_LAYOUT_STEPS),
            "render_cond": Call("render_cond", requests, 1),
            "controlnet": Call("denoise_step", guided, steps),
            "poster_unet": Call("denoise_step", guided, steps),
            "vae_decoder": Call("vae_decode", requests, 1),
        }

    def example_options(self, folder: Path, preset: Preset) -> dict:
        return {**super().example_options(folder, preset), "prompt": "a sneaker in a bright studio",
                "text": ["Breathable mesh", "40% off"]}


DEFINITION = PosterDefinition()
