"""Draw the example product (a sneaker-like cut-out, RGBA, alpha = mask) used in the README.

    python examples/make_product.py examples/shoe.png --width 128 --height 160
"""

from __future__ import annotations

import argparse

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=160)
    args = parser.parse_args()
    draw_product(args.width, args.height).save(args.out)


if __name__ == "__main__":
    main()
