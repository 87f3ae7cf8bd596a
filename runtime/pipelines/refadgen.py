"""The RefAdGen pipeline (AAAI 2026). Architecture: networks/refadgen.py.

Per request, ONCE: the prompt (and the negative prompt, for guidance) through the text encoder,
the product on grey (or as its processing profile says: runtime/pipelines/processing.py) through
the image encoder (the unconditional half takes the tokens of a zero
image, computed once per pipeline), the product latent through the VAE encoder, the reference
U-Net at t = 0 and the AFM key/value projections of its 16 self-attention inputs. Then the
shared denoising loop (runtime/diffusion/loop.py) runs the 5-channel U-Net every step on the
noisy latent and the product mask, each step one batch of 2B for classifier-free guidance (or
one call of the fused guided-step graph); then the VAE decoder and compositing of the product
through its mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from runtime.artifacts.weights import WeightsSource
from runtime.backends.base import Component, run_cast
from runtime.diffusion.loop import Denoiser, Guidance
from runtime.errors import InputError
from runtime.finishing.compose import compose
from runtime.inputs.images import (
    Product,
    clip_pixels,
    long_side_resized,
    product_only,
    resize_mask_nearest,
    resize_rgb,
    to_model_image,
)
from runtime.inputs.tokenizer import Tokenizer, check_prompt, load_tokenizer
from runtime.pipelines.base import Call, Conditioning, LatentPipeline, PipelineDefinition, Prepared
from runtime.pipelines.checks import DEFAULT_GUIDANCE, Guided, check_range
from runtime.pipelines.conditioning import prompt_embeddings
from runtime.pipelines.processing import REFADGEN, Profile, RefAdGenProcessing
from runtime.presets import Preset
from runtime.specs.guided import guided_name
from runtime.specs.pipelines import PIPELINE_SPECS
from runtime.timing import StageTimer

STEP = "unet"
GUIDED_STEP = guided_name(STEP)
DEFAULT_AFM_SCALE = 1.0
AFM_SCALE_RANGE = (0.0, 4.0)


@dataclass(frozen=True)
class RefAdGenRequest(Guided):
    """One ad: a product already placed on the canvas (see images.place_on_canvas) and a prompt.
    `processing` says how the encoders see the product (runtime/pipelines/processing.py); a
    stretched placement also keeps the `photo` as loaded, which its views and result go back to."""

    product: Product
    prompt: str
    afm_scale: float = DEFAULT_AFM_SCALE
    processing: RefAdGenProcessing = REFADGEN[Profile.ADGEN]
    photo: Product | None = field(default=None, compare=False)

    def validate(self) -> None:
        check_prompt("prompt", self.prompt)
        if not self.prompt.strip():  # the background is generated from it: nothing to follow
            raise InputError("prompt", "expected a description of the background, not empty text", repr(self.prompt))
        self.check_guided()
        check_range("afm_scale", self.afm_scale, *AFM_SCALE_RANGE)
        if self.processing.stretch and self.photo is None:
            raise InputError("processing", f"{self.processing.profile.value} processing needs the photo as loaded")


class RefAdGenPipeline(LatentPipeline):
    """With a `guided_unet` component (the fused guided-step graph) in place of `unet`, each
    step is one call that runs both guidance halves and combines them inside the graph."""

    name = "refadgen"
    needs = ("text_encoder", "image_encoder", "vae_encoder", "reference_unet", "afm_kv", STEP, "vae_decoder")

    def __init__(self, components: Mapping[str, Component], preset: Preset, tokenizer: Tokenizer):
        super().__init__(components, preset, tokenizer)
        self._zero_image_tokens: np.ndarray | None = None

    def required_components(self, components: Mapping[str, Component]) -> Sequence[str]:
        return [GUIDED_STEP if c == STEP and GUIDED_STEP in components else c for c in self.needs]

    @property
    def fused(self) -> bool:
        return GUIDED_STEP in self.components

    def condition(self, requests: Sequence[RefAdGenRequest], guidance: Guidance, timer: StageTimer) -> Conditioning:
        c = self.components
        with timer.stage("text_encode"):
            prompts = [r.processing.prompt(r.prompt) for r in requests]
            negatives = [r.negative_prompt for r in requests]
            text_embeds = prompt_embeddings(c["text_encoder"], self.tokenizer, prompts, negatives, guidance)
        canvas, s = requests[0].product, self.preset.vae_scale
        h, w = canvas.height // s, canvas.width // s
        views = [self._views(r, h, w) for r in requests]
        with timer.stage("image_encode"):
            pixels = np.concatenate([clip for clip, _, _ in views])
            tokens = run_cast(c["image_encoder"], {"pixel_values": pixels})["image_tokens"]
            if guidance.halves == 2:
                tokens = np.concatenate([tokens, np.repeat(self._unconditional_tokens(), len(requests), axis=0)])
        with timer.stage("vae_encode"):
            posterior = run_cast(c["vae_encoder"], {"image": np.concatenate([image for _, image, _ in views])})
            product_latent = np.stack([self._latent(r, posterior, b) for b, r in enumerate(requests)])
        with timer.stage("reference_unet"):
            reference = {"product_latent": guidance.double(product_latent), "image_tokens": tokens}
            states = run_cast(c["reference_unet"], reference)
            ref_kv = run_cast(c["afm_kv"], states)
        mask = np.stack([m for _, _, m in views])  # (B, 1, h, w)
        afm_scale = np.array([r.afm_scale for r in requests], dtype=np.float32)
        return Conditioning(Denoiser(
            components=[c[GUIDED_STEP] if self.fused else c[STEP]],
            conditioning={"text_embeds": text_embeds, "afm_scale": guidance.double(afm_scale), **ref_kv},
            sample=lambda latents: np.concatenate([latents, mask], axis=1),  # (B, 5, h, w)
        ))

    def _views(self, r: RefAdGenRequest, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the encoders see of the request's product: the CLIP input (1, 3, S, S), the VAE
        input (1, 3, H, W) and the mask at latent size (1, h, w), as its processing says."""
        p, size = r.processing, self.preset.image.image_size
        if not p.stretch:
            seen = product_only(r.product, p.fill)
            return (clip_pixels(seen, size, crop=p.clip_crop), to_model_image(seen),
                    resize_mask_nearest(r.product.mask, h, w)[None])
        resized = long_side_resized(product_only(r.photo, p.fill), r.product.width, r.product.height)
        vae_input = to_model_image(resize_rgb(resized, r.product.width, r.product.height))
        mask = resize_mask_nearest(r.photo.mask, h, w, corner=True)[None]
        return clip_pixels(resized, size, crop=p.clip_crop), vae_input, mask

    def _latent(self, r: RefAdGenRequest, posterior: Mapping[str, np.ndarray], b: int) -> np.ndarray:
        """The request's product latent (C, h, w): the posterior's mode, or a sample with noise
        from its own seed (a stream apart from the initial noise's)."""
        mode = posterior["latent"][b]
        if not r.processing.sample_latent:
            return mode
        noise = np.random.Generator(np.random.PCG64([r.seed, 2])).standard_normal(mode.shape, dtype=np.float32)
        return (mode.astype(np.float32) + posterior["latent_std"][b].astype(np.float32) * noise).astype(mode.dtype)

    def compose(self, generated: np.ndarray, request: RefAdGenRequest) -> np.ndarray:
        """A stretched product's result goes back to the photo's size (bicubic) before its pixels
        are pasted back."""
        if not request.processing.stretch:
            return super().compose(generated, request)
        photo = request.photo
        return compose(resize_rgb(generated, photo.width, photo.height, Image.BICUBIC), photo)

    def _unconditional_tokens(self) -> np.ndarray:
        """The image tokens of a zero image: the same for every request, computed once."""
        if self._zero_image_tokens is None:
            size = self.preset.image.image_size
            zeros = np.zeros((1, 3, size, size), dtype=np.float32)
            encoded = run_cast(self.components["image_encoder"], {"pixel_values": zeros})
            self._zero_image_tokens = encoded["image_tokens"]
        return self._zero_image_tokens


class RefAdGenDefinition(PipelineDefinition):
    name = "refadgen"
    spec_builders = PIPELINE_SPECS["refadgen"]
    options = ("product", "mask", "prompt", "negative_prompt", "width", "height", "steps", "guidance",
               "afm_scale", "seed", "scheduler", "processing", "latents")
    required = ("product", "prompt")
    step_components = (STEP,)
    guided_step = (STEP, ("sample", "timestep", "afm_scale"))


    def prepare(
        self,
        preset: Preset,
        prompt: str,
        negative_prompt: str | None = None,
        guidance: float | None = None,
        afm_scale: float | None = None,
        seed: int = 0,
        processing: str | Profile | None = None,
        **common: Any,
    ) -> Prepared:
        proc = REFADGEN[Profile.parse(processing)]
        return self.prepared(preset, common, lambda placed, schedule: RefAdGenRequest(
            placed.product, prompt, DEFAULT_AFM_SCALE if afm_scale is None else afm_scale, proc,
            placed.photo if proc.stretch else None, negative_prompt=proc.negative_prompt(negative_prompt), seed=seed,
            guidance=DEFAULT_GUIDANCE if guidance is None else guidance,
        ), stretch=proc.stretch)

    def create(self, components: Mapping[str, Component], preset: Preset, weights: WeightsSource) -> RefAdGenPipeline:
        return RefAdGenPipeline(components, preset, load_tokenizer(preset, weights))

    def request_report(self, prepared: Prepared, output: object, index: int) -> dict:
        r = prepared.request
        return {"prompt": r.prompt, "negative_prompt": r.negative_prompt, "guidance": r.guidance,
                "afm_scale": r.afm_scale, "processing": r.processing.profile.value}

    def call_plan(self, requests: int, steps: int) -> dict[str, Call]:
        """On a runner that has computed the zero image's tokens already (its first guided
        request adds one image_encoder call of batch 1)."""
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
