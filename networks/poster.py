"""Planning & Rendering poster generation (P&R, arXiv 2312.08822).

No public code exists for this paper; this is built from its description (see
../shared/reference/seed-networks.md). Four trained networks plus the shared SD 1.5 parts:

- PlanNet (`PlanNet`, spec `plannet`): the layout decoder of a DiffusionDet-style box diffusion.
  Two fully connected layers embed each noisy box; N transformer blocks with adaptive LayerNorm
  on the timestep (DiT's adaLN: shift, scale and gate from the timestep embedding) apply
  self-attention over the boxes and cross-attention to [visual tokens; language tokens]; a head
  predicts the clean box. One box per selling point.
- RenderNet (`RenderNet`, spec `render_cond`): a three-layer conv encoder on the layout mask and
  a six-layer conv visual encoder on the product image, both down to latent size, fused
  spatially (concat + conv) into the ControlNet's first block width.
- ControlNet (`PosterControlNet`, spec `controlnet`): diffusers' `ControlNetModel` in the SD 1.5
  layout, whose conditioning embedding is RenderNet (so `controlnet_cond_embedding` is
  `nn.Identity()` and RenderNet's output is added after `conv_in`).
- Poster U-Net (`PosterUNet`, spec `poster_unet`): diffusers' SD 1.5 `UNet2DConditionModel`
  taking the ControlNet's residuals.

Assumptions where the paper is silent:
1. PlanNet follows DiffusionDet's conventions: the input layout is (cx, cy, w, h) scaled to
   [-2, 2]; the network clamps it to that range and maps it back to [0, 1] before embedding it
   (DiffusionDet's `model_predictions`). It predicts the clean layout as corners (x0, y0, x1, y1)
   in [0, 1]: sigmoid, then min/max per axis so x0 <= x1 and y0 <= y1.
2. Box i belongs to selling point i: one learned embedding per text slot is added both to box
   token i and to language token i, so cross-attention can tell which text a box carries.
3. The visual tokens are the shared image encoder's tokens (CLIP vision + resampler, as RefAdGen)
   on the product canvas, projected to PlanNet's width; the language tokens are one pooled text
   encoder vector per selling point, projected likewise. Padded selling points are masked as keys
   (additive bias MASK_BIAS, never -inf, so no row is NaN) in both attentions; their own
   predictions are meaningless and the pipeline drops them.
4. adaLN (DiT): the timestep embedding gives shift/scale/gate for self-attention and the MLP;
   cross-attention uses a plain LayerNorm (as PixArt-alpha). DiT starts the modulation at zero;
   random init here keeps PyTorch's default init so every block does something in tests.
5. RenderNet: the visual encoder has ControlNet's conditioning-embedding pattern (stride 1, then
   stride 2, three times); the mask encoder strides every layer. Both need an 8x VAE. The last
   1x1 convolution is ControlNet's zero convolution; random init keeps PyTorch's default init
   instead of zero (through the random encoders its output is already small, |x| < 0.2 on tiny), so
   tests of the conditioning path prove something. Trained weights replace it.
6. The ControlNet's own zero convolutions (`controlnet_down_blocks`, `controlnet_mid_block`) get
   PyTorch's default init for the same reason; trained weights replace them.
7. Guidance: the residuals go to both halves of the 2B batch (diffusers' ControlNet pipelines
   outside guess mode); `control_scale` multiplies every residual per sample.
"""

from __future__ import annotations

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from networks.common.attention import CrossAttentionProcessor, attend_biased
from networks.sd import diffusers_config, unet_config
from runtime.artifacts.architecture import unet_size
from runtime.presets import Preset
from runtime.specs.background import MASK_BIAS
from runtime.specs.layout import BOX_SCALE
from runtime.specs.shared import unet_skip_layout

TIMESTEP_FREQUENCIES = 256  # sinusoidal timestep features (DiT, DiffusionDet)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, C), shift and scale (B, C)."""
    return x * (1.0 + scale[:, None]) + shift[:, None]


class BiasedAttention(nn.Module):
    """Multi-head attention with an additive key bias, through `attend_biased`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x (B, N, C), context (B, L, C), key_bias (B, L) added to every query's scores -> (B, N, C)."""
        b, n, _ = x.shape
        bias = key_bias[:, None, None, :].to(x.dtype).expand(b, 1, n, key_bias.shape[1])  # (B, 1, N, L)
        return self.to_out(attend_biased(self.to_q(x), self.to_k(context), self.to_v(context), bias, self.heads))


class PlanBlock(nn.Module):
    """adaLN self-attention over the boxes, cross-attention to the conditioning tokens, MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = BiasedAttention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = BiasedAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, time, context, box_bias, context_bias):
        """x (B, N, C), time (B, C), context (B, L, C), box_bias (B, N), context_bias (B, L) -> (B, N, C)."""
        shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = self.modulation(time).chunk(6, dim=1)
        h = _modulate(self.norm_self(x), shift_sa, scale_sa)
        x = x + gate_sa[:, None] * self.self_attn(h, h, box_bias)
        x = x + self.cross_attn(self.norm_cross(x), context, context_bias)
        return x + gate_mlp[:, None] * self.mlp(_modulate(self.norm_mlp(x), shift_mlp, scale_mlp))


class PlanNet(nn.Module):
    """forward(layout (B, T, 4), timestep (B,), image_tokens (B, 16, C_img), text_features (B, T, C_txt),
    text_mask (B, T)) -> layout_pred (B, T, 4), (x0, y0, x1, y1) in [0, 1]. T selling points."""

    def __init__(self, preset: Preset):
        super().__init__()
        d = preset.plan.hidden
        self.box_embed = nn.Sequential(nn.Linear(4, d), nn.SiLU(), nn.Linear(d, d))
        self.slot_embed = nn.Parameter(torch.randn(preset.layout.max_texts, d))  # nn.Embedding's init
        self.time_proj = Timesteps(TIMESTEP_FREQUENCIES, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(TIMESTEP_FREQUENCIES, d)
        self.visual_proj = nn.Linear(preset.unet.cross_attention_dim, d)
        self.language_proj = nn.Linear(preset.text.hidden_size, d)
        self.blocks = nn.ModuleList(PlanBlock(d, preset.plan.heads) for _ in range(preset.plan.blocks))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.head = nn.Linear(d, 4)

    def forward(self, layout, timestep, image_tokens, text_features, text_mask):
        slots = self.slot_embed[: layout.shape[1]]  # (T, C)
        boxes = (layout.clamp(-BOX_SCALE, BOX_SCALE) / BOX_SCALE + 1.0) / 2.0  # (B, T, 4) cx, cy, w, h in [0, 1]
        x = self.box_embed(boxes) + slots  # (B, T, C)
        time = self.time_embed(self.time_proj(timestep).to(x.dtype))  # (B, C)
        visual = self.visual_proj(image_tokens)  # (B, 16, C)
        language = self.language_proj(text_features) + slots  # (B, T, C)
        context = torch.cat([visual, language], dim=1)  # (B, 16 + T, C)
        box_bias = MASK_BIAS * (1.0 - text_mask)  # (B, T): padded selling points are never attended to
        context_bias = torch.cat([torch.zeros_like(visual[..., 0], dtype=box_bias.dtype), box_bias], dim=1)  # (B, 16 + T)
        for block in self.blocks:
            x = block(x, time, context, box_bias, context_bias)
        shift, scale = self.modulation_out(time).chunk(2, dim=1)
        corners = torch.sigmoid(self.head(_modulate(self.norm_out(x), shift, scale)))  # (B, T, 4)
        x0, y0, x1, y1 = corners.unbind(-1)
        return torch.stack([torch.minimum(x0, x1), torch.minimum(y0, y1), torch.maximum(x0, x1), torch.maximum(y0, y1)], dim=-1)


def _conv_stack(channels: tuple[int, ...], in_channels: int, strides: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out_channels, stride in zip(channels, strides, strict=True):
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1), nn.SiLU()]
        in_channels = out_channels
    return nn.Sequential(*layers)


class RenderNet(nn.Module):
    """forward(layout_mask (B, 1, H, W), product_image (B, 3, H, W)) -> control_cond (B, C0, H/8, W/8)."""

    def __init__(self, preset: Preset):
        super().__init__()
        if preset.vae_scale != 8:
            raise ValueError(f"RenderNet downsamples by 8 (three stride-2 layers); preset {preset.name} has a "
                             f"{preset.vae_scale}x VAE")
        r = preset.render
        c0 = preset.unet.block_out_channels[0]
        self.mask_encoder = _conv_stack(r.mask_channels, 1, (2, 2, 2))
        self.visual_encoder = _conv_stack(r.visual_channels, 3, (1, 2, 1, 2, 1, 2))
        self.fusion = nn.Sequential(
            nn.Conv2d(r.mask_channels[-1] + r.visual_channels[-1], c0, kernel_size=3, padding=1), nn.SiLU()
        )
        self.conv_out = nn.Conv2d(c0, c0, kernel_size=1)  # ControlNet's zero conv; see assumption 5

    def forward(self, layout_mask, product_image):
        mask = self.mask_encoder(layout_mask.to(product_image.dtype))  # (B, M, h, w)
        visual = self.visual_encoder(product_image)  # (B, V, h, w)
        return self.conv_out(self.fusion(torch.cat([mask, visual], dim=1)))  # (B, C0, h, w)


def controlnet_config(preset: Preset) -> dict:
    """diffusers `ControlNetModel` config matching the SD 1.5-layout U-Net at the preset's widths."""
    config = unet_config(preset, in_channels=preset.latent_channels)
    for unet_only in ("sample_size", "out_channels", "up_block_types"):
        del config[unet_only]
    # The smallest embedding: it is replaced by nn.Identity (RenderNet takes its place).
    return config | {"conditioning_embedding_out_channels": (16,)}


def _use_attend(model: nn.Module) -> None:
    """Route self- and cross-attention through `attend`, so they export as fused nodes."""
    for name, module in model.named_modules():
        if name.endswith((".attn1", ".attn2")):
            module.set_processor(CrossAttentionProcessor())


class PosterControlNet(nn.Module):
    """forward(sample (B, 4, h, w), timestep (B,), text_embeds (B, 77, C), control_cond (B, C0, h, w),
    control_scale (B,)) -> 12 down residuals and the mid residual (runtime.specs.shared.skip_residual_layout).
    Built from a diffusers ControlNet config; its conditioning embedding is RenderNet's place."""

    def __init__(self, config: dict):
        super().__init__()
        self.controlnet = ControlNetModel.from_config(diffusers_config(config))
        self.controlnet.controlnet_cond_embedding = nn.Identity()
        for conv in (*self.controlnet.controlnet_down_blocks, self.controlnet.controlnet_mid_block):
            conv.reset_parameters()  # see assumption 6
        _use_attend(self.controlnet)
        self.num_residuals = len(unet_skip_layout(unet_size(config)))

    def forward(self, sample, timestep, text_embeds, control_cond, control_scale):
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states=text_embeds, controlnet_cond=control_cond, return_dict=False
        )
        residuals = (*down, mid)
        if len(residuals) != self.num_residuals:
            raise RuntimeError(f"controlnet produced {len(residuals)} residuals, layout has {self.num_residuals}")
        scale = control_scale.view(-1, 1, 1, 1).to(sample.dtype)
        return tuple(r * scale for r in residuals)


class PosterUNet(nn.Module):
    """forward(sample (B, 4, h, w), timestep (B,), text_embeds (B, 77, C), *control residuals (13))
    -> noise_pred (B, 4, h, w). Built from the diffusers config of an SD 1.5-layout U-Net."""

    def __init__(self, config: dict):
        super().__init__()
        self.unet = UNet2DConditionModel.from_config(diffusers_config(config))
        _use_attend(self.unet)
        self.num_residuals = len(unet_skip_layout(unet_size(config)))

    def forward(self, sample, timestep, text_embeds, *residuals):
        if len(residuals) != self.num_residuals:
            raise TypeError(f"expected {self.num_residuals} control residuals, got {len(residuals)} tensors")
        return self.unet(
            sample, timestep, encoder_hidden_states=text_embeds,
            down_block_additional_residuals=tuple(residuals[:-1]), mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]
