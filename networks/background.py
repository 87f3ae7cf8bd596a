"""Background generation with category commonality and personalized style (arXiv 2312.13309).

No public code exists for this paper; this is built from its description (see
../shared/reference/seed-networks.md). Two trained networks plus the shared SD 1.5 parts:

- Category-common generator (`CategoryUNet`, spec `background_unet`, every step): an SD 1.5
  U-Net whose cross-attention is mask-aware. The prompt is "a photo of C in the background of
  D", C the product's class noun and D the category identifier (a rare word bound to the
  category's common background style in training). With m the product mask at the attention
  level's resolution, every cross-attention adds a score bias
      bias[q, k] = MASK_BIAS * (m[q] * is_D[k] + (1 - m[q]) * is_C[k]),
  so D's tokens are attended only from background positions and C's only from product
  positions; the other tokens (BOS, "a photo of", "in the background of", EOS padding) are seen
  by every position, which also means no query row is ever fully masked.
- Personalized generator (`StyleBranch`, spec `style_branch`, once per request): a
  ControlNet-like trainable copy of the U-Net encoder (conv_in, the 4 down blocks, the mid
  block; self-attention only, no text) over the reference ad's latent and its product mask,
  with a 1x1 output convolution per skip connection ("zero convs" in ControlNet). Each output
  is multiplied by the TARGET's background mask at its scale, then added (times `style_scale`)
  to the U-Net's skip connections, which the decoder blocks consume: style reaches the
  background only.

Assumptions where the paper is silent:
1. The product enters the U-Net twice: inpainting-style (SD inpainting's 9-channel conv_in:
   noisy latent, product mask, VAE latent of the product on grey) so the model sees what it
   builds the background around and where; and through the mask-aware attention. The
   attention alone would not tell the network the product's appearance.
2. One prompt "a photo of C in the background of D" encoded once; C's and D's token positions
   come from tokenizing the prompt's prefixes (runtime/inputs/categories.py). The unconditional half of
   classifier-free guidance uses the negative prompt (default empty) with no C or D tokens, so
   its bias is zero.
3. Mask per level: the latent-size mask max-pooled 2x2 (ceil mode) per level, matching the
   U-Net's ceil(n / 2) downsampling; a cell touched by the product counts as product. That makes
   the style residuals exactly zero on every cell the product touches, at every scale.
4. The personalized branch takes neither the noisy latent nor the timestep (its resnets have no
   time embedding), so it is a per-request invariant and runs once per request. A
   standard ControlNet also reads x_t and t and must run every step; weights of such a
   ControlNet do not load into this branch.
5. The branch's input is the VAE latent of the reference ad with its own product greyed out
   (the reference product's appearance must not leak), concatenated with the reference mask
   at latent size; without a reference mask the whole reference is the style source.
6. Guidance: the style residuals go to both halves of the 2B batch (as diffusers' ControlNet
   pipelines do outside guess mode); guidance acts on the text only.
7. Self-attention in both networks is plain SD self-attention.
8. Random initialisation keeps PyTorch's default init for the output 1x1 convolutions, so a
   random branch changes the result and the masking tests prove something. Trained ControlNets
   start them at zero; real weights load whatever training produced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn
from torch import nn

from networks.common.attention import CrossAttentionProcessor, attend_biased
from networks.sd import diffusers_config
from runtime.artifacts.architecture import unet_size
from runtime.presets import Preset
from runtime.specs.background import MASK_BIAS, style_residual_layout
from runtime.specs.shared import LEVELS, unet_skip_layout


def mask_pyramid(mask: torch.Tensor, levels: int = LEVELS) -> list[torch.Tensor]:
    """(B, 1, h, w) 0/1 mask -> one mask per U-Net level, (B, 1, ceil(h / 2^k), ceil(w / 2^k))."""
    masks = [mask]
    for _ in range(levels - 1):
        masks.append(F.max_pool2d(masks[-1], kernel_size=2, stride=2, ceil_mode=True))
    return masks


def token_bias(mask: torch.Tensor, class_tokens: torch.Tensor, identifier_tokens: torch.Tensor) -> torch.Tensor:
    """Cross-attention score bias (B, 1, N, L) from a level's mask (B, 1, h, w), N = h * w, and the
    (B, L) 0/1 markers of C's and D's tokens: C only from product, D only from background."""
    product = mask.flatten(1)[:, :, None]  # (B, N, 1)
    masked = product * identifier_tokens[:, None, :] + (1.0 - product) * class_tokens[:, None, :]  # (B, N, L)
    return (MASK_BIAS * masked)[:, None]


def _level_of(name: str) -> int:
    """Resolution level of an attention module in the SD 1.5 layout, from its name."""
    block, _, rest = name.partition(".")
    if block == "down_blocks":
        return int(rest.split(".")[0])
    if block == "mid_block":
        return LEVELS - 1
    if block == "up_blocks":
        return LEVELS - 1 - int(rest.split(".")[0])
    raise ValueError(f"not an SD 1.5 attention module: {name}")


class MaskAwareCrossAttention:
    """Cross-attention with the level's token bias (see `token_bias`), set per call in `biases`."""

    def __init__(self, level: int, biases: list[torch.Tensor | None]):
        self.level = level
        self.biases = biases

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None or hidden_states.ndim != 3:
            raise NotImplementedError("MaskAwareCrossAttention expects (B, N, C) queries, text context and no attention mask")
        bias = self.biases[self.level]
        if bias is None:
            raise RuntimeError("MaskAwareCrossAttention called without a token bias: use CategoryUNet.forward")
        q = attn.to_q(hidden_states)
        out = attend_biased(q, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states), bias.to(q.dtype), attn.heads)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


class CategoryUNet(nn.Module):
    """forward(sample (B, 4, h, w), timestep (B,), product_latent (B, 4, h, w), product_mask (B, 1, h, w),
    text_embeds (B, 77, C), class_tokens (B, 77), identifier_tokens (B, 77), *style_residuals (13),
    style_scale (B,)) -> noise_pred (B, 4, h, w). Built from the diffusers config of its U-Net
    (`in_channels` 9: noisy latent, product mask, product latent)."""

    def __init__(self, config: dict):
        super().__init__()
        self.unet = UNet2DConditionModel.from_config(diffusers_config(config))
        self.num_residuals = len(unet_skip_layout(unet_size(config)))
        self._biases: list[torch.Tensor | None] = [None] * LEVELS
        for name, module in self.unet.named_modules():
            if name.endswith(".attn1"):
                module.set_processor(CrossAttentionProcessor())
            elif name.endswith(".attn2"):
                module.set_processor(MaskAwareCrossAttention(_level_of(name), self._biases))

    def forward(self, sample, timestep, product_latent, product_mask, text_embeds, class_tokens, identifier_tokens,
                *residuals_and_scale):
        if len(residuals_and_scale) != self.num_residuals + 1:
            raise TypeError(f"expected {self.num_residuals} style residuals and style_scale, got {len(residuals_and_scale)} tensors")
        *residuals, scale = residuals_and_scale
        scale = scale.view(-1, 1, 1, 1).to(sample.dtype)
        down = tuple(r * scale for r in residuals[:-1])
        mid = residuals[-1] * scale
        x = torch.cat([sample, product_mask.to(sample.dtype), product_latent], dim=1)  # (B, 9, h, w), SD inpainting order
        self._biases[:] = [token_bias(m, class_tokens, identifier_tokens) for m in mask_pyramid(product_mask)]
        try:
            return self.unet(
                x, timestep, encoder_hidden_states=text_embeds,
                down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
            )[0]
        finally:
            self._biases[:] = [None] * LEVELS


class StyleBranch(nn.Module):
    """forward(reference_latent (B, 4, h, w), reference_mask (B, 1, h, w), product_mask (B, 1, h, w))
    -> 12 down residuals and the mid residual (see runtime.specs.background.style_residual_layout),
    each zero wherever the target product touches its cell."""

    def __init__(self, preset: Preset):
        super().__init__()
        u = preset.unet
        c = u.block_out_channels
        heads = u.attention_head_dim  # diffusers' SD 1.5 naming: this is the head count
        self.conv_in = nn.Conv2d(preset.latent_channels + 1, c[0], kernel_size=3, padding=1)
        blocks = []
        for i, channels in enumerate(c):
            common = dict(num_layers=u.layers_per_block, in_channels=c[max(i - 1, 0)], out_channels=channels,
                          temb_channels=None, resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=u.norm_num_groups)
            if i == len(c) - 1:
                blocks.append(DownBlock2D(add_downsample=False, **common))
            else:  # the U-Net's block without its text cross-attention (cross_attention_dim None drops attn2)
                blocks.append(CrossAttnDownBlock2D(
                    add_downsample=True, downsample_padding=1, num_attention_heads=heads, cross_attention_dim=None, **common
                ))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=c[-1], temb_channels=None, resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=u.norm_num_groups,
            num_attention_heads=heads, cross_attention_dim=None,
        )
        layout = style_residual_layout(preset)
        self.levels = tuple(level for level, _ in layout)
        self.output_convs = nn.ModuleList(nn.Conv2d(ch, ch, kernel_size=1) for _, ch in layout)
        for name, module in self.named_modules():
            if name.endswith(".attn1"):
                module.set_processor(CrossAttentionProcessor())

    def forward(self, reference_latent, reference_mask, product_mask):
        x = self.conv_in(torch.cat([reference_latent, reference_mask.to(reference_latent.dtype)], dim=1))
        features = [x]
        for block in self.down_blocks:
            x, skips = block(x, None)
            features.extend(skips)
        features.append(self.mid_block(x, None))
        if len(features) != len(self.output_convs):
            raise RuntimeError(f"style branch produced {len(features)} features, layout has {len(self.output_convs)}")
        background = [1.0 - m.to(reference_latent.dtype) for m in mask_pyramid(product_mask)]
        return tuple(conv(f) * background[level] for f, conv, level in zip(features, self.output_convs, self.levels))
