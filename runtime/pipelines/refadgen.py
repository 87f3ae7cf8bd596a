"""The RefAdGen pipeline (AAAI 2026). Architecture: networks/refadgen.py.

Per request, ONCE: the prompt (and the negative prompt, for guidance) through the text encoder,
the product on grey through the image encoder (the unconditional half takes the tokens of a zero
image, computed once per pipeline), the product latent through the VAE encoder, the reference
U-Net at t = 0 and the AFM key/value projections of its 16 self-attention inputs. Then the
shared denoising loop (runtime/diffusion/loop.py) runs the 5-channel U-Net every step on the
noisy latent and the product mask, each step one batch of 2B for classifier-free guidance (or
one call of the fused guided-step graph); then the VAE decoder and compositing of the product
through its mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.artifacts.weights import WeightsSource
from runtime.backends.base import Component, run_cast
from runtime.diffusion.loop import Denoiser, Guidance
from runtime.errors import InputError
from runtime.inputs.images import (
    Product,
    product_only,
    resize_mask_nearest,
    to_model_image,
)
from runtime.inputs.tokenizer import Tokenizer, check_prompt, load_tokenizer
from runtime.pipelines.base import Call, Conditioning, LatentPipeline, PipelineDefinition, Prepared
from runtime.pipelines.checks import DEFAULT_GUIDANCE, Guided, check_range
from runtime.pipelines.conditioning import image_tokens, prompt_embeddings
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
    """One ad: a product already placed on the canvas (see images.place_on_canvas) and a prompt."""

    product: Product
    prompt: str
    afm_scale: float = DEFAULT_AFM_SCALE

    def validate(self) -> None:
        check_prompt("prompt", self.prompt)
        if not self.prompt.strip():  # the background is generated from it: nothing to follow
            raise InputError("prompt", "expected a description of the background, not empty text", repr(self.prompt))
        self.check_guided()
        check_range("afm_scale", self.afm_scale, *AFM_SCALE_RANGE)


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
            text_embeds = prompt_embeddings(c["text_encoder"], self.tokenizer, [r.prompt for r in requests],
                                            [r.negative_prompt for r in requests], guidance)
        with timer.stage("image_encode"):
            tokens = image_tokens(c["image_encoder"], self.preset.image.image_size, [r.product for r in requests])
            if guidance.halves == 2:
                tokens = np.concatenate([tokens, np.repeat(self._unconditional_tokens(), len(requests), axis=0)])
        with timer.stage("vae_encode"):
            images = np.concatenate([to_model_image(product_only(r.product)) for r in requests])
            product_latent = run_cast(c["vae_encoder"], {"image": images})["latent"]
        with timer.stage("reference_unet"):
            states = run_cast(c["reference_unet"], {"product_latent": guidance.double(product_latent), "image_tokens": tokens})
            ref_kv = run_cast(c["afm_kv"], states)
        h, w = product_latent.shape[-2:]
        mask = np.stack([resize_mask_nearest(r.product.mask, h, w)[None] for r in requests])  # (B, 1, h, w)
        afm_scale = np.array([r.afm_scale for r in requests], dtype=np.float32)
        return Conditioning(Denoiser(
            components=[c[GUIDED_STEP] if self.fused else c[STEP]],
            conditioning={"text_embeds": text_embeds, "afm_scale": guidance.double(afm_scale), **ref_kv},
            sample=lambda latents: np.concatenate([latents, mask], axis=1),  # (B, 5, h, w)
        ))

    def _unconditional_tokens(self) -> np.ndarray:
        """The image tokens of a zero image: the same for every request, computed once."""
        if self._zero_image_tokens is None:
            size = self.preset.image.image_size
            zeros = np.zeros((1, 3, size, size), dtype=np.float32)
            self._zero_image_tokens = run_cast(self.components["image_encoder"], {"pixel_values": zeros})["image_tokens"]
        return self._zero_image_tokens


class RefAdGenDefinition(PipelineDefinition):
    name = "refadgen"
    spec_builders = PIPELINE_SPECS["refadgen"]
    options = ("product", "mask", "prompt", "negative_prompt", "width", "height", "steps", "guidance",
               "afm_scale", "seed", "scheduler")
    required = ("product", "prompt")
    step_components = (STEP,)
    guided_step = (STEP, ("sample", "timestep", "afm_scale"))


    def prepare(
        self,
        preset: Preset,
        prompt: str,
        negative_prompt: str = "",
        guidance: float | None = None,
        afm_scale: float | None = None,
        seed: int = 0,
        **common: Any,
    ) -> Prepared:
        return self.prepared(preset, common, lambda canvas, schedule: RefAdGenRequest(
            canvas, prompt, DEFAULT_AFM_SCALE if afm_scale is None else afm_scale,
            negative_prompt=negative_prompt, seed=seed, guidance=DEFAULT_GUIDANCE if guidance is None else guidance,
        ))

    def create(self, components: Mapping[str, Component], preset: Preset, weights: WeightsSource) -> RefAdGenPipeline:
        return RefAdGenPipeline(components, preset, load_tokenizer(preset, weights))

    def request_report(self, prepared: Prepared, output: object, index: int) -> dict:
        r = prepared.request
        return {"prompt": r.prompt, "negative_prompt": r.negative_prompt, "guidance": r.guidance, "afm_scale": r.afm_scale}

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
