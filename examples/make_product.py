"""Draw the example product (a sneaker-like cut-out, RGBA, alpha = mask) used in the README.

    python examples/make_product.py examples/shoe.png --width 128 --height 160
"""

from __future__ import annotations

import argparse

from runtime.inputs.examples import draw_product


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=160)
    args = parser.parse_args()
    draw_product(args.width, args.height).save(args.out)


if __name__ == "__main__":
    main()
