"""Size presets: one frozen dataclass per preset (nanoGPT style).

`tiny` is for tests (seconds on CPU), `small` for CPU benchmarks, `sd15` has Stable Diffusion
1.5 dimensions. A preset sizes randomly initialised networks and bounds the canvas; with a
weights folder the networks' sizes come from the folder's configs instead
(runtime.artifacts.architecture), the canvas bounds still from the preset.

Tiny presets shrink widths, depths of the encoders and image sizes, never the structure: every
preset has the SD 1.5 U-Net block layout (3 cross-attention down blocks + 1 plain, 2 layers per
block, 16 self-attention layers) so the RefAdGen contract is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import InputError


@dataclass(frozen=True)
class UNetSize:
    block_out_channels: tuple[int, int, int, int]
    attention_head_dim: int  # diffusers' name; for SD 1.5 it is the number of heads (8)
    cross_attention_dim: int
    norm_num_groups: int = 32
    layers_per_block: int = 2


@dataclass(frozen=True)
class TextEncoderSize:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_length: int = 77
    vocab_size: int = 49408
    hidden_act: str = "quick_gelu"  # CLIP ViT-L (SD 1.5's text encoder)


@dataclass(frozen=True)
class ImageEncoderSize:
    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    resampler_depth: int
    resampler_heads: int
    resampler_dim_head: int
    num_tokens: int = 16
    hidden_act: str = "quick_gelu"  # OpenAI's CLIP towers; the ViT-H of IP-Adapter uses "gelu"


@dataclass(frozen=True)
class VAESize:
    block_out_channels: tuple[int, ...]
    norm_num_groups: int = 32
    latent_channels: int = 4
    scaling_factor: float = 0.18215


@dataclass(frozen=True)
class LayoutSize:
    """RADM: ResNet-50 + FPN backbone and the cascaded box heads (seed-networks.md)."""

    stem_channels: int  # ResNet-50: 64; bottleneck outputs are 4x, 8x, 16x, 32x this
    blocks: tuple[int, int, int, int]  # bottleneck blocks per stage; ResNet-50: (3, 4, 6, 3)
    fpn_channels: int  # 256
    hidden: int  # box feature width, 256
    heads: int  # self-attention heads over boxes, 8
    ffn: int  # 2048
    dynamic_dim: int  # dynamic conv, 64
    num_boxes: int  # noisy boxes per canvas, 100
    image_side: int  # long side of the backbone's input (multiple of 32)
    cascade: int = 6  # cascaded heads
    pooler: int = 7  # RoIAlign output side
    vtram_heads: int = 2
    gram_dim: int = 64
    num_classes: int = 4  # logo, text, underlay, embellishment
    max_texts: int = 20  # selling points per canvas
    # How the head turns the noisy normalized boxes into pixel proposals and its clean boxes back:
    # "whwh" scales x by the width (adgen); "hwhw" is RADM's reference, which reads the image shape
    # as (c, w, h) and so scales x by the HEIGHT (its weights were trained so; `adgen import radm`
    # records it in the head's config). The RoIs and the head's output boxes are true pixels either way.
    proposal_frame: str = "whwh"
    # RADM's reference views two tensors instead of transposing them, and its weights learned so:
    # the (20, 768) selling-point features viewed as (768, 20), and VTRAM's (49, C) output viewed
    # as (C, 49) before its mean. True follows it (and pads the texts to `max_texts` slots with
    # zeros, as its data loader does); `adgen import radm` records it in the head's config.
    reference_views: bool = False
    # Largest side of the backbone input the specs allow (0: image_side). sd15 allows RADM's
    # reference input (short side 800, long side up to 1333, padded to 32: runtime/specs/layout.py).
    max_input_side: int = 0

    @property
    def input_side_max(self) -> int:
        return self.max_input_side or self.image_side


@dataclass(frozen=True)
class PlanSize:
    """P&R PlanNet: the layout decoder (two FC layers + transformer blocks, adaLN on the timestep)."""

    hidden: int
    blocks: int
    heads: int


@dataclass(frozen=True)
class RenderSize:
    """P&R RenderNet: three-layer conv encoder (layout mask) + six-layer visual encoder (product)."""

    mask_channels: tuple[int, int, int]
    visual_channels: tuple[int, int, int, int, int, int]


@dataclass(frozen=True)
class Preset:
    name: str
    unet: UNetSize
    text: TextEncoderSize
    image: ImageEncoderSize
    vae: VAESize
    default_width: int
    default_height: int
    min_side: int
    max_side: int
    layout: LayoutSize
    plan: PlanSize
    render: RenderSize
    max_batch: int = 16  # U-Net batch: 2 x requests under classifier-free guidance
    # "" = the sizes above are this preset's own; else what defined them instead: the configs of a
    # weights folder (runtime.artifacts.architecture.weights_preset), named by their hash.
    architecture: str = ""

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def ref_layer_channels(self) -> tuple[int, ...]:
        """Channels of the 16 self-attention layers in U-Net order (down, mid, up)."""
        c = self.unet.block_out_channels
        down = [c[0], c[0], c[1], c[1], c[2], c[2]]
        mid = [c[3]]
        # up block 0 has no attention; up blocks 1..3 carry reversed(c)[1:]
        rc = tuple(reversed(c))
        up = [rc[1]] * 3 + [rc[2]] * 3 + [rc[3]] * 3
        return tuple(down + mid + up)

    @property
    def ref_layer_levels(self) -> tuple[int, ...]:
        """Downsampling level (0 = latent resolution) of each self-attention layer."""
        return (0, 0, 1, 1, 2, 2, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        unet=UNetSize((32, 32, 64, 64), attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8),
        text=TextEncoderSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        image=ImageEncoderSize(
            image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
            resampler_depth=1, resampler_heads=2, resampler_dim_head=16,
        ),
        vae=VAESize((8, 16, 32, 32), norm_num_groups=8),
        default_width=128,
        default_height=160,
        min_side=64,
        max_side=512,
        layout=LayoutSize(stem_channels=8, blocks=(1, 1, 1, 1), fpn_channels=32, hidden=32, heads=2, ffn=64,
                          dynamic_dim=8, num_boxes=16, image_side=128),
        plan=PlanSize(hidden=32, blocks=2, heads=2),
        render=RenderSize(mask_channels=(8, 16, 32), visual_channels=(8, 8, 16, 16, 32, 32)),
    ),
    "small": Preset(
        name="small",
        unet=UNetSize((64, 128, 256, 256), attention_head_dim=4, cross_attention_dim=256),
        text=TextEncoderSize(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
        image=ImageEncoderSize(
            image_size=112, patch_size=14, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
            resampler_depth=2, resampler_heads=4, resampler_dim_head=64,
        ),
        vae=VAESize((32, 64, 128, 128)),
        default_width=256,
        default_height=320,
        min_side=64,
        max_side=512,
        layout=LayoutSize(stem_channels=32, blocks=(3, 4, 6, 3), fpn_channels=128, hidden=128, heads=4, ffn=512,
                          dynamic_dim=32, num_boxes=100, image_side=384),
        plan=PlanSize(hidden=256, blocks=4, heads=4),
        render=RenderSize(mask_channels=(16, 32, 64), visual_channels=(16, 16, 32, 32, 64, 64)),
    ),
    "sd15": Preset(
        name="sd15",
        unet=UNetSize((320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768),
        text=TextEncoderSize(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
        image=ImageEncoderSize(
            image_size=224, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
            resampler_depth=4, resampler_heads=12, resampler_dim_head=64,
        ),
        vae=VAESize((128, 256, 512, 512)),
        default_width=512,
        default_height=640,
        min_side=256,
        max_side=1024,
        layout=LayoutSize(stem_channels=64, blocks=(3, 4, 6, 3), fpn_channels=256, hidden=256, heads=8, ffn=2048,
                          dynamic_dim=64, num_boxes=100, image_side=768, max_input_side=1344),
        plan=PlanSize(hidden=512, blocks=6, heads=8),
        render=RenderSize(mask_channels=(16, 32, 96), visual_channels=(32, 32, 96, 96, 256, 256)),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError("preset", f"expected one of {', '.join(PRESETS)}", repr(name)) from None
