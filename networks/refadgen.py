"""RefAdGen networks (AAAI 2026): mask-injected generation U-Net with attention fusion, and the
reference U-Net whose self-attention inputs condition it.

- Generation U-Net: diffusers' `UNet2DConditionModel` (SD 1.5 layout) with `conv_in` taking 5
  channels: concat(noisy latent (4), product mask at latent size (1)).
- Reference U-Net: the same layout with 4 input channels, run once per request at t = 0 on the
  product latent with the resampled image tokens as context; it returns the input of each of
  its 16 self-attention layers (`attn1`), in forward order (down, mid, up).
- AFM: each `attn1` of the generation U-Net becomes
      out = to_out(SDPA(Q, K, V) + scale * SDPA(Q, K_ref, V_ref)),
  with K_ref / V_ref bias-free projections of the matching reference state. The projections
  live in `AFMKeyValue` (exported on their own, run once per request) so the per-step graph
  takes K_ref / V_ref as inputs instead of recomputing them 30 times.

Assumptions where the paper is silent, chosen to match the public code's shapes: the
unconditional guidance branch runs the reference U-Net with the image tokens of a zero image;
the reference input is the VAE latent of the product on a neutral background.
"""

from __future__ import annotations

import re

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from networks.common.attention import CrossAttentionProcessor, attend
from networks.sd import diffusers_config

_ATTN1 = re.compile(r"^(down_blocks|mid_block|up_blocks)\.?(\d*)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn1$")
_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def use_cross_attention_processors(unet: UNet2DConditionModel) -> None:
    """Route every cross-attention (`attn2`) through `attend`, so it exports fused too."""
    for name, module in unet.named_modules():
        if name.endswith(".attn2"):
            module.set_processor(CrossAttentionProcessor())


def self_attention_names(unet: UNet2DConditionModel) -> list[str]:
    """Names of the `attn1` modules in forward order: down blocks, mid block, up blocks."""

    def order(name: str) -> tuple[int, ...]:
        m = _ATTN1.match(name)
        assert m is not None  # filtered below
        return (_BLOCK_ORDER[m[1]], int(m[2] or 0), int(m[3]), int(m[4]))

    names = [n for n, _ in unet.named_modules() if _ATTN1.match(n)]
    return sorted(names, key=order)


def _check_plain_self_attention(attn: Attention, hidden_states: torch.Tensor) -> None:
    # SD 1.5 transformer blocks feed attn1 a normalised (B, N, C) sequence with none of the extras.
    if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
        raise NotImplementedError("AFM/reference processors expect SD 1.5 self-attention on (B, N, C) inputs")


class ReferenceCaptureProcessor:
    """Plain self-attention that records its input into a shared list (reference U-Net)."""

    def __init__(self, store: list[torch.Tensor | None], index: int):
        self.store = store
        self.index = index

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        _check_plain_self_attention(attn, hidden_states)
        self.store[self.index] = hidden_states
        out = attend(attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states), attn.heads)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


class AFMProcessor(nn.Module):
    """Attention fusion: self-attention plus `scale` x attention over the reference keys/values.

    The reference projections (`to_k_ref`, `to_v_ref`) are parameters of this processor, so
    they sit in the generation U-Net's state dict; `AFMKeyValue` applies them once per request.
    Per step, `ref_key`, `ref_value` ((B, N_ref, C) each) and `scale` ((B,)) are set by
    `GenerationUNet.forward` before the U-Net runs.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.to_k_ref = nn.Linear(channels, channels, bias=False)
        self.to_v_ref = nn.Linear(channels, channels, bias=False)
        self.ref_key: torch.Tensor | None = None
        self.ref_value: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        _check_plain_self_attention(attn, hidden_states)
        if self.ref_key is None or self.ref_value is None or self.scale is None:
            raise RuntimeError("AFMProcessor called without reference keys/values: use GenerationUNet.forward")
        q = attn.to_q(hidden_states)
        own = attend(q, attn.to_k(hidden_states), attn.to_v(hidden_states), attn.heads)  # (B, N, C)
        ref = attend(q, self.ref_key, self.ref_value, attn.heads)
        fused = own + self.scale.view(-1, 1, 1).to(own.dtype) * ref
        return attn.to_out[1](attn.to_out[0](fused)) / attn.rescale_output_factor


class GenerationUNet(nn.Module):
    """forward(sample (B, 5, h, w), timestep (B,), text_embeds (B, 77, C), *ref_keys, *ref_values,
    afm_scale (B,)) -> noise_pred (B, 4, h, w). 16 keys then 16 values, each (B, N_l, C_l).
    Built from the diffusers config of its U-Net (`in_channels` 5)."""

    def __init__(self, config: dict):
        super().__init__()
        self.unet = UNet2DConditionModel.from_config(diffusers_config(config))
        use_cross_attention_processors(self.unet)
        self.layer_names = self_attention_names(self.unet)
        modules = dict(self.unet.named_modules())
        self.afm = [AFMProcessor(modules[n].to_q.in_features) for n in self.layer_names]
        for name, processor in zip(self.layer_names, self.afm):
            modules[name].set_processor(processor)

    def forward(self, sample, timestep, text_embeds, *refs_and_scale):
        n = len(self.afm)
        if len(refs_and_scale) != 2 * n + 1:
            raise TypeError(f"expected {n} ref keys, {n} ref values and afm_scale, got {len(refs_and_scale)} tensors")
        keys, values, scale = refs_and_scale[:n], refs_and_scale[n:2 * n], refs_and_scale[-1]
        for processor, key, value in zip(self.afm, keys, values):
            processor.ref_key, processor.ref_value, processor.scale = key, value, scale
        try:
            return self.unet(sample, timestep, encoder_hidden_states=text_embeds, return_dict=False)[0]
        finally:
            for processor in self.afm:
                processor.ref_key = processor.ref_value = processor.scale = None


class AFMKeyValue(nn.Module):
    """forward(*ref_states) -> (*ref_keys, *ref_values): the AFM projections of the generation
    U-Net applied to the 16 reference states. Shares parameters with `GenerationUNet`."""

    def __init__(self, generation_unet: GenerationUNet):
        super().__init__()
        self.processors = nn.ModuleList(generation_unet.afm)

    def forward(self, *ref_states):
        keys = [p.to_k_ref(s) for p, s in zip(self.processors, ref_states, strict=True)]
        values = [p.to_v_ref(s) for p, s in zip(self.processors, ref_states, strict=True)]
        return (*keys, *values)


class ReferenceUNet(nn.Module):
    """forward(product_latent (B, 4, h, w), image_tokens (B, 16, C)) -> 16 reference states,
    the inputs of the self-attention layers at t = 0, each (B, N_l, C_l). Built from the diffusers
    config of its U-Net."""

    def __init__(self, config: dict):
        super().__init__()
        self.unet = UNet2DConditionModel.from_config(diffusers_config(config))
        use_cross_attention_processors(self.unet)
        self.layer_names = self_attention_names(self.unet)
        self._store: list[torch.Tensor | None] = [None] * len(self.layer_names)
        modules = dict(self.unet.named_modules())
        for index, name in enumerate(self.layer_names):
            modules[name].set_processor(ReferenceCaptureProcessor(self._store, index))

    def forward(self, product_latent, image_tokens):
        timestep = torch.zeros(product_latent.shape[0], dtype=product_latent.dtype, device=product_latent.device)
        self._store[:] = [None] * len(self._store)
        self.unet(product_latent, timestep, encoder_hidden_states=image_tokens, return_dict=False)
        states = tuple(self._store)
        self._store[:] = [None] * len(self._store)
        if any(s is None for s in states):
            raise RuntimeError("reference U-Net did not reach every self-attention layer")
        return states
