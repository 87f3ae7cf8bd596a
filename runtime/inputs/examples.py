"""Synthetic inputs for demos, benchmarks and tests, drawn at any size so they fit a preset's
canvas: a product cut-out (a sneaker-like shape, RGBA, alpha = mask) and a reference ad (a
gradient backdrop, a podium, a bottle as its product) with that product's mask."""

from __future__ import annotations

import numpy as np
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


def draw_reference(width: int, height: int) -> tuple[Image.Image, Image.Image]:
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    top, bottom = np.array([250, 200, 120]), np.array([180, 70, 60])
    backdrop = ((1 - y) * top + y * bottom) * np.ones((1, width, 1))
    ad = Image.fromarray(backdrop.astype(np.uint8), "RGB")
    mask = Image.new("L", (width, height), 0)
    d, m = ImageDraw.Draw(ad), ImageDraw.Draw(mask)
    w, h = width, height
    d.ellipse([0.15 * w, 0.72 * h, 0.85 * w, 0.86 * h], fill=(240, 235, 225))  # podium: background, not product
    bottle = [0.38 * w, 0.32 * h, 0.62 * w, 0.78 * h]
    d.rounded_rectangle(bottle, radius=int(0.04 * w), fill=(40, 90, 160))
    m.rounded_rectangle(bottle, radius=int(0.04 * w), fill=255)
    return ad, mask
