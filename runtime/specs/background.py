"""Specs of the background pipeline's own components (arXiv 2312.13309, see
networks/background.py for the architecture and its assumptions).

- `style_branch`: the personalized generator, a ControlNet-like encoder over the reference ad's
  latent and its product mask. It takes neither the noisy latent nor the timestep nor text, so
  every output is a per-request invariant: it runs ONCE per request and the per-step U-Net
  takes its residuals as invariant inputs.
- `background_unet`: the category-common generator, an SD 1.5-layout U-Net with inpainting-style
  9-channel input and mask-aware cross-attention; it adds the branch's residuals to its skip
  connections (so they reach the decoder blocks). Runs every step.

The shared `text_encoder`, `vae_encoder` and `vae_decoder` are the RefAdGen ones, unchanged.
The residual layout (which level, how many channels) is derived here from the preset once;
the networks and the pipeline read it from here.
"""

from __future__ import annotations

from runtime.presets import Preset
from runtime.specs.core import ComponentSpec, DType, Precision, TensorSpec, build_specs
from runtime.specs.shared import (
    denoiser_dims,
    latent_tensor,
    scale_input,
    skip_residual_layout,
    skip_residual_names,
    skip_residuals,
    text_embeds_input,
    text_encoder_spec,
    timestep_input,
    vae_decoder_spec,
    vae_encoder_spec,
)

style_residual_layout = skip_residual_layout  # the style branch feeds every skip connection
STYLE_DOC = "zero wherever the target's product touches the cell"


def style_residual_names(preset: Preset) -> tuple[str, ...]:
    """`style_down_00` .. `style_down_11`, then `style_mid`: diffusers' down-block residual order."""
    return skip_residual_names("style", preset)


def _mask(name: str, doc: str) -> TensorSpec:
    return TensorSpec(name, DType.FLOAT32, ("B", 1, "latent_h", "latent_w"), invariant=True, limits=(0.0, 1.0), doc=doc)


def style_branch_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    f = precision.float_dtype
    return ComponentSpec(
        name="style_branch",
        inputs=(
            latent_tensor("reference_latent", preset, f, invariant=True,
                       doc="VAE latent of the reference ad, its product greyed out, resized to the canvas"),
            _mask("reference_mask", "1 on the reference ad's product, at latent size (nearest)"),
            _mask("product_mask", "1 on the TARGET's product, at latent size (nearest)"),
        ),
        outputs=skip_residuals("style", preset, f, invariant=True, doc=STYLE_DOC),
        dims=denoiser_dims(preset),
        doc=(
            "Personalized generator: ControlNet-like encoder over the reference (no text, no noisy latent, "
            "no timestep), outputs masked by the target's background. Per-request invariant: run once per request."
        ),
    )


def background_unet_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    f = precision.float_dtype
    t = preset.text
    return ComponentSpec(
        name="background_unet",
        inputs=(
            latent_tensor("sample", preset, f, doc="noisy latent"),
            timestep_input(),
            latent_tensor("product_latent", preset, f, invariant=True,
                       doc="VAE latent of the product on grey (inpainting's masked-image latent)"),
            _mask("product_mask", "1 on the product, at latent size (nearest)"),
            text_embeds_input(preset, f, doc='"a photo of C in the background of D"'),
            TensorSpec("class_tokens", DType.FLOAT32, ("B", t.max_length), invariant=True, limits=(0.0, 1.0),
                       doc="1 at the token positions of C; only product positions attend to them"),
            TensorSpec("identifier_tokens", DType.FLOAT32, ("B", t.max_length), invariant=True, limits=(0.0, 1.0),
                       doc="1 at the token positions of D; only background positions attend to them"),
            *skip_residuals("style", preset, f, invariant=True, doc=STYLE_DOC),
            scale_input("style_scale", "weight of the style residuals (0: category-common branch alone)"),
        ),
        outputs=(latent_tensor("noise_pred", preset, f),),
        dims=denoiser_dims(preset),
        doc=(
            "Category-common generator: SD 1.5 U-Net, conv_in 9 channels (noisy latent, mask, product latent), "
            "mask-aware cross-attention, style residuals added to the skip connections. Run every denoising step."
        ),
        constants={"mask_bias": MASK_BIAS},
    )


MASK_BIAS = -1.0e4  # additive attention bias on masked (query, token) pairs: exp(-1e4) is 0 in fp32 and fp16

BACKGROUND_COMPONENTS = (text_encoder_spec, vae_encoder_spec, style_branch_spec, background_unet_spec,
                         vae_decoder_spec)


def background_specs(preset: Preset, precision: Precision = Precision.FP32) -> dict[str, ComponentSpec]:
    return build_specs(BACKGROUND_COMPONENTS, preset, precision)
