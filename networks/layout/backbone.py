"""RADM's image backbone: detectron2's ResNet-50 + FPN over the canvas (spec `layout_backbone`,
once per request). See networks/layout/__init__.py for the architecture and its assumptions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.presets import Preset
from runtime.specs.layout import PIXEL_MEAN, PIXEL_STD


class FrozenBatchNorm2d(nn.Module):
    """detectron2's FrozenBN: a fixed per-channel affine map from BatchNorm statistics, four
    buffers (no `num_batches_tracked`), as RADM's checkpoints hold them."""

    EPS = 1e-5

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        # eval-mode batch norm: exported as BatchNormalization, which the exporter folds into the conv
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.EPS)


class ConvNorm(nn.Conv2d):
    """Bias-free convolution followed by its frozen BatchNorm (detectron2's `Conv2d(norm=...)`)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.norm = FrozenBatchNorm2d(cout)

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
