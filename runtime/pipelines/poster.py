"""The poster pipeline (Planning & Rendering, arXiv 2312.08822), read top to bottom.
Architecture and assumptions: networks/poster.py.

Per request, ONCE: the prompt (and the negative prompt, for guidance) and every selling point
(pooled) through the text encoder; the product canvas through the image encoder. Then two loops:

1. PlanNet plans one box per selling point: `layout_steps` calls, DiffusionDet's box diffusion
   (runtime/diffusion/boxes.py) from a random layout. Boxes from `--layout-fixed` (text boxes
   only: PlanNet plans text) hold their selling point's slot and come out exactly as given.
   A planned box smaller than the smallest legible text block is grown around its centre, and
   one that covers more than a tenth of the product slides to the nearest place that covers
   the least of it (both recorded under `repairs` in the report): the selling points stay visible.
2. The text boxes become a layout mask; RenderNet encodes it with the product image ONCE; then
   `steps` calls of ControlNet + U-Net, each one batch of 2B (conditional first), ControlNet's
   residuals feeding the U-Net's skip connections.

Then the VAE decoder, compositing the product through its mask (its pixels exact), and
typesetting every selling point inside its box (runtime/finishing/typeset.py). Text is never drawn over
the product: its pixels are restored after typesetting, so the product stays exact even where a
box overlaps it (a fixed box, or where no place is free; the `occlusion` metric says how much).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from runtime.artifacts.weights import WeightsSource
from runtime.backends.base import Component
from runtime.diffusion.boxes import FixedBoxes, sample_boxes, time_pairs
from runtime.diffusion.schedulers import make_scheduler
from runtime.errors import InputError
from runtime.finishing.compose import compose
from runtime.finishing.typeset import typeset
from runtime.inputs.images import MAX_IMAGE_PIXELS, Placement, Product, clip_pixels, from_model_image, to_model_image
from runtime.inputs.tokenizer import Tokenizer, check_prompt, load_tokenizer
from runtime.layout.boxes import to_pixels
from runtime.layout.elements import Element, FixedBox, check_texts, layout_mask, load_fixed_boxes, move_off_product
from runtime.pipelines.base import Call, GenerateResult, PipelineDefinition, StepCallback
from runtime.pipelines.common import (
    PipelineOutput,
    batch_settings,
    check_batch,
    check_range,
    check_seed,
    guide,
    initial_noise,
    placed_product,
    placement_dict,
    product_only,
    require_components,
    run_cast,
    schedule_settings,
    selling_point_features,
)
from runtime.pipelines.layout import Layout, layout_report, scored_layout
from runtime.pipelines.refadgen import DEFAULT_GUIDANCE, GUIDANCE_RANGE
from runtime.presets import Preset
from runtime.specs.core import ComponentSpec, Precision
from runtime.specs.poster import control_residual_names, poster_specs
from runtime.timing import StageTimer

COMPONENTS = ("text_encoder", "image_encoder", "plannet", "render_cond", "controlnet", "poster_unet", "vae_decoder")
DEFAULT_STEPS = 30
DEFAULT_LAYOUT_STEPS = 20
CONTROL_SCALE_RANGE = (0.0, 2.0)
MIN_BOX_FRACTION = (0.25, 0.06)  # a planned text box is at least this share of the canvas width, height


@dataclass(frozen=True)
class PosterRequest:
    product: Product
    prompt: str
    texts: tuple[str, ...]
    fixed: tuple[FixedBox, ...] = ()
    negative_prompt: str = ""
    seed: int = 0
    guidance: float = DEFAULT_GUIDANCE
    control_scale: float = 1.0

    def validate(self) -> None:
        check_prompt("prompt", self.prompt)
        check_prompt("negative_prompt", self.negative_prompt)
        check_texts(self.texts)
        check_seed(self.seed)
        check_range("guidance", self.guidance, *GUIDANCE_RANGE)
        check_range("control_scale", self.control_scale, *CONTROL_SCALE_RANGE)


@dataclass
class PosterOutput(PipelineOutput):
    layouts: list[Layout]
    placements: list[list[dict]]  # typeset text per request


class PosterPipeline:
    def __init__(self, components: Mapping[str, Component], preset: Preset, tokenizer: Tokenizer):
        require_components(components, COMPONENTS, "poster")
        self.components = components
        self.preset = preset
        self.tokenizer = tokenizer
        self.residual_names = control_residual_names(preset)

    def __call__(
        self,
        requests: Sequence[PosterRequest],
        steps: int = DEFAULT_STEPS,
        layout_steps: int = DEFAULT_LAYOUT_STEPS,
        scheduler: str = "ddim",
        on_step: StepCallback | None = None,
    ) -> PosterOutput:
        check_batch(requests, steps, self.preset)
        timer = StageTimer()
        n = len(requests)
        guidance = np.array([r.guidance for r in requests], dtype=np.float32)
        cfg = bool((guidance > 1.0).any())
        halves = 2 if cfg else 1
        sched = make_scheduler(scheduler)
        sched.set_timesteps(steps)
        c = self.components
        with timer.stage("total"):
            with timer.stage("text_encode"):
                prompts = [r.prompt for r in requests] + ([r.negative_prompt for r in requests] if cfg else [])
                text_embeds = run_cast(c["text_encoder"], {"input_ids": self.tokenizer(prompts)})["text_embeds"]
                features, text_mask = selling_point_features(
                    c["text_encoder"], self.tokenizer, [r.texts for r in requests], self.preset.max_batch
                )
            with timer.stage("image_encode"):
                size = self.preset.image.image_size
                pixels = np.concatenate([clip_pixels(product_only(r.product), size) for r in requests])
                image_tokens = run_cast(c["image_encoder"], {"pixel_values": pixels})["image_tokens"]
            boxes = self._plan(requests, layout_steps, timer, image_tokens, features, text_mask)
            with timer.stage("render_cond"):
                masks = np.stack([layout_mask(b, r.product.width, r.product.height)[None] for b, r in zip(boxes, requests)])
                control_cond = run_cast(c["render_cond"], {
                    "layout_mask": masks,
                    "product_image": np.concatenate([to_model_image(product_only(r.product)) for r in requests]),
                })["control_cond"]
            h, w = control_cond.shape[-2:]
            control = {
                "text_embeds": text_embeds,
                "control_cond": np.concatenate([control_cond] * halves),
                "control_scale": np.array([r.control_scale for r in requests] * halves, dtype=np.float32),
            }
            latents = initial_noise([r.seed for r in requests], self.preset.latent_channels, h, w, sched.init_noise_sigma)
            for i, t in enumerate(sched.timesteps):
                with timer.stage("denoise_step", repeated=True):
                    sample = np.concatenate([latents] * halves)
                    timestep = np.full(halves * n, t, dtype=np.float32)
                    residuals = run_cast(c["controlnet"], {"sample": sample, "timestep": timestep, **control})
                    eps = run_cast(c["poster_unet"], {
                        "sample": sample, "timestep": timestep, "text_embeds": text_embeds,
                        **{name: residuals[name] for name in self.residual_names},
                    })["noise_pred"].astype(np.float32, copy=False)
                    if cfg:
                        eps = guide(eps, guidance)
                    latents = sched.step(eps, int(t), latents)
                if on_step:
                    on_step(i + 1, steps)
            with timer.stage("vae_decode"):
                decoded = run_cast(c["vae_decoder"], {"latent": latents})["image"]
                generated = from_model_image(decoded.astype(np.float32, copy=False))
            with timer.stage("compose"):
                composed = [compose(g, r.product) for g, r in zip(generated, requests)]
            images, placements, layouts = [], [], []
            with timer.stage("typeset"):
                for image, elements, r in zip(composed, boxes, requests):
                    text_elements = sorted((e for e in elements if e.text is not None), key=lambda e: e.text)
                    drawn, placed = typeset(image, [e.box for e in text_elements], [r.texts[e.text] for e in text_elements])
                    drawn = drawn.copy()
                    drawn[r.product.mask] = r.product.rgb[r.product.mask]  # text never covers the product
                    images.append(drawn)
                    placements.append([p.to_dict() for p in placed])
                    layouts.append(scored_layout(elements, r.product))
        return PosterOutput(images=images, generated=generated, timings=timer.summary(), layouts=layouts,
                            placements=placements)

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
        plannet = self.components["plannet"]
        slots = features.shape[1]
        fixed = FixedBoxes.none(len(requests), slots)
        for b, r in enumerate(requests):
            for box in r.fixed:
                fixed.mask[b, box.text] = True
                fixed.boxes[b, box.text] = box.normalized(r.product.width, r.product.height)
        invariant = {"image_tokens": image_tokens, "text_features": features, "text_mask": text_mask}

        def predict(x: np.ndarray, t: np.ndarray):
            with timer.stage("layout_step", repeated=True):
                out = run_cast(plannet, {"layout": x, "timestep": t, **invariant})
            return out["layout_pred"].astype(np.float32), None

        sample = sample_boxes(
            predict, [np.random.Generator(np.random.PCG64([r.seed, 1])) for r in requests], slots, layout_steps, fixed=fixed
        )
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


@dataclass(frozen=True)
class PreparedPoster:
    request: PosterRequest
    product_path: str
    product_size: tuple[int, int]
    placement: Placement
    layout_fixed_path: str | None
    steps: int
    layout_steps: int
    scheduler: str
    seconds: float


class PosterDefinition(PipelineDefinition):
    name = "poster"
    options = ("product", "mask", "prompt", "text", "layout_fixed", "negative_prompt", "width", "height", "steps",
               "layout_steps", "guidance", "control_scale", "seed", "scheduler")
    required = ("product", "prompt", "text")
    step_components = ("controlnet", "poster_unet")

    def specs(self, preset: Preset, precision: Precision = Precision.FP32) -> dict[str, ComponentSpec]:
        return poster_specs(preset, precision)

    def prepare(
        self,
        preset: Preset,
        product: str | Path,
        prompt: str,
        text: Sequence[str],
        mask: str | Path | None = None,
        layout_fixed: str | Path | None = None,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        layout_steps: int | None = None,
        guidance: float | None = None,
        control_scale: float | None = None,
        seed: int = 0,
        scheduler: str | None = None,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> PreparedPoster:
        started = time.perf_counter()
        steps, scheduler = schedule_settings(steps, scheduler, DEFAULT_STEPS)
        layout_steps = DEFAULT_LAYOUT_STEPS if layout_steps is None else layout_steps
        time_pairs(layout_steps)
        texts = check_texts(text, preset.layout.max_texts)
        item, placed, placement = placed_product(preset, product, mask, width, height, max_pixels)
        fixed = () if layout_fixed is None else load_fixed_boxes(layout_fixed, placed.width, placed.height, texts,
                                                                 classes=("text",))
        request = PosterRequest(
            placed, prompt, texts, fixed, negative_prompt, seed,
            DEFAULT_GUIDANCE if guidance is None else guidance,
            1.0 if control_scale is None else control_scale,
        )
        request.validate()
        return PreparedPoster(request, str(product), (item.width, item.height), placement,
                              None if layout_fixed is None else str(layout_fixed), steps, layout_steps, scheduler,
                              time.perf_counter() - started)

    def create(self, components: Mapping[str, Component], preset: Preset, weights: WeightsSource) -> PosterPipeline:
        return PosterPipeline(components, preset, load_tokenizer(preset, weights))

    def run_batch(
        self, runner: PosterPipeline, prepared: list[PreparedPoster], on_step: StepCallback | None = None
    ) -> list[GenerateResult]:
        steps, scheduler = batch_settings(prepared)
        layout_steps = {p.layout_steps for p in prepared}
        if len(layout_steps) != 1:
            raise InputError("requests", "expected one layout step count per batch", sorted(layout_steps))
        output = runner([p.request for p in prepared], steps=steps, layout_steps=layout_steps.pop(),
                        scheduler=scheduler, on_step=on_step)
        results = []
        for i, p in enumerate(prepared):
            r = p.request
            results.append(GenerateResult(output.images[i], {
                "seed": r.seed,
                "prompt": r.prompt,
                "negative_prompt": r.negative_prompt,
                "width": r.product.width,
                "height": r.product.height,
                "steps": steps,
                "layout_steps": p.layout_steps,
                "scheduler": scheduler,
                "guidance": r.guidance,
                "control_scale": r.control_scale,
                "texts": list(r.texts),
                "layout": layout_report(output.layouts[i], r.texts, p.layout_fixed_path),
                "typeset": output.placements[i],
                "product": {"path": p.product_path, "size": list(p.product_size), "placement": placement_dict(p.placement)},
                "batch": len(prepared),
                "timings_s": {"load_inputs": round(p.seconds, 6), **output.timings},
            }))
        return results

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
