"""The last step of every pipeline: the product's own pixels pasted back over the generated
image through its mask, bit-exact inside it, with a narrow feathered seam outside."""

from __future__ import annotations

import numpy as np

from runtime.errors import InputError
from runtime.inputs.images import Product
from runtime.specs.core import describe_array


def compose(generated: np.ndarray, product: Product, feather: int = 2) -> np.ndarray:
    """Paste the product over the generated image.

    Pixels where `product.mask` is True are exactly `product.rgb`. Pixels outside the mask at
    chessboard distance d <= `feather` from it are blended with alpha = 1 - d / (feather + 1)
    (so strictly between 0 and 1) from the product's edge colour to `generated`; the edge
    colour is grown outward from the mask (mean of already-reached neighbours), so the
    product photo's old background never shows in the seam. Farther pixels are exactly
    `generated`. feather=0 is a hard paste. Returns a new (H, W, 3) uint8 array.
    """
    if not isinstance(generated, np.ndarray) or generated.dtype != np.uint8 or generated.ndim != 3 or generated.shape[2] != 3:
        raise ValueError(f"compose: generated: expected an (H, W, 3) uint8 array, got {describe_array(generated)}")
    if generated.shape != product.rgb.shape:
        raise ValueError(
            f"compose: generated {generated.shape} and product.rgb {product.rgb.shape} differ in shape"
        )
    if isinstance(feather, bool) or not isinstance(feather, (int, np.integer)) or feather < 0:
        raise InputError("feather", "expected an integer >= 0", feather)

    mask = product.mask
    out = generated.copy()
    if feather > 0 and mask.any():
        # Work only on the mask's bounding box grown by `feather` (plus 1 so edges stay exact).
        ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        f = int(feather)
        y0, y1 = max(0, ys[0] - f - 1), min(mask.shape[0], ys[-1] + f + 2)
        x0, x1 = max(0, xs[0] - f - 1), min(mask.shape[1], xs[-1] + f + 2)
        _feather_into(out[y0:y1, x0:x1], product.rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1], f)
    out[mask] = product.rgb[mask]
    return out


def _feather_into(out: np.ndarray, rgb: np.ndarray, mask: np.ndarray, feather: int) -> None:
    """Blend the ring of width `feather` around `mask` into `out` (a view), in place."""
    reached = mask.copy()
    colour = np.where(mask[..., None], rgb, 0).astype(np.float32)
    gen = out.astype(np.float32)
    for d in range(1, feather + 1):
        total, count = _neighbour_sum(colour, reached)
        new = ~reached & (count > 0)
        if not new.any():
            break
        edge = total[new] / count[new][:, None]
        colour[new] = edge
        reached |= new
        a = 1.0 - d / (feather + 1.0)
        out[new] = np.clip(np.rint(a * edge + (1.0 - a) * gen[new]), 0, 255).astype(np.uint8)


def _neighbour_sum(colour: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum of `colour` and count over the known 8-neighbours of every pixel."""
    h, w = known.shape
    k = np.pad(known, 1).astype(np.float32)
    c = np.pad(colour * known[..., None], ((1, 1), (1, 1), (0, 0)))
    total = np.zeros_like(colour)
    count = np.zeros((h, w), dtype=np.float32)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy == 1 and dx == 1:
                continue
            total += c[dy : dy + h, dx : dx + w]
            count += k[dy : dy + h, dx : dx + w]
    return total, count
