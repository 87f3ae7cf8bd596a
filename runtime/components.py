"""The specs of every exported component, built from a size preset.

Shared components (text_encoder, image_encoder, vae_encoder, vae_decoder) and the RefAdGen
ones (reference_unet, afm_kv, unet). Batch `B` is the network batch: 2 x requests under
classifier-free guidance. Latent dims `latent_h`/`latent_w` are image size / 8; any integer
in bounds works because the exported U-Net carries explicit upsample sizes.
"""

from __future__ import annotations

from runtime.errors import InputError
from runtime.presets import Preset
from runtime.specs import ComponentSpec, DerivedDim, Dim, DType, Precision, TensorSpec

NUM_REF_LAYERS = 16


def ref_layer_name(kind: str, index: int) -> str:
    """`ref_state_03`, `ref_key_03`, `ref_value_03`: per self-attention layer, in U-Net order."""
    return f"ref_{kind}_{index:02d}"


def network_batch(preset: Preset) -> Dim:
    return Dim("B", 1, 2, preset.max_batch)


def latent_dims(preset: Preset) -> tuple[Dim, Dim]:
    s = preset.vae_scale
    return (
        Dim("latent_h", preset.min_side // s, preset.default_height // s, preset.max_side // s),
        Dim("latent_w", preset.min_side // s, preset.default_width // s, preset.max_side // s),
    )


LEVELS = 4  # SD 1.5: latent resolution and three stride-2 downsamplings


def skip_residual_layout(preset: Preset) -> tuple[tuple[int, int], ...]:
    """(level, channels) of every skip connection the U-Net decoder consumes, then the mid block.

    conv_in output, then per down block its `layers_per_block` resnet outputs and (all but the
    last block) its downsampler output, then the mid block output: 12 + 1 for SD 1.5. A branch
    that adds residuals to them (ControlNet, the background style branch) returns this layout.
    """
    c = preset.unet.block_out_channels
    layout = [(0, c[0])]
    for level, channels in enumerate(c):
        layout += [(level, channels)] * preset.unet.layers_per_block
        if level < len(c) - 1:
            layout.append((level + 1, channels))
    layout.append((len(c) - 1, c[-1]))
    return tuple(layout)


def skip_residual_names(prefix: str, preset: Preset) -> tuple[str, ...]:
    """`{prefix}_down_00` .. `{prefix}_down_11`, then `{prefix}_mid`: diffusers' residual order."""
    return tuple(f"{prefix}_down_{i:02d}" for i in range(len(skip_residual_layout(preset)) - 1)) + (f"{prefix}_mid",)


def level_dims() -> tuple[DerivedDim, ...]:
    """`latent_h_l1` .. `latent_w_l3`: a stride-2 convolution with padding 1 (and a ceil-mode max
    pool) maps n to ceil(n / 2)."""
    return tuple(
        DerivedDim(f"{axis}_l{level}", ((axis, 1, 2**level),))
        for level in range(1, LEVELS)
        for axis in ("latent_h", "latent_w")
    )


def level_shape(level: int) -> tuple[str, str]:
    if level == 0:
        return ("latent_h", "latent_w")
    return (f"latent_h_l{level}", f"latent_w_l{level}")


def _token_dims(preset: Preset) -> list[DerivedDim]:
    return [
        DerivedDim(f"tokens_l{level}", (("latent_h", 1, 2**level), ("latent_w", 1, 2**level)))
        for level in range(4)
    ]


def text_encoder_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    t = preset.text
    return ComponentSpec(
        name="text_encoder",
        inputs=(TensorSpec("input_ids", DType.INT64, ("B", t.max_length), value_range=(0, t.vocab_size)),),
        outputs=(TensorSpec("text_embeds", precision.float_dtype, ("B", t.max_length, t.hidden_size)),),
        dims=(network_batch(preset),),
        doc="CLIP text encoder: token ids -> last hidden state (the U-Net's cross-attention context).",
    )


def image_encoder_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    i = preset.image
    return ComponentSpec(
        name="image_encoder",
        inputs=(TensorSpec("pixel_values", precision.float_dtype, ("B", 3, i.image_size, i.image_size)),),
        outputs=(TensorSpec("image_tokens", precision.float_dtype, ("B", i.num_tokens, preset.unet.cross_attention_dim)),),
        dims=(network_batch(preset),),
        doc="CLIP vision tower (penultimate hidden state) + resampler: product image -> 16 context tokens.",
    )


def vae_encoder_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    s = preset.vae_scale
    return ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("image", precision.float_dtype, ("B", 3, "height", "width"), doc="RGB in [-1, 1]"),),
        outputs=(TensorSpec("latent", precision.float_dtype, ("B", preset.latent_channels, "latent_h", "latent_w"),
                            doc="posterior mode x scaling factor"),),
        dims=(
            network_batch(preset),
            Dim("height", preset.min_side, preset.default_height, preset.max_side, multiple=s),
            Dim("width", preset.min_side, preset.default_width, preset.max_side, multiple=s),
            DerivedDim("latent_h", (("height", 1, s),)),
            DerivedDim("latent_w", (("width", 1, s),)),
        ),
        doc="VAE encoder: image -> scaled latent.",
    )


def vae_decoder_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    s = preset.vae_scale
    return ComponentSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent", precision.float_dtype, ("B", preset.latent_channels, "latent_h", "latent_w")),),
        outputs=(TensorSpec("image", precision.float_dtype, ("B", 3, "height", "width"), doc="RGB in about [-1, 1]"),),
        dims=(
            network_batch(preset),
            *latent_dims(preset),
            DerivedDim("height", (("latent_h", s, 1),)),
            DerivedDim("width", (("latent_w", s, 1),)),
        ),
        doc="VAE decoder: scaled latent -> image.",
    )


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
            TensorSpec("product_latent", f, ("B", preset.latent_channels, "latent_h", "latent_w"), invariant=True),
            TensorSpec("image_tokens", f, ("B", preset.image.num_tokens, preset.unet.cross_attention_dim), invariant=True),
        ),
        outputs=_ref_tensors(preset, "state", f, invariant=True),
        dims=(network_batch(preset), *latent_dims(preset), *_token_dims(preset)),
        doc="Reference U-Net at t = 0: the input of each of its 16 self-attention layers. Run once per request.",
    )


def afm_kv_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    """Bias-free AFM key/value projections of the reference states, hoisted out of the step loop."""
    f = precision.float_dtype
    s = preset.vae_scale
    lo, hi = preset.min_side // s, preset.max_side // s
    h, w = preset.default_height // s, preset.default_width // s
    tokens = tuple(
        Dim(f"tokens_l{level}", _tokens(lo, level) ** 2, _tokens(h, level) * _tokens(w, level), _tokens(hi, level) ** 2)
        for level in range(4)
    )
    return ComponentSpec(
        name="afm_kv",
        inputs=_ref_tensors(preset, "state", f, invariant=True),
        outputs=_ref_tensors(preset, "key", f, invariant=True) + _ref_tensors(preset, "value", f, invariant=True),
        dims=(network_batch(preset), *tokens),
        doc="AFM: K_ref = W_k^ref s, V_ref = W_v^ref s for each of the 16 layers. Run once per request.",
    )


def _tokens(side: int, level: int) -> int:
    return -(-side // 2**level)


def unet_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    f = precision.float_dtype
    t = preset.text
    return ComponentSpec(
        name="unet",
        inputs=(
            TensorSpec("sample", f, ("B", preset.latent_channels + 1, "latent_h", "latent_w"),
                       doc="concat(noisy latent, product mask at latent size)"),
            TensorSpec("timestep", DType.FLOAT32, ("B",), value_range=(0, 999), doc="per sample"),
            TensorSpec("text_embeds", f, ("B", t.max_length, preset.unet.cross_attention_dim), invariant=True),
            *_ref_tensors(preset, "key", f, invariant=True),
            *_ref_tensors(preset, "value", f, invariant=True),
            TensorSpec("afm_scale", DType.FLOAT32, ("B",), invariant=True, value_range=(0.5, 1.5)),
        ),
        outputs=(TensorSpec("noise_pred", f, ("B", preset.latent_channels, "latent_h", "latent_w")),),
        dims=(network_batch(preset), *latent_dims(preset), *_token_dims(preset)),
        doc="Generation U-Net, 5-channel conv_in, AFM self-attention. Run every denoising step.",
    )


REFADGEN_SPEC_BUILDERS = {
    "text_encoder": text_encoder_spec,
    "image_encoder": image_encoder_spec,
    "vae_encoder": vae_encoder_spec,
    "reference_unet": reference_unet_spec,
    "afm_kv": afm_kv_spec,
    "unet": unet_spec,
    "vae_decoder": vae_decoder_spec,
}


def refadgen_specs(preset: Preset, precision: Precision = Precision.FP32) -> dict[str, ComponentSpec]:
    return {name: build(preset, precision) for name, build in REFADGEN_SPEC_BUILDERS.items()}



def canvas_env(preset: Preset, width: int, height: int) -> dict[str, int]:
    """Every size dim the specs name, for one canvas: what a fixed-size engine profile pins."""
    s = preset.vae_scale
    if width % s or height % s:
        raise InputError("sizes", f"expected multiples of {s}", f"{width}x{height}")
    h, w = height // s, width // s
    env = {"height": height, "width": width, "latent_h": h, "latent_w": w}
    env.update({f"tokens_l{level}": _tokens(h, level) * _tokens(w, level) for level in range(4)})
    return env
