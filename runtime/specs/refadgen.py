"""Specs of the RefAdGen components: reference_unet, afm_kv and the per-step unet (the shared
encoders and VAE are in runtime.specs.shared).
"""

from __future__ import annotations

from runtime.presets import Preset
from runtime.specs.core import ComponentSpec, DerivedDim, Dim, DType, Precision, TensorSpec, build_specs
from runtime.specs.shared import (
    denoiser_inputs,
    image_encoder_spec,
    latent_dims,
    latent_tensor,
    level_size,
    network_batch,
    scale_input,
    text_encoder_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)

NUM_REF_LAYERS = 16


def ref_layer_name(kind: str, index: int) -> str:
    """`ref_state_03`, `ref_key_03`, `ref_value_03`: per self-attention layer, in U-Net order."""
    return f"ref_{kind}_{index:02d}"


def token_dims() -> list[DerivedDim]:
    """`tokens_l0` .. `tokens_l3`: the self-attention token count at each level."""
    return [
        DerivedDim(f"tokens_l{level}", (("latent_h", 1, 2**level), ("latent_w", 1, 2**level)))
        for level in range(4)
    ]


def _ref_tensors(preset: Preset, kind: str, dtype: DType, invariant: bool) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(ref_layer_name(kind, i), dtype, ("B", f"tokens_l{level}", channels), invariant=invariant)
        for i, (level, channels) in enumerate(zip(preset.ref_layer_levels, preset.ref_layer_channels))
    )


def reference_unet_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    f = precision.float_dtype
    return ComponentSpec(
        name="reference_unet",
        inputs=(
            latent_tensor("product_latent", preset, f, invariant=True),
            TensorSpec("image_tokens", f, ("B", preset.image.num_tokens, preset.unet.cross_attention_dim), invariant=True),
        ),
        outputs=_ref_tensors(preset, "state", f, invariant=True),
        dims=(network_batch(preset), *latent_dims(preset), *token_dims()),
        doc="Reference U-Net at t = 0: the input of each of its 16 self-attention layers. Run once per request.",
    )


def afm_kv_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    """Bias-free AFM key/value projections of the reference states, hoisted out of the step loop."""
    f = precision.float_dtype
    s = preset.vae_scale
    lo, hi = preset.min_side // s, preset.max_side // s
    h, w = preset.default_height // s, preset.default_width // s
    tokens = tuple(
        Dim(f"tokens_l{level}", level_size(lo, level) ** 2, level_size(h, level) * level_size(w, level), level_size(hi, level) ** 2)
        for level in range(4)
    )
    return ComponentSpec(
        name="afm_kv",
        inputs=_ref_tensors(preset, "state", f, invariant=True),
        outputs=_ref_tensors(preset, "key", f, invariant=True) + _ref_tensors(preset, "value", f, invariant=True),
        dims=(network_batch(preset), *tokens),
        doc="AFM: K_ref = W_k^ref s, V_ref = W_v^ref s for each of the 16 layers. Run once per request.",
    )


def unet_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    f = precision.float_dtype
    return ComponentSpec(
        name="unet",
        inputs=(
            *denoiser_inputs(preset, f, preset.latent_channels + 1, "concat(noisy latent, product mask at latent size)"),
            *_ref_tensors(preset, "key", f, invariant=True),
            *_ref_tensors(preset, "value", f, invariant=True),
            scale_input("afm_scale", "weight of the reference attention"),
        ),
        outputs=(latent_tensor("noise_pred", preset, f),),
        dims=(network_batch(preset), *latent_dims(preset), *token_dims()),
        doc="Generation U-Net, 5-channel conv_in, AFM self-attention. Run every denoising step.",
    )


REFADGEN_COMPONENTS = (text_encoder_spec, image_encoder_spec, vae_encoder_spec, reference_unet_spec, afm_kv_spec,
                       unet_spec, vae_decoder_spec)


def refadgen_specs(preset: Preset, precision: Precision = Precision.FP32) -> dict[str, ComponentSpec]:
    return build_specs(REFADGEN_COMPONENTS, preset, precision)
