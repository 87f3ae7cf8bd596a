"""The RefAdGen loop, read top to bottom.

Per request: text and image encoders, the product latent, the reference U-Net at t = 0 and the
AFM key/value projections run ONCE; then `steps` calls of the 5-channel U-Net, each one batch of
2B (conditional first, unconditional second) for classifier-free guidance; then the VAE decoder
and compositing of the product through its mask. Requests in one call share the canvas size and
step count but keep their own prompt, seed, guidance and AFM scale; a request's result does not
depend on what else is in the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from runtime.artifacts.weights import WeightsSource
from runtime.backends.base import Component
from runtime.diffusion.schedulers import make_scheduler
from runtime.errors import InputError
from runtime.finishing.compose import compose
from runtime.inputs.images import (
    MAX_IMAGE_PIXELS,
    Placement,
    Product,
    clip_pixels,
    from_model_image,
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
    run_cast,
    schedule_settings,
)
from runtime.presets import Preset
from runtime.specs.core import ComponentSpec, Precision
from runtime.specs.refadgen import refadgen_specs
from runtime.timing import StageTimer

GUIDED_STEP = "guided_unet"
COMPONENTS = ("text_encoder", "image_encoder", "vae_encoder", "reference_unet", "afm_kv", "unet", "vae_decoder")
DEFAULT_STEPS = 30  # RefAdGen's paper: 30 DDIM steps, guidance 7.5
DEFAULT_GUIDANCE = 7.5
DEFAULT_AFM_SCALE = 1.0
GUIDANCE_RANGE = (1.0, 30.0)
AFM_SCALE_RANGE = (0.0, 4.0)


@dataclass(frozen=True)
class RefAdGenRequest:
    """One ad: a product already placed on the canvas (see images.place_on_canvas) and a prompt."""

    product: Product
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    guidance: float = DEFAULT_GUIDANCE
    afm_scale: float = DEFAULT_AFM_SCALE

    def validate(self) -> None:
        check_prompt("prompt", self.prompt)
        if not self.prompt.strip():  # the background is generated from it: nothing to follow
            raise InputError("prompt", "expected a description of the background, not empty text", repr(self.prompt))
        check_prompt("negative_prompt", self.negative_prompt)
        check_seed(self.seed)
        check_range("guidance", self.guidance, *GUIDANCE_RANGE)
        check_range("afm_scale", self.afm_scale, *AFM_SCALE_RANGE)


class RefAdGenPipeline:
    """With a `guided_unet` component (the fused guided-step graph) in place of `unet`, each
    step is one call that runs both guidance halves and combines them inside the graph."""

    def __init__(self, components: Mapping[str, Component], preset: Preset, tokenizer: Tokenizer):
        self.guided = components.get(GUIDED_STEP)
        needed = [c for c in COMPONENTS if not (c == "unet" and self.guided is not None)]
        missing = [c for c in needed if c not in components]
        if missing:
            raise InputError("components", f"RefAdGen needs {list(COMPONENTS)} (or {GUIDED_STEP} for unet)", f"missing {missing}")
        self.components = components
        self.preset = preset
        self.tokenizer = tokenizer
        self._zero_image_tokens: np.ndarray | None = None

    def __call__(
        self,
        requests: Sequence[RefAdGenRequest],
        steps: int = DEFAULT_STEPS,
        scheduler: str = "ddim",
        on_step: StepCallback | None = None,
    ) -> PipelineOutput:
        check_batch(requests, steps, self.preset)
        timer = StageTimer()
        n = len(requests)
        guidance = np.array([r.guidance for r in requests], dtype=np.float32)
        # At guidance 1 the unconditional half cancels out; the fused graph always runs both.
        cfg = bool((guidance > 1.0).any()) or self.guided is not None
        halves = 2 if cfg else 1
        sched = make_scheduler(scheduler)
        sched.set_timesteps(steps)
        with timer.stage("total"):
            with timer.stage("text_encode"):
                texts = [r.prompt for r in requests] + ([r.negative_prompt for r in requests] if cfg else [])
                text_embeds = run_cast(self.components["text_encoder"], {"input_ids": self.tokenizer(texts)})["text_embeds"]
            with timer.stage("image_encode"):
                image_tokens = self._image_tokens(requests, cfg)
            with timer.stage("vae_encode"):
                product_latent = run_cast(self.components["vae_encoder"], {"image": self._reference_images(requests)})["latent"]
            with timer.stage("reference_unet"):
                states = run_cast(
                    self.components["reference_unet"],
                    {"product_latent": np.concatenate([product_latent] * halves), "image_tokens": image_tokens},
                )
                ref_kv = run_cast(self.components["afm_kv"], states)
            h, w = product_latent.shape[-2:]
            mask = np.stack([resize_mask_nearest(r.product.mask, h, w)[None] for r in requests])  # (B, 1, h, w)
            latents = initial_noise([r.seed for r in requests], self.preset.latent_channels, h, w, sched.init_noise_sigma)
            invariant = {
                "text_embeds": text_embeds,
                "afm_scale": np.array([r.afm_scale for r in requests] * halves, dtype=np.float32),
                **ref_kv,
            }
            for i, t in enumerate(sched.timesteps):
                with timer.stage("denoise_step", repeated=True):
                    if self.guided is not None:  # one call: both halves and the combination in the graph
                        eps = run_cast(self.guided, {
                            **invariant,
                            "sample": np.concatenate([latents, mask], axis=1),  # (B, 5, h, w)
                            "timestep": np.full(n, t, dtype=np.float32),
                            "afm_scale": invariant["afm_scale"][:n],
                            "guidance": guidance,
                        })["noise_pred"].astype(np.float32, copy=False)
                    else:
                        sample = np.concatenate([np.concatenate([latents, mask], axis=1)] * halves)  # (halves*B, 5, h, w)
                        timestep = np.full(halves * n, t, dtype=np.float32)
                        eps = run_cast(self.components["unet"], {"sample": sample, "timestep": timestep, **invariant})["noise_pred"]
                        eps = eps.astype(np.float32, copy=False)  # guidance and scheduler maths in float32
                        if cfg:
                            eps = guide(eps, guidance)
                    latents = sched.step(eps, int(t), latents)
                if on_step:
                    on_step(i + 1, steps)
            with timer.stage("vae_decode"):
                decoded = run_cast(self.components["vae_decoder"], {"latent": latents})["image"]
                generated = from_model_image(decoded.astype(np.float32, copy=False))
            with timer.stage("compose"):
                images = [compose(g, r.product) for g, r in zip(generated, requests)]
        return PipelineOutput(images=images, generated=generated, timings=timer.summary())

    def _image_tokens(self, requests: Sequence[RefAdGenRequest], cfg: bool) -> np.ndarray:
        size = self.preset.image.image_size
        pixels = np.concatenate([clip_pixels(product_only(r.product), size) for r in requests])
        tokens = run_cast(self.components["image_encoder"], {"pixel_values": pixels})["image_tokens"]
        if not cfg:
            return tokens
        if self._zero_image_tokens is None:  # the unconditional image embedding: same for every request
            zeros = np.zeros((1, 3, size, size), dtype=np.float32)
            self._zero_image_tokens = run_cast(self.components["image_encoder"], {"pixel_values": zeros})["image_tokens"]
        return np.concatenate([tokens, np.repeat(self._zero_image_tokens, len(requests), axis=0)])

    def _reference_images(self, requests: Sequence[RefAdGenRequest]) -> np.ndarray:
        return np.concatenate([to_model_image(product_only(r.product)) for r in requests])


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: the product loaded and placed on its canvas."""

    request: RefAdGenRequest
    product_path: str
    product_size: tuple[int, int]
    placement: Placement
    steps: int
    scheduler: str
    seconds: float  # loading and checking the inputs


class RefAdGenDefinition(PipelineDefinition):
    name = "refadgen"
    options = ("product", "mask", "prompt", "negative_prompt", "width", "height", "steps", "guidance",
               "afm_scale", "seed", "scheduler")
    required = ("product", "prompt")
    step_components = ("unet",)
    guided_step = ("unet", ("sample", "timestep", "afm_scale"))

    def specs(self, preset: Preset, precision: Precision = Precision.FP32) -> dict[str, ComponentSpec]:
        return refadgen_specs(preset, precision)

    def prepare(
        self,
        preset: Preset,
        product: str | Path,
        prompt: str,
        mask: str | Path | None = None,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        afm_scale: float | None = None,
        seed: int = 0,
        scheduler: str | None = None,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> PreparedRequest:
        started = time.perf_counter()
        steps, scheduler = schedule_settings(steps, scheduler, DEFAULT_STEPS)
        item, placed, placement = placed_product(preset, product, mask, width, height, max_pixels)
        request = RefAdGenRequest(
            placed, prompt, negative_prompt, seed,
            DEFAULT_GUIDANCE if guidance is None else guidance,
            DEFAULT_AFM_SCALE if afm_scale is None else afm_scale,
        )
        request.validate()
        return PreparedRequest(
            request, str(product), (item.width, item.height), placement, steps, scheduler, time.perf_counter() - started
        )

    def create(self, components: Mapping[str, Component], preset: Preset, weights: WeightsSource) -> RefAdGenPipeline:
        return RefAdGenPipeline(components, preset, load_tokenizer(preset, weights))

    def run_batch(
        self, runner: RefAdGenPipeline, prepared: list[PreparedRequest], on_step: StepCallback | None = None
    ) -> list[GenerateResult]:
        steps, scheduler = batch_settings(prepared)
        output = runner([p.request for p in prepared], steps=steps, scheduler=scheduler, on_step=on_step)
        results = []
        for p, image in zip(prepared, output.images):
            r = p.request
            report = {
                "seed": r.seed,
                "prompt": r.prompt,
                "negative_prompt": r.negative_prompt,
                "width": r.product.width,
                "height": r.product.height,
                "steps": steps,
                "scheduler": scheduler,
                "guidance": r.guidance,
                "afm_scale": r.afm_scale,
                "product": {"path": p.product_path, "size": list(p.product_size), "placement": placement_dict(p.placement)},
                "batch": len(prepared),
                "timings_s": {"load_inputs": round(p.seconds, 6), **output.timings},
            }
            results.append(GenerateResult(image, report))
        return results

    def call_plan(self, requests: int, steps: int) -> dict[str, Call]:
        guided = 2 * requests  # classifier-free guidance: conditional + unconditional in one batch
        return {
            "text_encoder": Call("text_encode", guided, 1),
            "image_encoder": Call("image_encode", requests, 1),
            "vae_encoder": Call("vae_encode", requests, 1),
            "reference_unet": Call("reference_unet", guided, 1),
            "afm_kv": Call("reference_unet", guided, 1),
            "unet": Call("denoise_step", guided, steps),
            "vae_decoder": Call("vae_decode", requests, 1),
        }

    def example_options(self, folder: Path, preset: Preset) -> dict:
        return {**super().example_options(folder, preset), "prompt": "a sneaker on a wooden table, soft light"}


DEFINITION = RefAdGenDefinition()
