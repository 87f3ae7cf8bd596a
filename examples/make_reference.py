"""Draw an example reference ad (a warm gradient backdrop, a podium, a bottle as its product)
and that product's mask, used in the README for the background pipeline.

    python examples/make_reference.py examples/reference_ad.png examples/reference_mask.png --width 256 --height 320
"""

from __future__ import annotations

import argparse

from runtime.inputs.examples import draw_reference


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
