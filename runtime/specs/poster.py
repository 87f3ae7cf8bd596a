"""Specs of the poster pipeline's own components: Planning & Rendering (P&R, arXiv 2312.08822;
see networks/poster.py for the architecture and its assumptions).

- `plannet`: the layout decoder. One denoising step of DiffusionDet-style box diffusion: the
  noisy layout (one box per selling point, scaled (cx, cy, w, h)) and the timestep in, the
  predicted clean layout out as (x0, y0, x1, y1) in [0, 1]. Its image and text conditioning are
  per-request invariants; the layout and the timestep change every step.
- `render_cond`: RenderNet's encoders and spatial fusion: the planned layout's mask and the
  product image -> ControlNet's conditioning features at latent size. Once per request.
- `controlnet`: the ControlNet that guides Stable Diffusion, with RenderNet in place of its
  conditioning embedding. Reads the noisy latent and the timestep, so it runs every step.
- `poster_unet`: the SD 1.5 U-Net, adding the ControlNet residuals to its skip connections.

Shared components: `text_encoder` (prompt, and one pooled vector per selling point),
`image_encoder` (product canvas -> tokens, as RefAdGen's) and `vae_decoder`.
"""

from __future__ import annotations

from runtime.presets import Preset
from runtime.specs.background import MASK_BIAS
from runtime.specs.core import ComponentSpec, Dim, DType, Precision, TensorSpec, build_specs
from runtime.specs.layout import BOX_SCALE, BOX_TRAIN_STEPS
from runtime.specs.shared import (
    canvas_dims,
    denoiser_dims,
    denoiser_inputs,
    image_encoder_spec,
    latent_tensor,
    network_batch,
    scale_input,
    skip_residual_names,
    skip_residuals,
    text_encoder_spec,
    timestep_input,
    vae_decoder_spec,
)


def control_residual_names(preset: Preset) -> tuple[str, ...]:
    """`control_down_00` .. `control_down_11`, then `control_mid`: diffusers' residual order."""
    return skip_residual_names("control", preset)


def plannet_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    f = precision.float_dtype
    return ComponentSpec(
        name="plannet",
        inputs=(
            TensorSpec("layout", f, ("B", "texts", 4), value_range=(-BOX_SCALE, BOX_SCALE),
                       doc="noisy boxes, (cx, cy, w, h) in [0, 1] mapped to [-2, 2] (DiffusionDet)"),
            timestep_input(BOX_TRAIN_STEPS),
            TensorSpec("image_tokens", f, ("B", preset.image.num_tokens, preset.unet.cross_attention_dim), invariant=True,
                       doc="image_encoder output on the product canvas"),
            TensorSpec("text_features", f, ("B", "texts", preset.text.hidden_size), invariant=True,
                       doc="one pooled text_encoder vector per selling point"),
            TensorSpec("text_mask", DType.FLOAT32, ("B", "texts"), invariant=True, limits=(0.0, 1.0),
                       doc="1 for a real selling point, 0 for padding"),
        ),
        outputs=(TensorSpec("layout_pred", f, ("B", "texts", 4),
                            doc="predicted clean boxes (x0, y0, x1, y1) in [0, 1], x0 <= x1, y0 <= y1"),),
        dims=(Dim("B", 1, 1, preset.max_batch), Dim("texts", 1, 4, preset.layout.max_texts)),
        doc=(
            "PlanNet layout decoder: noisy layout + timestep -> clean layout, conditioned on the product's image "
            "tokens and the selling points' text features. Run every layout denoising step."
        ),
        constants={"mask_bias": MASK_BIAS, "layout_scale": BOX_SCALE},
    )


def render_cond_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    f = precision.float_dtype
    return ComponentSpec(
        name="render_cond",
        inputs=(
            TensorSpec("layout_mask", DType.FLOAT32, ("B", 1, "height", "width"), invariant=True, limits=(0.0, 1.0),
                       doc="1 inside the planned text boxes, at canvas size"),
            TensorSpec("product_image", f, ("B", 3, "height", "width"), invariant=True,
                       doc="RGB in [-1, 1]: the product on grey at canvas size"),
        ),
        outputs=(latent_tensor("control_cond", preset, f, preset.unet.block_out_channels[0], invariant=True,
                               doc="fused layout and visual features; ControlNet adds them after conv_in"),),
        dims=(network_batch(preset), *canvas_dims(preset)),
        doc="RenderNet: layout-mask encoder + product visual encoder + spatial fusion. Run once per request.",
    )


def controlnet_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    f = precision.float_dtype
    return ComponentSpec(
        name="controlnet",
        inputs=(
            *denoiser_inputs(preset, f),
            latent_tensor("control_cond", preset, f, preset.unet.block_out_channels[0], invariant=True,
                          doc="render_cond output"),
            scale_input("control_scale", "ControlNet conditioning scale per sample; multiplies every residual"),
        ),
        outputs=skip_residuals("control", preset, f, doc="times control_scale"),
        dims=denoiser_dims(preset),
        doc="ControlNet (SD 1.5 encoder copy, zero convs) conditioned on RenderNet's features. Run every step.",
    )


def poster_unet_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    f = precision.float_dtype
    return ComponentSpec(
        name="poster_unet",
        inputs=(
            *denoiser_inputs(preset, f),
            *skip_residuals("control", preset, f, doc="times control_scale"),
        ),
        outputs=(latent_tensor("noise_pred", preset, f),),
        dims=denoiser_dims(preset),
        doc="SD 1.5 U-Net with the ControlNet residuals added to its skip connections. Run every step.",
    )


POSTER_COMPONENTS = (text_encoder_spec, image_encoder_spec, plannet_spec, render_cond_spec, controlnet_spec,
                     poster_unet_spec, vae_decoder_spec)


def poster_specs(preset: Preset, precision: Precision = Precision.FP32) -> dict[str, ComponentSpec]:
    return build_specs(POSTER_COMPONENTS, preset, precision)
