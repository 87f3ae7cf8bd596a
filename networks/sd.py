"""Stable Diffusion 1.5 parts every pipeline shares: transformers' CLIP text and vision models,
diffusers' resampler, AutoencoderKL, and the SD 1.5 U-Net layout at a preset's widths.

Each wrapper's forward takes its spec's inputs positionally and returns its outputs, so export
and the torch backend call every component the same way.
"""

from __future__ import annotations

from diffusers import AutoencoderKL
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from networks.weights import seeded
from runtime.presets import Preset

# Random init draws each shared network from its own seed offset, the same in every pipeline, so
# one seed gives every pipeline the same text encoder, VAE and image encoder.
TEXT_ENCODER_SEED = 0
VAE_SEED = 1
IMAGE_ENCODER_SEED = 4


def text_config(preset: Preset) -> CLIPTextConfig:
    t = preset.text
    return CLIPTextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        max_position_embeddings=t.max_length,
        hidden_act="quick_gelu",
        projection_dim=t.hidden_size,
    )


def vision_config(preset: Preset) -> CLIPVisionConfig:
    i = preset.image
    return CLIPVisionConfig(
        hidden_size=i.hidden_size,
        intermediate_size=i.intermediate_size,
        num_hidden_layers=i.num_layers,
        num_attention_heads=i.num_heads,
        image_size=i.image_size,
        patch_size=i.patch_size,
        hidden_act="quick_gelu",
        projection_dim=i.hidden_size,
    )


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


def build_resampler(preset: Preset) -> IPAdapterPlusImageProjection:
    i = preset.image
    return IPAdapterPlusImageProjection(
        embed_dims=i.hidden_size,
        output_dims=preset.unet.cross_attention_dim,
        hidden_dims=i.resampler_heads * i.resampler_dim_head,
        depth=i.resampler_depth,
        dim_head=i.resampler_dim_head,
        heads=i.resampler_heads,
        num_queries=i.num_tokens,
    )


class VAEEncoder(nn.Module):
    """forward(image (B, 3, H, W) in [-1, 1]) -> latent (B, 4, H/8, W/8): posterior mode x scale."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        moments = self.vae.quant_conv(self.vae.encoder(image))
        mean = moments[:, : self.vae.config.latent_channels]
        return mean * self.vae.config.scaling_factor


class VAEDecoder(nn.Module):
    """forward(latent (B, 4, h, w)) -> image (B, 3, 8h, 8w), about [-1, 1]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        z = self.vae.post_quant_conv(latent / self.vae.config.scaling_factor)
        return self.vae.decoder(z)


def vae_from_preset(preset: Preset) -> AutoencoderKL:
    return AutoencoderKL(**vae_config(preset))


def new_image_encoder(preset: Preset) -> ImageEncoder:
    """CLIP vision tower + resampler at the preset's sizes, freshly initialised."""
    return ImageEncoder(CLIPVisionModel(vision_config(preset)), build_resampler(preset))


def unet_config(preset: Preset, in_channels: int) -> dict:
    """diffusers config of an SD 1.5-layout U-Net at the preset's widths."""
    u = preset.unet
    return dict(
        sample_size=preset.default_height // preset.vae_scale,
        in_channels=in_channels,
        out_channels=preset.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=u.block_out_channels,
        layers_per_block=u.layers_per_block,
        cross_attention_dim=u.cross_attention_dim,
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
    )


def random_text_model(preset: Preset, seed: int) -> CLIPTextModel:
    return seeded(seed, TEXT_ENCODER_SEED, lambda: CLIPTextModel(text_config(preset)))


def random_vae(preset: Preset, seed: int) -> AutoencoderKL:
    return seeded(seed, VAE_SEED, lambda: vae_from_preset(preset))


def random_image_encoder(preset: Preset, seed: int) -> ImageEncoder:
    return seeded(seed, IMAGE_ENCODER_SEED, lambda: new_image_encoder(preset))
