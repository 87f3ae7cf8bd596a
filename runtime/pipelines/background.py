"""The background pipeline (category-common + personalized style, arXiv 2312.13309), read top
to bottom. Architecture and assumptions: networks/background.py.

Per request, ONCE: the category prompt "a photo of C in the background of D" through the text
encoder (with the negative prompt for guidance), the product on grey (and the reference ad with
its own product greyed out) through the VAE encoder in one call, and, when there is a reference,
the personalized style branch. Then the shared denoising loop (runtime/diffusion/loop.py) runs
the category-common U-Net every step, one batch of 2B (conditional first), taking the style
residuals as per-request inputs; then the VAE decoder and compositing of the product through its
mask (its pixels exact).

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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from runtime.artifacts.weights import WeightsSource
from runtime.backends.base import Component, run_cast
from runtime.diffusion.loop import Denoiser, Guidance
from runtime.errors import InputError
from runtime.inputs.categories import Category, get_category, prompt_tokens
from runtime.inputs.images import (
    GREY,
    MASK_THRESHOLD,
    MAX_IMAGE_PIXELS,
    PlacedProduct,
    Product,
    decode_budget,
    decode_mask,
    load_image,
    product_only,
    resize_mask,
    resize_mask_nearest,
    to_model_image,
)
from runtime.inputs.tokenizer import load_tokenizer
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
from runtime.presets import Preset
from runtime.specs.background import style_residual_names
from runtime.specs.pipelines import PIPELINE_SPECS
from runtime.timing import StageTimer

STYLE_SCALE_RANGE = (0.0, 4.0)
ASPECT_TOLERANCE = 0.01


@dataclass(frozen=True)
class Reference:
    """A reference ad at canvas size: `rgb` (H, W, 3) uint8 with its own product greyed out,
    `mask` (H, W) bool on that product (all False when no mask was given); `size` (w, h) as loaded."""

    rgb: np.ndarray
    mask: np.ndarray
    size: tuple[int, int]


@dataclass(frozen=True)
class BackgroundRequest(Guided):
    """One ad: a product already placed on the canvas, its category, and optionally a reference."""

    product: Product
    category: Category
    reference: Reference | None = None
    style_scale: float = 1.0

    def validate(self) -> None:
        self.check_guided()
        check_range("style_scale", self.style_scale, *STYLE_SCALE_RANGE)
        if self.reference is not None and self.reference.rgb.shape != self.product.rgb.shape:
            raise InputError(
                "reference", f"expected the canvas size {self.product.width}x{self.product.height}",
                f"{self.reference.rgb.shape[1]}x{self.reference.rgb.shape[0]}",
            )


class BackgroundPipeline(LatentPipeline):
    name = "background"
    needs = ("text_encoder", "vae_encoder", "style_branch", "background_unet", "vae_decoder")

    def __init__(self, components: Mapping[str, Component], preset: Preset, tokenizer):
        super().__init__(components, preset, tokenizer)
        self.residual_names = style_residual_names(preset)

    def condition(self, requests: Sequence[BackgroundRequest], guidance: Guidance, timer: StageTimer) -> Conditioning:
        c, n = self.components, len(requests)
        with timer.stage("text_encode"):
            tokens = [prompt_tokens(self.tokenizer, r.category) for r in requests]
            ids = np.stack([t.ids for t in tokens])
            class_tokens = np.stack([t.class_tokens for t in tokens])
            identifier_tokens = np.stack([t.identifier_tokens for t in tokens])
            if guidance.halves == 2:  # the negative prompt carries no C or D: its attention is unmasked
                ids = np.concatenate([ids, self.tokenizer([r.negative_prompt for r in requests])])
                class_tokens = np.concatenate([class_tokens, np.zeros_like(class_tokens)])
                identifier_tokens = np.concatenate([identifier_tokens, np.zeros_like(identifier_tokens)])
            text_embeds = run_cast(c["text_encoder"], {"input_ids": ids})["text_embeds"]
        with_reference = [i for i, r in enumerate(requests) if r.reference is not None]
        refs = [r.reference for r in requests if r.reference is not None]
        with timer.stage("vae_encode"):
            images = [to_model_image(product_only(r.product)) for r in requests]
            images += [to_model_image(ref.rgb) for ref in refs]
            latents_in = run_cast(c["vae_encoder"], {"image": np.concatenate(images)})["latent"]
            product_latent, reference_latent = latents_in[:n], latents_in[n:]
        h, w = product_latent.shape[-2:]
        product_mask = np.stack([resize_mask_nearest(r.product.mask, h, w)[None] for r in requests])  # (B, 1, h, w)
        residuals = self._style_zeros(n, h, w)
        if with_reference:
            with timer.stage("style_branch"):
                out = run_cast(c["style_branch"], {
                    "reference_latent": reference_latent,
                    "reference_mask": np.stack([resize_mask_nearest(ref.mask, h, w)[None] for ref in refs]),
                    "product_mask": product_mask[with_reference],
                })
                for name in self.residual_names:
                    residuals[name][with_reference] = out[name]
        style_scale = np.array([r.style_scale if r.reference is not None else 0.0 for r in requests], dtype=np.float32)
        per_request = {"product_latent": product_latent, "product_mask": product_mask, "style_scale": style_scale, **residuals}
        positions = [{"class_token_positions": np.flatnonzero(t.class_tokens).tolist(),
                      "identifier_token_positions": np.flatnonzero(t.identifier_tokens).tolist()} for t in tokens]
        denoiser = Denoiser(
            components=[c["background_unet"]],
            conditioning={
                **{name: guidance.double(x) for name, x in per_request.items()},
                "text_embeds": text_embeds,
                "class_tokens": class_tokens,
                "identifier_tokens": identifier_tokens,
            },
        )
        return Conditioning(denoiser, carry=positions)  # reported: where C's and D's tokens sit

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
    decode_pixels: int | None = None,
) -> Reference:
    """Load a reference ad for a width x height canvas (rules in the module docstring)."""
    im = load_image(path, "reference", max_pixels, decode_pixels)
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
        rgb[np.asarray(im.getchannel("A")) < MASK_THRESHOLD] = GREY
    mask = np.zeros((rh, rw), dtype=bool)
    if mask_path is not None:
        m = load_image(mask_path, "reference_mask", max_pixels, decode_pixels)
        if m.size != im.size:
            raise InputError("reference_mask", f"expected the reference's size {rw}x{rh}", f"{m.size[0]}x{m.size[1]}")
        mask = decode_mask(m)
    if (rw, rh) != (width, height):
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.LANCZOS))
        mask = resize_mask(mask, width, height)
    if mask.all():
        raise InputError("reference_mask", "covers the whole reference: no background left to take the style from")
    rgb = rgb.copy()
    rgb[mask] = GREY  # the reference's own product must not leak into the new background
    return Reference(rgb=rgb, mask=mask, size=(rw, rh))


class BackgroundDefinition(PipelineDefinition):
    name = "background"
    spec_builders = PIPELINE_SPECS["background"]
    options = ("product", "mask", "category", "categories", "reference", "reference_mask", "negative_prompt", "width",
               "height", "steps", "guidance", "style_scale", "seed", "scheduler", "latents")
    required = ("product", "category")
    step_components = ("background_unet",)


    def prepare(
        self,
        preset: Preset,
        category: str,
        categories: str | Path | None = None,
        reference: str | Path | None = None,
        reference_mask: str | Path | None = None,
        negative_prompt: str = "",
        guidance: float | None = None,
        style_scale: float | None = None,
        seed: int = 0,
        **common: Any,
    ) -> Prepared:
        resolved = get_category(category, categories)
        if reference_mask is not None and reference is None:
            raise InputError("reference_mask", "is only read with --reference", str(reference_mask))
        if style_scale is not None and reference is None:
            raise InputError("style_scale", "is only read with --reference", style_scale)

        def build(placed: PlacedProduct, schedule: Schedule) -> BackgroundRequest:
            canvas = placed.product
            ref = None if reference is None else load_reference(
                reference, canvas.width, canvas.height, reference_mask, common.get("max_pixels", MAX_IMAGE_PIXELS),
                decode_budget(preset.max_side),
            )
            return BackgroundRequest(
                canvas, resolved, ref, 1.0 if style_scale is None else style_scale,
                negative_prompt=negative_prompt, seed=seed, guidance=DEFAULT_GUIDANCE if guidance is None else guidance,
            )

        return self.prepared(preset, common, build, reference=reference, reference_mask=reference_mask)

    def create(self, components: Mapping[str, Component], preset: Preset, weights: WeightsSource) -> BackgroundPipeline:
        return BackgroundPipeline(components, preset, load_tokenizer(preset, weights))

    def request_report(self, prepared: Prepared, output: PipelineOutput, index: int) -> dict:
        r = prepared.request
        return {
            "category": {
                "name": r.category.name,
                "noun": r.category.noun,
                "identifier": r.category.identifier,
                "prompt": r.category.prompt,
                **output.reported[index],
            },
            "negative_prompt": r.negative_prompt,
            "guidance": r.guidance,
            "reference": None if r.reference is None else {
                "path": prepared.files["reference"],
                "size": list(r.reference.size),
                "mask": prepared.files.get("reference_mask", "none: the whole reference is the style source"),
                "style_scale": r.style_scale,
            },
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
