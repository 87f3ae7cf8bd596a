"""RADM's six cascaded relation-aware box heads (spec `layout_head`, every step): multi-level
RoIAlign, self-attention over boxes, dynamic convolution, VTRAM and GRAM. See
networks/layout/__init__.py for the architecture and its assumptions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from networks.common.attention import attend, attend_biased
from runtime.presets import LayoutSize, Preset
from runtime.specs.layout import (
    BBOX_WEIGHTS,
    BOX_SCALE,
    CANONICAL_BOX_SIZE,
    CANONICAL_LEVEL,
    FPN_STRIDES,
    POOLER_SAMPLING_RATIO,
    SCALE_CLAMP,
)

TEXT_MASK_BIAS = 1e4  # score bias of a padded text: large, finite
FOCAL_PRIOR = 0.01
GRAM_WAVELENGTH = 1000.0
GRAM_MIN = 1e-3
LEVEL_EPS = 1e-8
MIN_LEVEL, MAX_LEVEL = 2, 5


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
    Each box is pooled from its level only: every level is pooled (one RoIAlign each) and the
    box's own level selected.
    """
    image_hw = _shape_hw(features[0]) * FPN_STRIDES[0]
    pixel = boxes * torch.stack([image_hw[1], image_hw[0], image_hw[1], image_hw[0]])
    level = fpn_levels(pixel)  # (B, N)
    pooled = None
    for index, feat in enumerate(features):
        hw = _shape_hw(feat)
        # the level's pixel units from the normalised box, so a map of any size is pooled alike
        cells = RoIAlignLevel.apply(feat, boxes * torch.stack([hw[1], hw[0], hw[1], hw[0]]), output, sampling_ratio)
        chosen = (level == MIN_LEVEL + index).to(boxes.dtype)[:, :, None, None, None]
        pooled = cells * chosen if pooled is None else pooled + cells * chosen
    return pooled


class RoIAlignLevel(torch.autograd.Function):
    """Aligned RoIAlign of one feature map: feat (B, C, h, w), boxes (B, N, 4) x0, y0, x1, y1 in
    the map's pixel units -> (B, N, C, output, output), the average of sampling_ratio^2 bilinear
    samples per cell at pixel (x - 0.5, y - 0.5); a sample more than one pixel outside the map is
    0, one within a pixel of it reads the border.

    Eager torch computes it with one grid_sample; the exported graph holds ONNX's RoiAlign
    (opset 16, coordinate_transformation_mode half_pixel: the same arithmetic), which ONNX
    Runtime runs per box instead of through its slow GridSample, and TensorRT parses natively."""

    @staticmethod
    def forward(ctx, feat: torch.Tensor, boxes: torch.Tensor, output: int, sampling_ratio: int) -> torch.Tensor:
        b, n = boxes.shape[:2]
        h, w = feat.shape[2:]
        s = output * sampling_ratio
        # sample positions within the box, as fractions of its side: (p + (i + 0.5) / r) / output
        frac = (torch.arange(s, dtype=boxes.dtype, device=boxes.device) + 0.5) / s
        x0, y0, x1, y1 = boxes.unbind(-1)
        px = x0[..., None] + frac * (x1 - x0)[..., None] - 0.5  # (B, N, S) sample pixels
        py = y0[..., None] + frac * (y1 - y0)[..., None] - 0.5
        # grid_sample (align_corners=False) reads pixel p at (2p + 1) / size - 1
        gx = ((2 * px + 1) / w - 1)[:, :, None, :].expand(b, n, s, s)
        gy = ((2 * py + 1) / h - 1)[:, :, :, None].expand(b, n, s, s)
        grid = torch.stack([gx, gy], dim=-1).reshape(b, n, s * s, 2)
        inside_x = ((px >= -1) & (px <= w)).to(boxes.dtype)  # (B, N, S)
        inside_y = ((py >= -1) & (py <= h)).to(boxes.dtype)
        inside = (inside_y[:, :, :, None] * inside_x[:, :, None, :]).reshape(b, 1, n, s * s)
        sampled = F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=False) * inside
        c = sampled.shape[1]  # (B, C, N, S * S)
        cells = sampled.reshape(b, c, n, output, sampling_ratio, output, sampling_ratio).mean(dim=(4, 6))
        return cells.permute(0, 2, 1, 3, 4)

    @staticmethod
    def symbolic(g, feat, boxes, output: int, sampling_ratio: int):
        def const(values, dtype=torch.int64):
            return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))

        shape = g.op("Shape", boxes)  # (B, N, 4)
        batch_boxes = g.op("Slice", shape, const([0]), const([2]))  # [B, N]
        batch = g.op("Gather", shape, const(0))
        # box r of the flattened (B * N) list belongs to image r // N
        index = g.op("Range", const(0), batch, const(1))
        index = g.op("Reshape", g.op("Expand", g.op("Unsqueeze", index, const([1])), batch_boxes), const([-1]))
        pooled = g.op(
            "RoiAlign", feat, g.op("Reshape", boxes, const([-1, 4])), index,
            mode_s="avg", output_height_i=output, output_width_i=output, sampling_ratio_i=sampling_ratio,
            spatial_scale_f=1.0, coordinate_transformation_mode_s="half_pixel",
        )  # (B * N, C, output, output)
        return g.op("Reshape", pooled, g.op("Concat", batch_boxes, const([-1, output, output]), axis_i=0))


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
    """Visual-text relation: GELU(proj(RoI)) * attention(RoI + box -> texts), projected, pooled.

    `reference_views` (LayoutSize.reference_views, RADM's weights): the texts (B, L, D) are taken
    as the reference's `view(B, D, L)` gives them (not a transpose), and the output (B, N, 49, C)
    is pooled as its `reshape(., C, 49).mean(-1)` does (not the mean over the tokens)."""

    def __init__(self, hidden: int, text_dim: int, heads: int, tokens: int, reference_views: bool = False):
        super().__init__()
        self.reference_views = reference_views
        self.vis_project = nn.Sequential(Conv1x1(hidden, hidden))
        self.image_lang_att = VisualTextAttention(hidden, text_dim, heads, tokens)
        self.project_mm = nn.Sequential(Conv1x1(hidden, hidden))

    def forward(self, roi_tokens, box_token, texts, text_mask):
        """-> (B, N, C)."""
        b, n, tokens, c = roi_tokens.shape
        if self.reference_views:
            texts = texts.reshape(texts.shape[0], texts.shape[2], texts.shape[1]).transpose(1, 2)
        vis = F.gelu(self.vis_project[0](roi_tokens))
        lang = self.image_lang_att(roi_tokens, box_token, texts, text_mask)
        mixed = F.gelu(self.project_mm[0](vis * lang))  # (B, N, 49, C)
        if self.reference_views:
            return mixed.reshape(b, n, c, tokens).mean(dim=-1)
        return mixed.mean(dim=2)


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
        self.vis_text_att = VTRAM(d, text_dim, lay.vtram_heads, tokens, lay.reference_views)
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
    """forward(boxes, timestep, p2, p3, p4, p5, text_features, text_mask, image_size) -> (class_logits, pred_boxes).

    boxes (B, N, 4): noisy (cx, cy, w, h) scaled to [-2, 2]; timestep (B,); p2..p5 as the
    backbone's; text_features (B, L, D); text_mask (B, L) 1 = real text; image_size (B, 2) the
    (height, width) of the image within the backbone input (smaller than it where the input was
    padded, as RADM's reference pads). Returns the last head's class_logits (B, N, K) and
    pred_boxes (B, N, 4), x0, y0, x1, y1 / that image's size.
    With `proposal_frame` "hwhw" (RADM's weights) the noisy boxes become pixels and the clean ones
    are returned scaled by (H, W, H, W) instead, as the reference does: x by the canvas height.
    """

    def __init__(self, preset: Preset, text_dim: int | None = None):
        super().__init__()
        lay = preset.layout
        text_dim = preset.text.hidden_size if text_dim is None else text_dim  # width of the text features
        if lay.fpn_channels != lay.hidden:
            raise ValueError(
                f"layout preset {preset.name}: RoI features feed the box features directly, so fpn_channels "
                f"({lay.fpn_channels}) must equal hidden ({lay.hidden})"
            )
        d = lay.hidden
        self.proposal_frame = lay.proposal_frame
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, 4 * d))
        self.head_series = nn.ModuleList(CascadeStage(lay, text_dim) for _ in range(lay.cascade))
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

    def forward(self, boxes, timestep, p2, p3, p4, p5, text_features, text_mask, image_size):
        features = [p2, p3, p4, p5]
        hw = _shape_hw(p2) * FPN_STRIDES[0]
        image_whwh = torch.stack([hw[1], hw[0], hw[1], hw[0]])  # the backbone input, padding included: RoIs
        h, w = image_size[:, 0], image_size[:, 1]  # the image within it: what the boxes are relative to
        # proposals in pixels, and the frame the clean boxes are returned in (LayoutSize.proposal_frame)
        frame = torch.stack([h, w, h, w] if self.proposal_frame == "hwhw" else [w, h, w, h], dim=-1)[:, None, :]
        x = (boxes.clamp(-BOX_SCALE, BOX_SCALE) / BOX_SCALE + 1) / 2  # (cx, cy, w, h) in [0, 1]
        norm_boxes = torch.cat([x[..., :2] - 0.5 * x[..., 2:], x[..., :2] + 0.5 * x[..., 2:]], dim=-1)
        time = self.time_mlp(timestep)  # (B, 4C)
        text_mask = text_mask.to(text_features.dtype)
        current, box_features = norm_boxes * frame, None
        for stage in self.head_series:
            logits, refined, box_features = stage(
                features, current, image_whwh, norm_boxes, box_features, time, text_features, text_mask
            )
            current = refined.detach()
        return logits, current / frame
