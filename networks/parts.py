"""Every network a weights folder can hold (a "part"), by name: the config a randomly initialised
one is built from (the preset's sizes), how it is built from a config (the preset's or a weights
folder's `<part>/config.json`), and the seed offset of its random init.

Library networks (CLIP, the VAE, the U-Nets and the ControlNet) are built from their library
config, every field honoured; adgen's own networks (RADM, PlanNet, RenderNet, the style branch)
record their size dataclass as config and are built from the preset, whose sizes came from that
config (runtime.artifacts.architecture.weights_preset).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from torch import nn

from networks.background import CategoryUNet, StyleBranch
from networks.layout.backbone import LayoutBackbone
from networks.layout.head import LayoutHead
from networks.poster import PlanNet, PosterControlNet, PosterUNet, RenderNet, controlnet_config
from networks.refadgen import GenerationUNet, ReferenceUNet
from networks.sd import (
    image_encoder_config,
    image_encoder_from_config,
    text_config,
    text_encoder_from_config,
    unet_config,
    vae_config,
    vae_from_config,
)
from runtime.artifacts.architecture import (
    LAYOUT_BACKBONE_FIELDS,
    LAYOUT_HEAD_FIELDS,
    LAYOUT_PROPOSAL_FRAME,
    LAYOUT_REFERENCE_VIEWS,
    LAYOUT_TEXT_DIM,
)
from runtime.presets import Preset


@dataclass(frozen=True)
class PartType:
    config: Callable[[Preset], dict]  # the config of a randomly initialised part: the preset's sizes
    build: Callable[[dict, Preset], nn.Module]  # the network from a config (and the preset it fits)
    seed: int  # seed offset of its random init; shared networks get the same one in every pipeline
    doc: str


def _layout_backbone_config(preset: Preset) -> dict:
    return {name: getattr(preset.layout, name) for name in LAYOUT_BACKBONE_FIELDS}


def _layout_head_config(preset: Preset) -> dict:
    """RADM's head sizes and the width of the text features it reads."""
    return {name: getattr(preset.layout, name) for name in LAYOUT_HEAD_FIELDS} | {
        LAYOUT_TEXT_DIM: preset.text.hidden_size, LAYOUT_PROPOSAL_FRAME: preset.layout.proposal_frame,
        LAYOUT_REFERENCE_VIEWS: preset.layout.reference_views}


PARTS: dict[str, PartType] = {
    "text_encoder": PartType(lambda p: text_config(p).to_dict(), lambda c, p: text_encoder_from_config(c), 0,
                             "CLIP text encoder (transformers CLIPTextModel)"),
    "vae": PartType(vae_config, lambda c, p: vae_from_config(c), 1, "VAE (diffusers AutoencoderKL)"),
    "unet": PartType(lambda p: unet_config(p, p.latent_channels + 1), lambda c, p: GenerationUNet(c), 2,
                     "RefAdGen generation U-Net: 5-channel conv_in, AFM projections on its 16 self-attentions"),
    "reference_unet": PartType(lambda p: unet_config(p, p.latent_channels), lambda c, p: ReferenceUNet(c), 3,
                               "RefAdGen reference U-Net (SD 1.5 layout)"),
    "image_encoder": PartType(image_encoder_config, lambda c, p: image_encoder_from_config(c), 4,
                              "CLIP vision tower + IP-Adapter Plus resampler"),
    "background_unet": PartType(lambda p: unet_config(p, 2 * p.latent_channels + 1), lambda c, p: CategoryUNet(c), 10,
                                "category-common U-Net (mask-aware cross-attention, 9-channel conv_in)"),
    "style_branch": PartType(lambda p: asdict(p.unet), lambda c, p: StyleBranch(p), 11, "personalized style branch"),
    "layout_backbone": PartType(_layout_backbone_config, lambda c, p: LayoutBackbone(p), 20,
                                "RADM backbone: ResNet + FPN"),
    "layout_head": PartType(_layout_head_config, lambda c, p: LayoutHead(p, c[LAYOUT_TEXT_DIM]), 21, "RADM's cascaded relation-aware box heads"),
    "plannet": PartType(lambda p: asdict(p.plan), lambda c, p: PlanNet(p), 30, "P&R PlanNet (layout decoder)"),
    "render_cond": PartType(lambda p: asdict(p.render), lambda c, p: RenderNet(p), 31,
                            "P&R RenderNet (the ControlNet's conditioning)"),
    "controlnet": PartType(controlnet_config, lambda c, p: PosterControlNet(c), 32,
                           "ControlNet trunk of the poster (conditioning embedding replaced by RenderNet)"),
    "poster_unet": PartType(lambda p: unet_config(p, p.latent_channels), lambda c, p: PosterUNet(c), 33,
                            "poster U-Net (SD 1.5)"),
}
