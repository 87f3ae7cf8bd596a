"""A synthetic product cut-out (a sneaker-like shape, RGBA, alpha = mask) for demos, benchmarks
and tests, drawn at any size so it always fits a preset's canvas."""

from __future__ import annotations

from PIL import Image, ImageDraw


def draw_product(width: int, height: int) -> Image.Image:
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    d = ImageDraw.Draw(image)
    w, h = width, height
    sole = [(0.12 * w, 0.70 * h), (0.90 * w, 0.70 * h), (0.92 * w, 0.78 * h), (0.10 * w, 0.78 * h)]
    upper = [(0.14 * w, 0.70 * h), (0.18 * w, 0.48 * h), (0.42 * w, 0.40 * h), (0.60 * w, 0.52 * h),
             (0.86 * w, 0.60 * h), (0.88 * w, 0.70 * h)]
    d.polygon(upper, fill=(200, 40, 50, 255))
    d.polygon(sole, fill=(245, 245, 240, 255))
    for i in range(4):
        x = 0.30 * w + i * 0.06 * w
        d.line([(x, 0.47 * h), (x + 0.05 * w, 0.52 * h)], fill=(250, 250, 250, 255), width=max(1, w // 64))
    return image
