"""The background pipeline (category-common + personalized style, arXiv 2312.13309), read top
to bottom. Architecture and assumptions: networks/background.py.

Per request, ONCE: the category prompt "a photo of C in the background of D" through the text
encoder (with the negative prompt for guidance), the product on grey (and the reference ad with
its own product greyed out) through the VAE encoder in one call, and, when there is a reference,
the personalized style branch. Then `steps` calls of the category-common U-Net, one batch of 2B
each (conditional first), taking the style residuals as invariant inputs; then the VAE decoder
and compositing of the product through its mask (its pixels exact).

Reference rules:
- The reference must have the canvas's aspect ratio within 1% (it is then resized to the canvas,
  Lanczos); any other size is refused with an error naming the canvas size.
- `reference_mask` marks the reference's own product (white), must have the reference's size,
  and may not cover all of it. Without it the whole reference is the style source (documented
  fallback: a reference ad without a product, or one the user has not masked).
- Without a reference the branch does not run: its residuals are zeros at style scale 0, and
  the category-common generator alone sets the style.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from runtime.artifacts.weights import WeightsSource
from runtime.backends.base import Component
from runtime.diffusion.schedulers import make_scheduler
from runtime.errors import InputError
from runtime.finishing.compose import compose
from runtime.inputs.categories import Category, get_category, prompt_tokens
from runtime.inputs.images import (
    GREY,
    MAX_IMAGE_PIXELS,
    Placement,
    Product,
    from_model_image,
    load_image,
    resize_mask_nearest,
    to_model_image,
)
from runtime.inputs.tokenizer import Tokenizer, check_prompt, load_tokenizer
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
)
from runtime.pipelines.refadgen import DEFAULT_GUIDANCE, DEFAULT_STEPS, GUIDANCE_RANGE
from runtime.presets import Preset
from runtime.specs.background import background_specs, style_residual_names
from runtime.specs.core import ComponentSpec, Precision
from runtime.timing import StageTimer

COMPONENTS = ("text_encoder", "vae_encoder", "style_branch", "background_unet", "vae_decoder")
STYLE_SCALE_RANGE = (0.0, 4.0)
ASPECT_TOLERANCE = 0.01
_MASK_THRESHOLD = 128


@dataclass(frozen=True)
class Reference:
    """A reference ad at canvas size: `rgb` (H, W, 3) uint8 with its own product greyed out,
    `mask` (H, W) bool on that product (all False when no mask was given); `size` (w, h) as loaded."""

    rgb: np.ndarray
    mask: np.ndarray
    size: tuple[int, int]


@dataclass(frozen=True)
class BackgroundRequest:
    """One ad: a product already placed on the canvas, its category, and optionally a reference."""

    product: Product
    category: Category
    reference: Reference | None = None
    negative_prompt: str = ""
    seed: int = 0
    guidance: float = DEFAULT_GUIDANCE
    style_scale: float = 1.0

    def validate(self) -> None:
        check_prompt("negative_prompt", self.negative_prompt)
        check_seed(self.seed)
        check_range("guidance", self.guidance, *GUIDANCE_RANGE)
        check_range("style_scale", self.style_scale, *STYLE_SCALE_RANGE)
        if self.reference is not None and self.reference.rgb.shape != self.product.rgb.shape:
            raise InputError(
                "reference", f"expected the canvas size {self.product.width}x{self.product.height}",
                f"{self.reference.rgb.shape[1]}x{self.reference.rgb.shape[0]}",
            )


class BackgroundPipeline:
    def __init__(self, components: Mapping[str, Component], preset: Preset, tokenizer: Tokenizer):
        require_components(components, COMPONENTS, "background")
        self.components = components
        self.preset = preset
        self.tokenizer = tokenizer
        self.residual_names = style_residual_names(preset)

    def __call__(
        self,
        requests: Sequence[BackgroundRequest],
        steps: int = DEFAULT_STEPS,
        scheduler: str = "ddim",
        on_step: StepCallback | None = None,
    ) -> PipelineOutput:
        check_batch(requests, steps, self.preset)
        timer = StageTimer()
        n = len(requests)
        guidance = np.array([r.guidance for r in requests], dtype=np.float32)
        cfg = bool((guidance > 1.0).any())  # at guidance 1 the unconditional half cancels out
        halves = 2 if cfg else 1
        sched = make_scheduler(scheduler)
        sched.set_timesteps(steps)
        with timer.stage("total"):
            with timer.stage("text_encode"):
                tokens = [prompt_tokens(self.tokenizer, r.category) for r in requests]
                ids = np.stack([t.ids for t in tokens])
                class_tokens = np.stack([t.class_tokens for t in tokens])
                identifier_tokens = np.stack([t.identifier_tokens for t in tokens])
                if cfg:  # the negative prompt carries no C or D: its attention is unmasked
                    ids = np.concatenate([ids, self.tokenizer([r.negative_prompt for r in requests])])
                    class_tokens = np.concatenate([class_tokens, np.zeros_like(class_tokens)])
                    identifier_tokens = np.concatenate([identifier_tokens, np.zeros_like(identifier_tokens)])
                text_embeds = run_cast(self.components["text_encoder"], {"input_ids": ids})["text_embeds"]
            with_reference = [i for i, r in enumerate(requests) if r.reference is not None]
            refs = [r.reference for r in requests if r.reference is not None]
            with timer.stage("vae_encode"):
                images = [to_model_image(product_only(r.product)) for r in requests]
                images += [to_model_image(ref.rgb) for ref in refs]
                latents_in = run_cast(self.components["vae_encoder"], {"image": np.concatenate(images)})["latent"]
                product_latent, reference_latent = latents_in[:n], latents_in[n:]
            h, w = product_latent.shape[-2:]
            product_mask = np.stack([resize_mask_nearest(r.product.mask, h, w)[None] for r in requests])  # (B, 1, h, w)
            residuals = self._style_zeros(n, h, w)
            if with_reference:
                with timer.stage("style_branch"):
                    out = run_cast(self.components["style_branch"], {
                        "reference_latent": reference_latent,
                        "reference_mask": np.stack([resize_mask_nearest(ref.mask, h, w)[None] for ref in refs]),
                        "product_mask": product_mask[with_reference],
                    })
                    for name in self.residual_names:
                        residuals[name][with_reference] = out[name]
            style_scale = np.array([r.style_scale if r.reference is not None else 0.0 for r in requests], dtype=np.float32)
            invariant = {
                "product_latent": np.concatenate([product_latent] * halves),
                "product_mask": np.concatenate([product_mask] * halves),
                "text_embeds": text_embeds,
                "class_tokens": class_tokens,
                "identifier_tokens": identifier_tokens,
                **{name: np.concatenate([r] * halves) for name, r in residuals.items()},
                "style_scale": np.concatenate([style_scale] * halves),
            }
            latents = initial_noise([r.seed for r in requests], self.preset.latent_channels, h, w, sched.init_noise_sigma)
            for i, t in enumerate(sched.timesteps):
                with timer.stage("denoise_step", repeated=True):
                    sample = np.concatenate([latents] * halves)
                    timestep = np.full(halves * n, t, dtype=np.float32)
                    eps = run_cast(self.components["background_unet"], {"sample": sample, "timestep": timestep, **invariant})["noise_pred"]
                    if cfg:
                        eps = guide(eps, guidance)
                    latents = sched.step(eps, int(t), latents)
                if on_step:
                    on_step(i + 1, steps)
            with timer.stage("vae_decode"):
                generated = from_model_image(run_cast(self.components["vae_decoder"], {"latent": latents})["image"])
            with timer.stage("compose"):
                images_out = [compose(g, r.product) for g, r in zip(generated, requests)]
        return PipelineOutput(images=images_out, generated=generated, timings=timer.summary())

    def _style_zeros(self, n: int, h: int, w: int) -> dict[str, np.ndarray]:
        """Zero residuals for every request; a request with a reference gets the branch's instead."""
        spec = self.components["background_unet"].spec
        env = spec.env_at("opt", B=n, latent_h=h, latent_w=w)
        return {name: np.zeros(spec.shape(name, env), dtype=spec.tensor(name).dtype.numpy) for name in self.residual_names}



def load_reference(
    path: str | Path,
    width: int,
    height: int,
    mask_path: str | Path | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Reference:
    """Load a reference ad for a width x height canvas (rules in the module docstring)."""
    im = load_image(path, "reference", max_pixels)
    rw, rh = im.size
    if abs(rw * height - rh * width) > ASPECT_TOLERANCE * rh * width:
        raise InputError(
            "reference",
            f"expected the canvas size {width}x{height} or the same aspect ratio (within {ASPECT_TOLERANCE:.0%}); "
            "crop it, or choose the canvas with --width/--height",
            f"{rw}x{rh}",
        )
    rgb = np.array(im.convert("RGB"), dtype=np.uint8)
    if im.mode in ("RGBA", "LA"):  # transparent parts carry no style
        rgb[np.asarray(im.getchannel("A")) < _MASK_THRESHOLD] = GREY
    mask = np.zeros((rh, rw), dtype=bool)
    if mask_path is not None:
        m = load_image(mask_path, "reference_mask", max_pixels)
        if m.size != im.size:
            raise InputError("reference_mask", f"expected the reference's size {rw}x{rh}", f"{m.size[0]}x{m.size[1]}")
        mask = _mask_values(m) >= _MASK_THRESHOLD
    if (rw, rh) != (width, height):
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.LANCZOS))
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.LANCZOS)) >= _MASK_THRESHOLD
    if mask.all():
        raise InputError("reference_mask", "covers the whole reference: no background left to take the style from")
    rgb = rgb.copy()
    rgb[mask] = GREY  # the reference's own product must not leak into the new background
    return Reference(rgb=rgb, mask=mask, size=(rw, rh))


def _mask_values(m: Image.Image) -> np.ndarray:
    """Greyscale value of a mask image; transparent parts count as black."""
    if m.mode in ("RGBA", "LA"):
        value = np.asarray(m.convert("L"), dtype=np.uint16)
        alpha = np.asarray(m.getchannel("A"), dtype=np.uint16)
        return (value * alpha + 127) // 255
    return np.asarray(m.convert("L"))


@dataclass(frozen=True)
class PreparedBackground:
    """A validated request: product placed on its canvas, category resolved, reference loaded."""

    request: BackgroundRequest
    product_path: str
    product_size: tuple[int, int]
    placement: Placement
    reference_path: str | None
    reference_mask_path: str | None
    steps: int
    scheduler: str
    seconds: float


class BackgroundDefinition(PipelineDefinition):
    name = "background"
    options = ("product", "mask", "category", "categories", "reference", "reference_mask", "negative_prompt", "width",
               "height", "steps", "guidance", "style_scale", "seed", "scheduler")
    required = ("product", "category")
    step_components = ("background_unet",)

    def specs(self, preset: Preset, precision: Precision = Precision.FP32) -> dict[str, ComponentSpec]:
        return background_specs(preset, precision)

    def prepare(
        self,
        preset: Preset,
        product: str | Path,
        category: str,
        mask: str | Path | None = None,
        categories: str | Path | None = None,
        reference: str | Path | None = None,
        reference_mask: str | Path | None = None,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        style_scale: float | None = None,
        seed: int = 0,
        scheduler: str | None = None,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> PreparedBackground:
        started = time.perf_counter()
        steps, scheduler = schedule_settings(steps, scheduler, DEFAULT_STEPS)
        resolved = get_category(category, categories)
        if reference_mask is not None and reference is None:
            raise InputError("reference_mask", "is only read with --reference", str(reference_mask))
        if style_scale is not None and reference is None:
            raise InputError("style_scale", "is only read with --reference", style_scale)
        item, placed, placement = placed_product(preset, product, mask, width, height, max_pixels)
        ref = None if reference is None else load_reference(reference, placed.width, placed.height, reference_mask, max_pixels)
        request = BackgroundRequest(
            placed, resolved, ref, negative_prompt, seed,
            DEFAULT_GUIDANCE if guidance is None else guidance,
            1.0 if style_scale is None else style_scale,
        )
        request.validate()
        return PreparedBackground(
            request, str(product), (item.width, item.height), placement,
            None if reference is None else str(reference),
            None if reference_mask is None else str(reference_mask),
            steps, scheduler, time.perf_counter() - started,
        )

    def create(self, components: Mapping[str, Component], preset: Preset, weights: WeightsSource) -> BackgroundPipeline:
        return BackgroundPipeline(components, preset, load_tokenizer(preset, weights))

    def run_batch(
        self, runner: BackgroundPipeline, prepared: list[PreparedBackground], on_step: StepCallback | None = None
    ) -> list[GenerateResult]:
        steps, scheduler = batch_settings(prepared)
        output = runner([p.request for p in prepared], steps=steps, scheduler=scheduler, on_step=on_step)
        return [GenerateResult(image, self._report(runner, p, steps, scheduler, len(prepared), output.timings))
                for p, image in zip(prepared, output.images)]

    def _report(self, runner: BackgroundPipeline, prepared: PreparedBackground, steps: int, scheduler: str,
                batch: int, timings: dict) -> dict:
        r = prepared.request
        tokens = prompt_tokens(runner.tokenizer, r.category)
        return {
            "seed": r.seed,
            "category": {
                "name": r.category.name,
                "noun": r.category.noun,
                "identifier": r.category.identifier,
                "prompt": r.category.prompt,
                "class_token_positions": np.flatnonzero(tokens.class_tokens).tolist(),
                "identifier_token_positions": np.flatnonzero(tokens.identifier_tokens).tolist(),
            },
            "negative_prompt": r.negative_prompt,
            "width": r.product.width,
            "height": r.product.height,
            "steps": steps,
            "scheduler": scheduler,
            "guidance": r.guidance,
            "product": {
                "path": prepared.product_path,
                "size": list(prepared.product_size),
                "placement": placement_dict(prepared.placement),
            },
            "reference": None if r.reference is None else {
                "path": prepared.reference_path,
                "size": list(r.reference.size),
                "mask": prepared.reference_mask_path or "none: the whole reference is the style source",
                "style_scale": r.style_scale,
            },
            "batch": batch,
            "timings_s": {"load_inputs": round(prepared.seconds, 6), **timings},
        }

    def call_plan(self, requests: int, steps: int) -> dict[str, Call]:
        """With a reference per request, as in `example_options` (without one the branch does not run)."""
        guided = 2 * requests
        return {
            "text_encoder": Call("text_encode", guided, 1),
            "vae_encoder": Call("vae_encode", 2 * requests, 1),  # products and references in one call
            "style_branch": Call("style_branch", requests, 1),
            "background_unet": Call("denoise_step", guided, steps),
            "vae_decoder": Call("vae_decode", requests, 1),
        }

    def example_options(self, folder: Path, preset: Preset) -> dict:
        from runtime.inputs.examples import draw_reference

        ad, mask = draw_reference(preset.default_width, preset.default_height)
        ad.save(folder / "reference.png")
        mask.save(folder / "reference_mask.png")
        return {**super().example_options(folder, preset), "category": "sneakers",
                "reference": folder / "reference.png", "reference_mask": folder / "reference_mask.png"}


DEFINITION = BackgroundDefinition()
