"""Specs of the components every pipeline shares (text_encoder, image_encoder, vae_encoder,
vae_decoder) and the dims every U-Net-shaped spec uses, built from a size preset.

Batch `B` is the network batch: 2 x requests under classifier-free guidance. Latent dims
`latent_h`/`latent_w` are image size / 8; any integer in bounds works because the exported
U-Net carries explicit upsample sizes.
"""

from __future__ import annotations

from runtime.errors import InputError
from runtime.presets import Preset, UNetSize
from runtime.specs.core import ComponentSpec, DerivedDim, Dim, DType, Precision, TensorSpec

LATENT_TRAIN_STEPS = 1000  # SD 1.5's training timesteps: a U-Net's timestep input lies in [0, 999]


def timestep_input(train_steps: int = LATENT_TRAIN_STEPS) -> TensorSpec:
    """The per-sample timestep every denoiser takes, (B,) float32 in [0, train_steps - 1]."""
    return TensorSpec("timestep", DType.FLOAT32, ("B",), limits=(0, train_steps - 1), doc="per sample")


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
    return unet_skip_layout(preset.unet)


def unet_skip_layout(unet: UNetSize) -> tuple[tuple[int, int], ...]:
    """`skip_residual_layout` of a U-Net of sizes `unet`."""
    c = unet.block_out_channels
    layout = [(0, c[0])]
    for level, channels in enumerate(c):
        layout += [(level, channels)] * unet.layers_per_block
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


def skip_residuals(prefix: str, preset: Preset, dtype: DType, invariant: bool = False, doc: str = "") -> tuple[TensorSpec, ...]:
    """One tensor per skip connection the U-Net decoder consumes (`skip_residual_layout`), named
    `skip_residual_names(prefix)`: what a ControlNet-like branch adds to the U-Net."""
    return tuple(
        TensorSpec(name, dtype, ("B", channels, *level_shape(level)), invariant=invariant, doc=f"level {level}; {doc}")
        for name, (level, channels) in zip(skip_residual_names(prefix, preset), skip_residual_layout(preset))
    )


def denoiser_dims(preset: Preset) -> tuple[Dim | DerivedDim, ...]:
    """The dims of a U-Net-shaped component: batch, latent size, and the latent size at each level."""
    return (network_batch(preset), *latent_dims(preset), *level_dims())


def latent_tensor(name: str, preset: Preset, dtype: DType, channels: int | None = None, **kw: object) -> TensorSpec:
    """A (B, C, latent_h, latent_w) tensor; C the preset's latent channels unless given."""
    c = preset.latent_channels if channels is None else channels
    return TensorSpec(name, dtype, ("B", c, "latent_h", "latent_w"), **kw)  # type: ignore[arg-type]


def scale_input(name: str, doc: str = "") -> TensorSpec:
    """A per-request weight, (B,) float32 (sample inputs draw it around 1)."""
    return TensorSpec(name, DType.FLOAT32, ("B",), invariant=True, value_range=(0.5, 1.5), doc=doc)


def denoiser_inputs(preset: Preset, dtype: DType, sample_channels: int | None = None,
                    sample_doc: str = "noisy latent") -> tuple[TensorSpec, TensorSpec, TensorSpec]:
    """`sample`, `timestep` and `text_embeds`: the inputs a U-Net-shaped denoiser starts with."""
    return (
        latent_tensor("sample", preset, dtype, sample_channels, doc=sample_doc),
        timestep_input(),
        text_embeds_input(preset, dtype),
    )


def text_embeds_input(preset: Preset, dtype: DType, doc: str = "") -> TensorSpec:
    """The text encoder's output as a denoiser's cross-attention context, per request."""
    return TensorSpec("text_embeds", dtype, ("B", preset.text.max_length, preset.unet.cross_attention_dim),
                      invariant=True, doc=doc)


def canvas_dims(preset: Preset) -> tuple[Dim | DerivedDim, ...]:
    """`height`, `width` (canvas pixels, multiples of the VAE scale) and the latent size they give."""
    s = preset.vae_scale
    return (
        Dim("height", preset.min_side, preset.default_height, preset.max_side, multiple=s),
        Dim("width", preset.min_side, preset.default_width, preset.max_side, multiple=s),
        DerivedDim("latent_h", (("height", 1, s),)),
        DerivedDim("latent_w", (("width", 1, s),)),
    )


def text_encoder_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    t = preset.text
    return ComponentSpec(
        name="text_encoder",
        inputs=(TensorSpec("input_ids", DType.INT64, ("B", t.max_length), limits=(0, t.vocab_size - 1)),),
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
    return ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("image", precision.float_dtype, ("B", 3, "height", "width"), doc="RGB in [-1, 1]"),),
        outputs=(
            latent_tensor("latent", preset, precision.float_dtype, doc="posterior mode x scaling factor"),
            latent_tensor("latent_std", preset, precision.float_dtype,
                          doc="posterior standard deviation x scaling factor: a sample is latent + latent_std * noise"),
        ),
        dims=(network_batch(preset), *canvas_dims(preset)),
        doc="VAE encoder: image -> the scaled latent posterior (mode and standard deviation).",
    )


def vae_decoder_spec(preset: Preset, precision: Precision = Precision.FP32) -> ComponentSpec:
    s = preset.vae_scale
    return ComponentSpec(
        name="vae_decoder",
        inputs=(latent_tensor("latent", preset, precision.float_dtype),),
        outputs=(TensorSpec("image", precision.float_dtype, ("B", 3, "height", "width"), doc="RGB in about [-1, 1]"),),
        dims=(
            network_batch(preset),
            *latent_dims(preset),
            DerivedDim("height", (("latent_h", s, 1),)),
            DerivedDim("width", (("latent_w", s, 1),)),
        ),
        doc="VAE decoder: scaled latent -> image.",
    )


def level_size(side: int, level: int) -> int:
    """Latent side `side` after `level` stride-2 downsamplings: ceil(side / 2^level)."""
    return -(-side // 2**level)


def canvas_env(preset: Preset, width: int, height: int) -> dict[str, int]:
    """Every size dim the specs name, for one canvas: what a fixed-size engine profile pins."""
    s = preset.vae_scale
    if width % s or height % s:
        raise InputError("sizes", f"expected multiples of {s}", f"{width}x{height}")
    h, w = height // s, width // s
    env = {"height": height, "width": width, "latent_h": h, "latent_w": w}
    env.update({f"tokens_l{level}": level_size(h, level) * level_size(w, level) for level in range(4)})
    return env
