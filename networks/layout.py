"""RADM: relation-aware diffusion model for poster layout (Li et al., CIKM 2023).

Built from the paper and the public reference code (GitHub liuan0803/RADM, on DiffusionDet and
detectron2); no code is copied. Two networks plus the shared CLIP text encoder:

- `LayoutBackbone` (spec `layout_backbone`, once per request): detectron2's ResNet-50 (stride in
  the 3x3 convolution, as torchvision v1.5 and RADM's `STRIDE_IN_1X1: False`) + FPN (1x1 lateral,
  nearest top-down upsampling to the lateral's size, 3x3 output convolutions) -> p2..p5. Plain
  `BatchNorm2d` in eval mode stands for detectron2's FrozenBN (same affine maths; the ONNX
  exporter folds it into the convolutions). Parameter names follow detectron2 (`bottom_up.stem.
  conv1.norm.weight`, `bottom_up.res2.0.shortcut`, `fpn_lateral2`), less the `backbone.` prefix;
  a converted detectron2 checkpoint also needs BatchNorm's `num_batches_tracked` (any value).
- `LayoutHead` (spec `layout_head`, every step): six cascaded DiffusionDet heads. Each pools 7x7
  RoI features (multi-level RoIAlign, `roi_align_levels`), then
  self-attention over the boxes -> dynamic convolution with the RoI features -> FFN, scaled and
  shifted by the timestep embedding; next to it VTRAM (RoI tokens attend to the selling points)
  and GRAM (geometric relations between the boxes weight an average of RoI features). The fused
  [GRAM | box | VTRAM] feature gives class logits and box deltas; the next head starts from the
  detached refined boxes and this head's box features.

Batch correctness: every operation acts within one sample. The reference repeats the text
features with `repeat` where `repeat_interleave` was meant (box k of sample b reads the texts of
sample k mod B) and its sampler reads sample 0's scores; here text features reach only their own
sample's queries (VTRAM attends from all of a sample's RoI tokens at once), and RoIAlign, GRAM and
self-attention are all per sample.

Assumptions and departures from the reference code:
1. Text features are (texts, D) per sample and the attention runs over texts. The reference
   `view`s its (20, 768) per-sample features as (768, 20), scrambling texts and channels (the
   network was trained on that arrangement); real RADM weights therefore need features
   arranged the same way to reproduce the paper's numbers. The pooled VTRAM feature is the mean
   over the 49 tokens; the reference's raw `reshape` mixes tokens and channels there too.
2. Padded texts: keys and values are multiplied by the mask and scores get (mask - 1) * 1e4, as
   in the reference; never -inf, so a sample without texts yields zeros, not NaN, and padded
   features never reach the output.
   A consequence kept from the reference: VTRAM's output projection instance-normalises over
   the 49 RoI tokens, so a lone real text (every token then attends to it alone) or a shift
   shared by all texts leaves the output unchanged; texts steer the layout from two on.
3. VTRAM's box token is Linear(4 -> hidden) of the INITIAL noisy box (normalised x0, y0, x1, y1)
   in every head, as in the reference (`norm_bboxes` is not refined along the cascade).
4. GRAM works on pixel boxes (x, y centres, widths, heights) with the reference's clamps: widths
   at least 1e-3 px, every ratio at least 1e-3 before the log; embedding 100 * log(ratio) over
   wavelength 1000 (Relation Networks), ordered (feature, frequency, sin/cos). Its projection
   reads the RoI features flattened channel-major, (C, 7, 7), as the reference does.
5. RoIAlign is detectron2's ROIAlignV2 (aligned, sampling ratio 2): samples outside [-1, size]
   give 0, those within clamp to the border. Level = clamp(floor(4 + log2(sqrt(area) / 224 +
   1e-8)), 2, 5) with the area in input-image pixels (image = 4 x p2).
6. Random initialisation (no trained weights are reachable): xavier-uniform for matrices as the
   reference, focal-loss prior on the class bias only (the reference's shape test also hits the
   box token's weight and the delta bias), small box-delta weights so a random cascade keeps
   boxes of sensible size, and GRAM's own N(0, 0.01) init (which the reference defines and then
   overwrites with xavier).
7. Numerics: GRAM multiplies log-ratios by 100 before sin/cos, so one float32 ulp of `log` (which
   differs between torch and ONNX Runtime) becomes ~1e-4 in the embedding, and the cascade
   carries it on. With xavier-initialised GRAM weights the six-head tiny graph misses the fp32
   parity bound (4e-3 on logits of magnitude 7); with GRAM's own init it passes. Trained
   weights may need their parity judged on the sampled layout rather than raw logits.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModel

from runtime.errors import WeightsError
from runtime.layout_specs import (
    FPN_LEVELS,
    BBOX_WEIGHTS,
    BOX_SCALE,
    CANONICAL_BOX_SIZE,
    CANONICAL_LEVEL,
    FPN_STRIDES,
    POOLER_SAMPLING_RATIO,
    SCALE_CLAMP,
)
from runtime.presets import LayoutSize, Preset
from runtime.weights import LAYOUT_FILE, WeightsSource, weight_files

from networks.attention import attend, attend_biased
from networks.build import _load_text_encoder, _seeded, load_parts
from networks.encoders import TextEncoder, text_config

LAYOUT_PARTS = ("layout_backbone", "layout_head")
PIXEL_MEAN = (123.675, 116.280, 103.530)  # ImageNet, RGB, 0..255 (RADM's detectron2 config)
PIXEL_STD = (58.395, 57.120, 57.375)
TEXT_MASK_BIAS = 1e4  # score bias of a padded text: large, finite
FOCAL_PRIOR = 0.01
GRAM_WAVELENGTH = 1000.0
GRAM_MIN = 1e-3
LEVEL_EPS = 1e-8
MIN_LEVEL, MAX_LEVEL = 2, 5


class ConvNorm(nn.Conv2d):
    """Bias-free convolution followed by its BatchNorm (detectron2's `Conv2d(norm=...)`)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here) -> 1x1, plus a projected shortcut where the shape changes."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.shortcut = ConvNorm(cin, cout, 1, stride) if (cin != cout or stride != 1) else None
        self.conv1 = ConvNorm(cin, mid, 1)
        self.conv2 = ConvNorm(mid, mid, 3, stride)
        self.conv3 = ConvNorm(mid, cout, 1)

    def forward(self, x):
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class Stem(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvNorm(3, channels, 7, stride=2)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class ResNet(nn.Module):
    """forward(x (B, 3, H, W)) -> [res2 (B, 4c, H/4, W/4), res3 .. res5 (B, 32c, H/32, W/32)]."""

    def __init__(self, stem_channels: int, blocks: tuple[int, int, int, int]):
        super().__init__()
        self.stem = Stem(stem_channels)
        cin = stem_channels
        self.stage_names = []
        for i, count in enumerate(blocks):
            mid = stem_channels * 2**i
            cout = mid * 4
            stage = nn.Sequential(*(
                Bottleneck(cin if j == 0 else cout, mid, cout, stride=(1 if i == 0 or j else 2)) for j in range(count)
            ))
            name = f"res{i + 2}"
            self.add_module(name, stage)
            self.stage_names.append(name)
            cin = cout
        self.out_channels = tuple(stem_channels * 4 * 2**i for i in range(4))

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outs.append(x)
        return outs


class LayoutBackbone(nn.Module):
    """forward(image (B, 3, H, W) RGB in [-1, 1]) -> p2 (B, C, H/4, W/4), p3, p4, p5 (B, C, H/32, W/32)."""

    def __init__(self, preset: Preset):
        super().__init__()
        lay = preset.layout
        self.bottom_up = ResNet(lay.stem_channels, lay.blocks)
        c = lay.fpn_channels
        for level, cin in zip(range(2, 6), self.bottom_up.out_channels):
            self.add_module(f"fpn_lateral{level}", nn.Conv2d(cin, c, 1))
            self.add_module(f"fpn_output{level}", nn.Conv2d(c, c, 3, padding=1))
        # [-1, 1] -> 0..255 -> ImageNet-normalised, as one affine map per channel
        std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
        self.register_buffer("pixel_scale", 127.5 / std, persistent=False)
        self.register_buffer("pixel_shift", (127.5 - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / std, persistent=False)

    def forward(self, image):
        x = image * self.pixel_scale + self.pixel_shift
        res = self.bottom_up(x)
        prev = getattr(self, "fpn_lateral5")(res[3])
        outs = [getattr(self, "fpn_output5")(prev)]
        for level in (4, 3, 2):
            lateral = getattr(self, f"fpn_lateral{level}")(res[level - 2])
            # explicit size: the graph then serves any input size, not just the traced one
            prev = lateral + F.interpolate(prev, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, getattr(self, f"fpn_output{level}")(prev))
        return tuple(outs)


def fpn_levels(boxes: torch.Tensor) -> torch.Tensor:
    """FPN level (2..5, as float) of pixel boxes (..., 4) x0, y0, x1, y1: detectron2's
    clamp(floor(4 + log2(sqrt(area) / 224 + 1e-8)), 2, 5)."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    level = torch.floor(CANONICAL_LEVEL + torch.log2(torch.sqrt(area.clamp(min=0.0)) / CANONICAL_BOX_SIZE + LEVEL_EPS))
    return level.clamp(MIN_LEVEL, MAX_LEVEL)


def _shape_hw(x: torch.Tensor) -> torch.Tensor:
    """(2,) float tensor (h, w) of a (B, C, h, w) map; a Shape op in the exported graph, so
    sizes are never baked in."""
    return torch._shape_as_tensor(x)[2:].to(device=x.device, dtype=torch.float32)


def roi_align_levels(features: list[torch.Tensor], boxes: torch.Tensor, output: int,
                     sampling_ratio: int = POOLER_SAMPLING_RATIO) -> torch.Tensor:
    """Multi-level RoIAlign (detectron2 ROIAlignV2) of normalised boxes.

    features: p2..p5, each (B, C, h_l, w_l) with stride 4, 8, 16, 32 (input image = 4 x p2);
    boxes: (B, N, 4) x0, y0, x1, y1 in [0, 1] of the image -> (B, N, C, output, output).
    Each box is pooled from its level only: every level is sampled (one grid_sample each) and
    the box's own level selected.
    """
    b, n = boxes.shape[:2]
    image_hw = _shape_hw(features[0]) * FPN_STRIDES[0]
    pixel = boxes * torch.stack([image_hw[1], image_hw[0], image_hw[1], image_hw[0]])
    level = fpn_levels(pixel)  # (B, N)
    s = output * sampling_ratio
    # sample positions within the box, as fractions of its side: (p + (i + 0.5) / r) / output
    frac = (torch.arange(s, dtype=boxes.dtype, device=boxes.device) + 0.5) / s
    x0, y0, x1, y1 = boxes.unbind(-1)
    sx = x0[..., None] + frac * (x1 - x0)[..., None]  # (B, N, S) in [0, 1] units
    sy = y0[..., None] + frac * (y1 - y0)[..., None]
    # grid_sample (align_corners=False) maps u in [0, 1] to pixel u * size - 0.5: exactly the
    # aligned RoIAlign's half-pixel shift, whatever the level's size.
    gx = (2 * sx - 1)[:, :, None, :].expand(b, n, s, s)
    gy = (2 * sy - 1)[:, :, :, None].expand(b, n, s, s)
    grid = torch.stack([gx, gy], dim=-1).reshape(b, n, s * s, 2)
    pooled = None
    for index, feat in enumerate(features):
        hw = _shape_hw(feat)
        # ROIAlign: a sample beyond one pixel outside the map is 0; within it, clamp to the border
        px, py = sx * hw[1] - 0.5, sy * hw[0] - 0.5
        inside_x = ((px >= -1) & (px <= hw[1])).to(boxes.dtype)  # (B, N, S)
        inside_y = ((py >= -1) & (py <= hw[0])).to(boxes.dtype)
        inside = (inside_y[:, :, :, None] * inside_x[:, :, None, :]).reshape(b, 1, n, s * s)
        sampled = F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=False)
        sampled = sampled * inside  # (B, C, N, S * S)
        c = sampled.shape[1]
        cells = sampled.reshape(b, c, n, output, sampling_ratio, output, sampling_ratio).mean(dim=(4, 6))
        cells = cells.permute(0, 2, 1, 3, 4)  # (B, N, C, output, output)
        chosen = (level == MIN_LEVEL + index).to(boxes.dtype)[:, :, None, None, None]
        pooled = cells * chosen if pooled is None else pooled + cells * chosen
    return pooled


class SinusoidalEmbedding(nn.Module):
    """DiffusionDet's timestep embedding: (B,) -> (B, dim) = [sin | cos]."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t):
        args = t[:, None].float() * self.freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class BoxSelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj, out_proj) over (B, N, C), through `attend`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(attend(q, k, v, self.heads))


class DynamicConv(nn.Module):
    """Box feature -> two per-box matrices applied to the box's RoI tokens (Sparse R-CNN)."""

    def __init__(self, hidden: int, dynamic_dim: int, pooler: int):
        super().__init__()
        self.hidden, self.dynamic_dim = hidden, dynamic_dim
        self.dynamic_layer = nn.Linear(hidden, 2 * hidden * dynamic_dim)
        self.norm1 = nn.LayerNorm(dynamic_dim)
        self.norm2 = nn.LayerNorm(hidden)
        self.out_layer = nn.Linear(hidden * pooler * pooler, hidden)
        self.norm3 = nn.LayerNorm(hidden)

    def forward(self, box_features, roi_tokens):
        """box_features (M, C), roi_tokens (M, 49, C) -> (M, C)."""
        params = self.dynamic_layer(box_features)
        split = self.hidden * self.dynamic_dim
        param1 = params[:, :split].reshape(-1, self.hidden, self.dynamic_dim)
        param2 = params[:, split:].reshape(-1, self.dynamic_dim, self.hidden)
        x = F.relu(self.norm1(torch.bmm(roi_tokens, param1)))  # (M, 49, dyn)
        x = F.relu(self.norm2(torch.bmm(x, param2)))  # (M, 49, C)
        return F.relu(self.norm3(self.out_layer(x.flatten(1))))


class Conv1x1(nn.Conv1d):
    """A 1x1 Conv1d (the reference's parameter shapes) applied to (..., L, C) token rows."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 1)

    def forward(self, x):
        return F.linear(x, self.weight[:, :, 0], self.bias)


def _instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """InstanceNorm1d without affine over the token axis of (M, L, C)."""
    mean = x.mean(dim=1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


class VisualTextAttention(nn.Module):
    """VTRAM's cross-attention (LAVT's pixel-word attention): RoI tokens mixed with a box token
    query the sample's texts."""

    def __init__(self, hidden: int, text_dim: int, heads: int, tokens: int):
        super().__init__()
        self.heads = heads
        self.linear = nn.Linear(tokens + 1, tokens)  # mixes the 49 RoI tokens and the box token
        self.f_key = nn.Sequential(Conv1x1(text_dim, hidden))
        self.f_query = nn.Sequential(Conv1x1(hidden, hidden))
        self.f_value = nn.Sequential(Conv1x1(text_dim, hidden))
        self.W = nn.Sequential(Conv1x1(hidden, hidden))

    def forward(self, roi_tokens, box_token, texts, text_mask):
        """roi_tokens (B, N, 49, C), box_token (B, N, C), texts (B, L, D), text_mask (B, L)
        -> (B, N, 49, C)."""
        b, n, tokens, c = roi_tokens.shape
        query = _instance_norm(self.f_query[0](roi_tokens.reshape(b * n, tokens, c)))  # (BN, 49, C)
        query = torch.cat([query, box_token.reshape(b * n, 1, c)], dim=1)  # (BN, 50, C)
        query = self.linear(query.transpose(1, 2)).transpose(1, 2)  # (BN, 49, C)
        mask = text_mask[:, :, None]
        key = self.f_key[0](texts) * mask  # (B, L, C)
        value = self.f_value[0](texts) * mask
        # The reference scales by 1/sqrt(C), not 1/sqrt(C / heads): fold the difference into q.
        query = query.reshape(b, n * tokens, c) * self.heads**-0.5
        bias = ((text_mask - 1.0) * TEXT_MASK_BIAS)[:, None, None, :].expand(b, 1, n * tokens, text_mask.shape[1])
        out = attend_biased(query, key, value, bias, self.heads)  # (B, N * 49, C)
        out = _instance_norm(self.W[0](out.reshape(b * n, tokens, c)))
        return out.reshape(b, n, tokens, c)


class VTRAM(nn.Module):
    """Visual-text relation: GELU(proj(RoI)) * attention(RoI + box -> texts), projected, pooled."""

    def __init__(self, hidden: int, text_dim: int, heads: int, tokens: int):
        super().__init__()
        self.vis_project = nn.Sequential(Conv1x1(hidden, hidden))
        self.image_lang_att = VisualTextAttention(hidden, text_dim, heads, tokens)
        self.project_mm = nn.Sequential(Conv1x1(hidden, hidden))

    def forward(self, roi_tokens, box_token, texts, text_mask):
        """-> (B, N, C): the mean over the 49 tokens."""
        vis = F.gelu(self.vis_project[0](roi_tokens))
        lang = self.image_lang_att(roi_tokens, box_token, texts, text_mask)
        return F.gelu(self.project_mm[0](vis * lang)).mean(dim=2)


class GRAM(nn.Module):
    """Geometric relation: softmax_j(ReLU(w . PE(geo(i, j)))) averages a projection of box j's RoI features."""

    def __init__(self, roi_dim: int, dim: int):
        super().__init__()
        if dim % 8:
            raise ValueError(f"GRAM dim must be a multiple of 8 (4 features x sin/cos), got {dim}")
        self.linear = nn.Linear(dim, 1)
        self.linear2 = nn.Linear(roi_dim, dim)
        # 1 / wavelength^(8k / dim), k < dim / 8: multiplied, so torch and ONNX do the same op
        inv = GRAM_WAVELENGTH ** (-(8.0 / dim) * torch.arange(dim // 8, dtype=torch.float64))
        self.register_buffer("inv_wavelengths", (100.0 * inv).float(), persistent=False)

    def forward(self, boxes, roi_features):
        """boxes (B, N, 4) pixel x0, y0, x1, y1; roi_features (B, N, C, 7, 7) -> (B, N, dim)."""
        b, n = boxes.shape[:2]
        x, y = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
        w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        wj, hj = w.clamp(min=GRAM_MIN)[:, None, :], h.clamp(min=GRAM_MIN)[:, None, :]  # (B, 1, N): box j
        geo = torch.stack([
            (x[:, None, :] - x[:, :, None]).abs() / wj,
            (y[:, None, :] - y[:, :, None]).abs() / hj,
            w[:, :, None] / wj,
            h[:, :, None] / hj,
        ], dim=-1).clamp(min=GRAM_MIN).log()  # (B, N_i, N_j, 4)
        angles = geo[..., None] * self.inv_wavelengths  # (B, N, N, 4, dim / 8)
        embedding = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(b, n, n, -1)
        weights = F.relu(self.linear(embedding))[..., 0].softmax(dim=-1)  # (B, N_i, N_j)
        values = self.linear2(roi_features.reshape(b, n, -1))  # (B, N, dim)
        return torch.bmm(weights, values)


def _stack(dim: int, depth: int) -> nn.ModuleList:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU()]
    return nn.ModuleList(layers)


class CascadeStage(nn.Module):
    """One DiffusionDet head with RADM's VTRAM and GRAM (the reference's `RCNNHead`)."""

    NUM_CLS, NUM_REG = 1, 3

    def __init__(self, lay: LayoutSize, text_dim: int):
        super().__init__()
        d = lay.hidden
        tokens = lay.pooler**2
        self.pooler = lay.pooler
        self.self_attn = BoxSelfAttention(d, lay.heads)
        self.inst_interact = DynamicConv(d, lay.dynamic_dim, lay.pooler)
        self.linear1 = nn.Linear(d, lay.ffn)
        self.linear2 = nn.Linear(lay.ffn, d)
        self.vis_text_att = VTRAM(d, text_dim, lay.vtram_heads, tokens)
        self.linear4 = nn.Linear(4, d)  # VTRAM's box token
        self.GRAM = GRAM(d * tokens, lay.gram_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.block_time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(4 * d, 2 * d))
        fused = lay.gram_dim + d + d
        self.cls_module = _stack(fused, self.NUM_CLS)
        self.reg_module = _stack(fused, self.NUM_REG)
        self.class_logits = nn.Linear(fused, lay.num_classes)
        self.bboxes_delta = nn.Linear(fused, 4)

    def forward(self, features, boxes, image_whwh, init_norm_boxes, box_features, time, texts, text_mask):
        """boxes (B, N, 4) pixel x0, y0, x1, y1; image_whwh (4,); box_features (B, N, C) or None
        (first head: mean RoI feature); time (B, 4C) -> logits (B, N, K), boxes (B, N, 4), box features."""
        b, n = boxes.shape[:2]
        roi = roi_align_levels(features, boxes / image_whwh, self.pooler)
        c = roi.shape[2]
        roi_tokens = roi.flatten(3).transpose(2, 3)  # (B, N, 49, C)
        if box_features is None:
            box_features = roi_tokens.mean(dim=2)
        relation = self.GRAM(boxes, roi)  # (B, N, gram)
        text_feature = self.vis_text_att(roi_tokens, self.linear4(init_norm_boxes), texts, text_mask)  # (B, N, C)

        x = self.norm1(box_features + self.self_attn(box_features))
        x = x.reshape(b * n, c)
        x = self.norm2(x + self.inst_interact(x, roi_tokens.reshape(b * n, -1, c)))
        x = self.norm3(x + self.linear2(F.relu(self.linear1(x))))
        obj = x.reshape(b, n, c)

        scale, shift = self.block_time_mlp(time)[:, None, :].chunk(2, dim=-1)  # (B, 1, C) each
        fused = torch.cat([relation, obj * (scale + 1) + shift, text_feature], dim=-1)
        cls, reg = fused, fused
        for layer in self.cls_module:
            cls = layer(cls)
        for layer in self.reg_module:
            reg = layer(reg)
        return self.class_logits(cls), apply_deltas(self.bboxes_delta(reg), boxes), obj


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """detectron2's Box2BoxTransform with weights (2, 2, 1, 1): (..., 4) deltas on (..., 4) x0, y0, x1, y1."""
    wx, wy, ww, wh = BBOX_WEIGHTS
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    cx, cy = boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=SCALE_CLAMP)
    dh = (deltas[..., 3] / wh).clamp(max=SCALE_CLAMP)
    px, py = dx * widths + cx, dy * heights + cy
    pw, ph = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], dim=-1)


class LayoutHead(nn.Module):
    """forward(boxes, timestep, p2, p3, p4, p5, text_features, text_mask) -> (class_logits, pred_boxes).

    boxes (B, N, 4): noisy (cx, cy, w, h) scaled to [-2, 2]; timestep (B,); p2..p5 as the
    backbone's; text_features (B, L, D); text_mask (B, L) 1 = real text. Returns the last
    head's class_logits (B, N, K) and pred_boxes (B, N, 4), x0, y0, x1, y1 / canvas size.
    """

    def __init__(self, preset: Preset):
        super().__init__()
        lay = preset.layout
        if lay.fpn_channels != lay.hidden:
            raise ValueError(
                f"layout preset {preset.name}: RoI features feed the box features directly, so fpn_channels "
                f"({lay.fpn_channels}) must equal hidden ({lay.hidden})"
            )
        d = lay.hidden
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, 4 * d))
        self.head_series = nn.ModuleList(CascadeStage(lay, preset.text.hidden_size) for _ in range(lay.cascade))
        self._reset_parameters(lay)

    def _reset_parameters(self, lay: LayoutSize) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for stage in self.head_series:
            for linear in (stage.GRAM.linear, stage.GRAM.linear2):  # GRAM's own init in the reference
                nn.init.normal_(linear.weight, std=0.01)
                nn.init.zeros_(linear.bias)
            nn.init.constant_(stage.class_logits.bias, -math.log((1 - FOCAL_PRIOR) / FOCAL_PRIOR))
            nn.init.normal_(stage.bboxes_delta.weight, std=0.01)
            nn.init.zeros_(stage.bboxes_delta.bias)

    def forward(self, boxes, timestep, p2, p3, p4, p5, text_features, text_mask):
        features = [p2, p3, p4, p5]
        hw = _shape_hw(p2) * FPN_STRIDES[0]
        image_whwh = torch.stack([hw[1], hw[0], hw[1], hw[0]])
        x = (boxes.clamp(-BOX_SCALE, BOX_SCALE) / BOX_SCALE + 1) / 2  # (cx, cy, w, h) in [0, 1]
        norm_boxes = torch.cat([x[..., :2] - 0.5 * x[..., 2:], x[..., :2] + 0.5 * x[..., 2:]], dim=-1)
        time = self.time_mlp(timestep)  # (B, 4C)
        text_mask = text_mask.to(text_features.dtype)
        current, box_features = norm_boxes * image_whwh, None
        for stage in self.head_series:
            logits, refined, box_features = stage(
                features, current, image_whwh, norm_boxes, box_features, time, text_features, text_mask
            )
            current = refined.detach()
        return logits, current / image_whwh


def build_layout(preset: Preset, weights: WeightsSource = WeightsSource()) -> dict[str, nn.Module]:
    """The three layout components as eval-mode float32 modules, keyed by spec name.

    Random init shares the other pipelines' seed for the text encoder (offset 0). A weights
    folder holds `text_encoder/` and `layout.safetensors` (`layout_backbone.*`, `layout_head.*`),
    loaded strictly.
    """
    if weights.path is None:
        text = _seeded(weights.seed, 0, lambda: CLIPTextModel(text_config(preset)))
        parts = {
            "layout_backbone": _seeded(weights.seed, 20, lambda: LayoutBackbone(preset)),
            "layout_head": _seeded(weights.seed, 21, lambda: LayoutHead(preset)),
        }
    else:
        root = Path(weights.path)
        weight_files(root)  # refuses pickled checkpoints before anything is read
        text = _load_text_encoder(root / "text_encoder")
        parts = {"layout_backbone": LayoutBackbone(preset), "layout_head": LayoutHead(preset)}
        load_parts(root / LAYOUT_FILE, parts)
    if text.config.hidden_size != preset.text.hidden_size:
        raise WeightsError(
            f"text_encoder hidden size {text.config.hidden_size} does not match preset {preset.name}'s "
            f"text hidden size {preset.text.hidden_size} (the layout head's text_features width)"
        )
    modules = {"text_encoder": TextEncoder(text), **parts}
    for module in modules.values():
        module.eval().requires_grad_(False)
    parts["layout_head"].parity_feed = _backbone_features(parts["layout_backbone"])
    return modules


def _backbone_features(backbone: "LayoutBackbone"):
    """Parity inputs for the head whose p2..p5 are the backbone's features of a random image.

    Six cascaded heads amplify differences in the boxes they pass on; on uniform noise in place
    of FPN features (features no backbone produces) float32 rounding alone grows past the fp32
    parity bound at the `small` preset, while on real features it stays near 1e-5. Read by
    `export.onnx_export.reference_cases`; a plain function, so no weights are shared or saved."""

    def feed(spec, env, rng: np.random.Generator) -> dict[str, np.ndarray]:
        sample = spec.sample_inputs(rng, env)
        image = rng.uniform(-1, 1, size=(env["B"], 3, 4 * env["feat_h"], 4 * env["feat_w"])).astype(np.float32)
        with torch.inference_mode():
            features = backbone(torch.from_numpy(image))
        sample.update({name: f.numpy() for name, f in zip(FPN_LEVELS, features)})
        return spec.cast_inputs(sample)

    return feed
