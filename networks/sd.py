"""Stable Diffusion 1.5 parts every pipeline shares: transformers' CLIP text and vision models,
diffusers' resampler, AutoencoderKL, and the SD 1.5 U-Net layout at a preset's widths.

Each network has a config: `*_config(preset)` sizes a randomly initialised one, a weights folder's
`<part>/config.json` a trained one; `*_from_config` builds either (networks/parts.py).

Each wrapper's forward takes its spec's inputs positionally and returns its outputs, so export
and the torch backend call every component the same way.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from runtime.artifacts.architecture import SD_DOWN_BLOCKS, SD_UP_BLOCKS
from runtime.presets import ImageEncoderSize, Preset, TextEncoderSize


def _clip_size(size: TextEncoderSize | ImageEncoderSize) -> dict:
    """The transformer sizes CLIP's text and vision configs share."""
    return dict(
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        hidden_act=size.hidden_act,
        projection_dim=size.hidden_size,
    )


def text_config(preset: Preset) -> CLIPTextConfig:
    t = preset.text
    return CLIPTextConfig(vocab_size=t.vocab_size, max_position_embeddings=t.max_length, **_clip_size(t))


def vision_config(preset: Preset) -> CLIPVisionConfig:
    i = preset.image
    return CLIPVisionConfig(image_size=i.image_size, patch_size=i.patch_size, **_clip_size(i))


def vae_config(preset: Preset) -> dict:
    v = preset.vae
    n = len(v.block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=v.block_out_channels,
        layers_per_block=2,
        latent_channels=v.latent_channels,
        norm_num_groups=v.norm_num_groups,
        scaling_factor=v.scaling_factor,
        sample_size=preset.default_height,
    )


class TextEncoder(nn.Module):
    """forward(input_ids (B, 77) int64) -> text_embeds (B, 77, C): CLIP's last hidden state."""

    def __init__(self, model: CLIPTextModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).last_hidden_state


class ImageEncoder(nn.Module):
    """forward(pixel_values (B, 3, S, S)) -> image_tokens (B, 16, C).

    CLIP vision tower, penultimate hidden state (as IP-Adapter Plus), then a perceiver
    resampler with 16 learned queries.
    """

    def __init__(self, vision: CLIPVisionModel, resampler: IPAdapterPlusImageProjection):
        super().__init__()
        self.vision = vision
        self.resampler = resampler

    def forward(self, pixel_values):
        hidden = self.vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
        return self.resampler(hidden)


class VAEEncoder(nn.Module):
    """forward(image (B, 3, H, W) in [-1, 1]) -> latent (B, 4, H/8, W/8), latent_std (same): the
    posterior's mode and standard deviation, both x scale (a sample is latent + latent_std * noise;
    diffusers' DiagonalGaussianDistribution, log-variance clamped to [-30, 20])."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        moments = self.vae.quant_conv(self.vae.encoder(image))
        mean, logvar = moments.chunk(2, dim=1)
        scale = self.vae.config.scaling_factor
        return mean * scale, torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * scale


class VAEDecoder(nn.Module):
    """forward(latent (B, 4, h, w)) -> image (B, 3, 8h, 8w), about [-1, 1]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        z = self.vae.post_quant_conv(latent / self.vae.config.scaling_factor)
        return self.vae.decoder(z)


def vae_from_config(config: dict) -> AutoencoderKL:
    return AutoencoderKL.from_config(diffusers_config(config))


def text_encoder_from_config(config: dict) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig.from_dict(config))


def resampler_config(preset: Preset) -> dict:
    """IP-Adapter Plus resampler (diffusers' IPAdapterPlusImageProjection) at the preset's sizes."""
    i = preset.image
    return dict(
        embed_dims=i.hidden_size,
        output_dims=preset.unet.cross_attention_dim,
        hidden_dims=i.resampler_heads * i.resampler_dim_head,
        depth=i.resampler_depth,
        dim_head=i.resampler_dim_head,
        heads=i.resampler_heads,
        num_queries=i.num_tokens,
        ffn_ratio=4,
    )


def image_encoder_config(preset: Preset) -> dict:
    """The image encoder's config: its CLIP vision tower's and its resampler's."""
    return {"vision": vision_config(preset).to_dict(), "resampler": resampler_config(preset)}


def image_encoder_from_config(config: dict) -> ImageEncoder:
    return ImageEncoder(CLIPVisionModel(CLIPVisionConfig.from_dict(config["vision"])),
                        IPAdapterPlusImageProjection(**config["resampler"]))


def unet_config(preset: Preset, in_channels: int) -> dict:
    """diffusers config of an SD 1.5-layout U-Net at the preset's widths."""
    u = preset.unet
    return dict(
        sample_size=preset.default_height // preset.vae_scale,
        in_channels=in_channels,
        out_channels=preset.latent_channels,
        down_block_types=SD_DOWN_BLOCKS,
        up_block_types=SD_UP_BLOCKS,
        block_out_channels=u.block_out_channels,
        layers_per_block=u.layers_per_block,
        cross_attention_dim=u.cross_attention_dim,
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
    )


def diffusers_config(config: dict) -> dict:
    """A diffusers config without its bookkeeping keys (`_class_name`, `_diffusers_version`)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def for_inference(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """`modules` in eval mode without gradients (what export and the torch backend run)."""
    for module in modules.values():
        module.eval().requires_grad_(False)
    return modules
