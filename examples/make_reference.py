"""Draw an example reference ad (a warm gradient backdrop, a podium, a bottle as its product)
and that product's mask, used in the README for the background pipeline.

    python examples/make_reference.py examples/reference_ad.png examples/reference_mask.png --width 256 --height 320
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("mask_out")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=320)
    args = parser.parse_args()
    ad, mask = draw_reference(args.width, args.height)
    ad.save(args.out)
    mask.save(args.mask_out)


if __name__ == "__main__":
    main()
