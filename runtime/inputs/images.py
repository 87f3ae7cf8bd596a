"""Image input/output for adgen: loading the merchant's product, placing it on the canvas, and
the array conversions the pipelines need (pasting it back is runtime.finishing.compose).

Only numpy and Pillow are used here (no torch). Every bad input raises `InputError` naming the
field ("product", "mask", "width", ...) and the rule it broke.

Choices, in one place:

* Only PNG, JPEG (with MPO, the JPEG variant phones write) and WebP are opened, by Pillow's own
  decoders: the formats product photos come in. Nothing else is even parsed: EPS, for one, is
  rendered by an external program (Ghostscript), and every extra format is a decoder an attacker
  can reach.
* Loading is lazy-first: `Image.open` only parses the header, so everything about size is
  checked before anything is decoded:
  - the pixel count against `max_pixels` (decompression bombs). Pillow's own bomb guard
    (`Image.MAX_IMAGE_PIXELS`, a global we do not change) is turned into an error and reported
    as `InputError` too, so the effective cap is the smaller of the two;
  - that the file holds enough data for the size its header claims: a PNG's deflate stream
    cannot compress more than 1032:1, and a Huffman-coded JPEG spends at least one bit per 8x8
    block, so a 100-byte file claiming 6000x6000 is refused unread (WebP lossless can code a
    flat image in almost nothing: for it the next rule is the bound);
  - with `decode_pixels` (what the canvas can use: `decode_budget`), a JPEG larger than that is
    decoded reduced (libjpeg's 1/2, 1/4, 1/8 DCT scaling) and a PNG or WebP larger than that is
    refused, so the decoded size is bounded by the canvas, not by the file.
* Truncated files are rejected: this module never sets `ImageFile.LOAD_TRUNCATED_IMAGES`.
* Only still images: animated GIF/PNG/WebP and multi-page TIFF are rejected. MPO (the JPEG
  variant many phones write, with a preview or depth image after the main picture) is not
  an animation, so its first (primary) picture is used.
* The EXIF orientation tag is applied, so the image is what a viewer shows.
* Modes are normalized to one of RGB, RGBA, L or LA:
  - 1 -> L; RGBX/YCbCr/other colour modes -> RGB; RGBa/La (premultiplied) -> RGBA/LA;
  - P and PA -> RGBA when the palette carries transparency, else RGB; L/RGB with a
    transparent colour key (PNG tRNS) -> RGBA;
  - CMYK -> RGB, through the embedded ICC profile to sRGB when there is one (littleCMS),
    else Pillow's plain conversion;
  - 16-bit greyscale (I;16, I;16B, I;16L, I;16N, and I holding values in [0, 65535]) ->
    L, scaled with round(v * 255 / 65535);
  - I with values outside [0, 65535] and F (float) are rejected.
  RGB pixels are taken as sRGB (an embedded RGB profile is not applied).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from runtime.errors import InputError
from runtime.presets import Preset
from runtime.specs.core import describe_array

__all__ = [
    "DECODED_FORMATS",
    "CLIP_MEAN",
    "CLIP_STD",
    "GREY",
    "MASK_THRESHOLD",
    "MAX_IMAGE_PIXELS",
    "PlacedProduct",
    "Placement",
    "Product",
    "canvas_size",
    "check_canvas_size",
    "clip_pixels",
    "decode_budget",
    "decode_mask",
    "from_model_image",
    "load_image",
    "load_product",
    "mask_values",
    "place_on_canvas",
    "placed_product",
    "png_bytes",
    "product_only",
    "resize_mask",
    "resize_mask_nearest",
    "save_png",
    "to_model_image",
]

MAX_IMAGE_PIXELS = 40_000_000
"""Default cap on width * height of an input image, checked from the header before decoding."""

DECODED_FORMATS = ("PNG", "JPEG", "WEBP")
"""The Pillow formats `load_image` opens (a JPEG may open as MPO: more pictures after the primary one)."""
FORMAT_NAMES = "PNG, JPEG or WebP"

DECODE_SIDE_FACTOR = 4
"""An image is decoded at most this many times the largest canvas side each way: past that the
downscale to the canvas gains nothing from more pixels."""

PNG_MAX_DEFLATE_RATIO = 1032  # deflate's best case: a 258-byte match in 2 bits
JPEG_MIN_BITS_PER_BLOCK = 1  # Huffman codes are at least one bit: each 8x8 block's DC costs one

GREY = 127
"""Neutral grey used to fill canvas area outside the placed product and to pad squares."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MASK_THRESHOLD = 128
"""A mask (or alpha) value at or above this marks the product."""
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")




def decode_budget(max_side: int) -> int:
    """The most pixels `load_image` decodes for a canvas whose sides are at most `max_side`."""
    return (DECODE_SIDE_FACTOR * max_side) ** 2


def load_image(
    path: str | os.PathLike[str], field: str, max_pixels: int = MAX_IMAGE_PIXELS, decode_pixels: int | None = None
) -> Image.Image:
    """Open a still PNG, JPEG or WebP image from a local path, safely, and return it decoded in
    mode RGB, RGBA, L or LA (see the module docstring for how other modes are converted).

    From the header, before decoding: the pixel count against `max_pixels`, the file's size
    against the data that many pixels need, and, with `decode_pixels`, the decoded size (a JPEG
    past it is decoded reduced, others are refused). Raises `InputError(field, ...)` when the
    file is missing, not a file, not one of those formats, too large, animated, truncated or
    corrupt, or in a mode that cannot be converted faithfully.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(field, "file not found", str(p))
    if not p.is_file():
        raise InputError(field, "expected an image file, not a directory or device", str(p))

    with warnings.catch_warnings():
        # Pillow's own bomb guard warns above Image.MAX_IMAGE_PIXELS: make that an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(p, formats=DECODED_FORMATS)
        except UnidentifiedImageError:
            raise InputError(field, f"is not a recognized image file: expected {FORMAT_NAMES}", str(p)) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(
                field, f"has too many pixels: at most {max_pixels} allowed", str(e)
            ) from None
        except Exception as e:  # OSError, SyntaxError, ValueError from a damaged header
            raise InputError(field, "could not be read as an image", f"{type(e).__name__}: {e}") from None

        with im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise InputError(field, "has an empty size", f"{w}x{h}")
            if w * h > max_pixels:
                raise InputError(
                    field,
                    f"has too many pixels: at most {max_pixels} allowed",
                    f"{w}x{h} = {w * h}",
                )
            _check_data_holds_pixels(p, im, field)
            try:
                frames = int(getattr(im, "n_frames", 1))
            except Exception as e:
                raise InputError(field, "could not be read as an image", f"{type(e).__name__}: {e}") from None
            if frames > 1 and im.format != "MPO":
                raise InputError(field, "expected a still image", f"{im.format} with {frames} frames")
            if decode_pixels is not None and w * h > decode_pixels:
                _decode_reduced(im, field, decode_pixels)

            if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone else flipped the global: do not accept
                raise InputError(
                    field, "cannot be checked for truncation (PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set)"
                )
            try:
                im.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise InputError(
                    field, f"has too many pixels: at most {max_pixels} allowed", str(e)
                ) from None
            except Exception as e:  # "image file is truncated", broken data streams, ...
                raise InputError(
                    field, "could not be decoded (truncated or corrupt file)", f"{type(e).__name__}: {e}"
                ) from None

            try:
                im = ImageOps.exif_transpose(im)
            except Exception:
                pass  # a broken EXIF block is not worth rejecting the picture for
            return _normalize_mode(im, field)


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel


def _minimum_bytes(path: Path, im: Image.Image) -> int:
    """The fewest bytes a file of `im`'s format can hold its header's size in (0: no bound)."""
    w, h = im.size
    if im.format == "PNG":
        with open(path, "rb") as f:
            ihdr = f.read(26)  # signature (8), chunk length and type (8), width, height, depth, colour type
        depth, colour = ihdr[24], ihdr[25]
        row = 1 + -(-w * _PNG_CHANNELS.get(colour, 1) * depth // 8)  # filter byte + samples
        return h * row // PNG_MAX_DEFLATE_RATIO
    if im.format in ("JPEG", "MPO"):
        return -(-w // 8) * -(-h // 8) * JPEG_MIN_BITS_PER_BLOCK // 8
    return 0


def _check_data_holds_pixels(path: Path, im: Image.Image, field: str) -> None:
    size, needed = path.stat().st_size, _minimum_bytes(path, im)
    if size < needed:
        w, h = im.size
        raise InputError(
            field, "holds less data than its header's size needs (truncated, or a decompression bomb)",
            f"{w}x{h} {im.format} in {size} bytes, at least {needed} needed",
        )


def _decode_reduced(im: Image.Image, field: str, decode_pixels: int) -> None:
    """Make a JPEG decode at the first DCT scale (1/2, 1/4, 1/8) within `decode_pixels`; refuse
    other formats, which have no reduced decoding."""
    w, h = im.size
    if im.format in ("JPEG", "MPO"):
        for k in (2, 4, 8):
            if -(-w // k) * -(-h // k) <= decode_pixels:
                im.draft(im.mode, (w // k, h // k))  # libjpeg decodes ceil(w / k) x ceil(h / k)
                if im.size[0] * im.size[1] <= decode_pixels:
                    return
                break
    raise InputError(
        field, f"has more pixels than this preset's canvas can use: at most {decode_pixels} "
        f"(a JPEG up to 64 times that is decoded reduced); scale it down first", f"{w}x{h} {im.format}",
    )


def _normalize_mode(im: Image.Image, field: str) -> Image.Image:
    """Convert a decoded image to RGB, RGBA, L or LA (rules in the module docstring)."""
    mode = im.mode
    has_key = "transparency" in im.info
    if mode in ("RGB", "L"):
        return im.convert("RGBA") if has_key else im.copy()
    if mode in ("RGBA", "LA"):
        return im.copy()
    if mode == "1":
        return im.convert("L")
    if mode in ("P", "PA"):
        if mode == "PA" or has_key or im.palette is not None and im.palette.mode == "RGBA":
            return im.convert("RGBA")
        return im.convert("RGB")
    if mode == "RGBa":
        return im.convert("RGBA")
    if mode == "La":
        return im.convert("LA")
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        a = np.asarray(im)
        if a.ndim != 2:
            raise InputError(field, f"has an unsupported {mode} layout", a.shape)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise InputError(
                field, "expected 8- or 16-bit pixel values (mode I with values in [0, 65535])",
                f"values in [{lo}, {hi}]",
            )
        a8 = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(a8)
    if mode == "F":
        raise InputError(field, "expected an 8- or 16-bit image, not floating point", mode)
    try:  # RGBX, YCbCr, LAB, HSV, ...
        return im.convert("RGB")
    except Exception:
        raise InputError(field, "has an unsupported pixel mode", mode) from None


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """CMYK -> sRGB through the embedded ICC profile when there is one, else Pillow's formula."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
            if out is not None:
                return out
        except Exception:
            pass  # no littleCMS, or a broken profile: fall back to the plain conversion
    return im.convert("RGB")




@dataclass(frozen=True)
class Product:
    """The product to advertise: `rgb` (H, W, 3) uint8 and `mask` (H, W) bool, True on the
    product. Pixels where `mask` is True are pasted back bit-exactly by `compose`."""

    rgb: np.ndarray
    mask: np.ndarray

    def __post_init__(self) -> None:
        rgb, mask = self.rgb, self.mask
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"Product.rgb: expected an (H, W, 3) uint8 array, got {describe_array(rgb)}")
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != rgb.shape[:2]:
            raise ValueError(
                f"Product.mask: expected an {rgb.shape[:2]} bool array, got {describe_array(mask)}"
            )

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def load_product(
    product_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str] | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    decode_pixels: int | None = None,
) -> Product:
    """Load the product photo and its mask.

    With `mask_path`, the mask image (any mode) must have the product's size; it is read as
    greyscale (transparent parts of a mask with alpha count as black) and is True where the
    value is >= 128. The product's own alpha, if any, is then ignored for the mask. Without
    `mask_path`, the product must carry alpha (RGBA, LA, or a palette/colour key with
    transparency) and the mask is alpha >= 128.

    Colours of fully transparent product pixels are meaningless (often black); they are
    replaced by neutral grey so they cannot bleed into resized edges.

    Raises InputError when the mask is missing, of another size, empty, or covers the whole
    image (then there is nothing left to generate).
    """
    im = load_image(product_path, "product", max_pixels, decode_pixels)
    alpha = None
    if im.mode in ("RGBA", "LA"):
        alpha = np.asarray(im.getchannel("A"))
    rgb = np.array(im.convert("RGB"), dtype=np.uint8)

    if mask_path is not None:
        m = load_image(mask_path, "mask", max_pixels, decode_pixels)
        if m.size != im.size:
            raise InputError(
                "mask",
                f"expected the product's size {im.size[0]}x{im.size[1]}",
                f"{m.size[0]}x{m.size[1]}",
            )
        mask = decode_mask(m)
    elif alpha is not None:
        mask = alpha >= MASK_THRESHOLD
    else:
        raise InputError(
            "product",
            "expected an RGBA image (alpha = product mask) or --mask for an RGB image",
            im.mode,
        )

    if alpha is not None:
        rgb[alpha == 0] = GREY
    _check_mask(mask)
    return Product(rgb=rgb, mask=mask)


def mask_values(m: Image.Image) -> np.ndarray:
    """(H, W) uint8 greyscale value of a mask image; transparent parts count as black (the value
    is composited over black)."""
    if m.mode in ("RGBA", "LA"):
        value = np.asarray(m.convert("L"), dtype=np.uint16)
        a = np.asarray(m.getchannel("A"), dtype=np.uint16)
        return ((value * a + 127) // 255).astype(np.uint8)
    return np.asarray(m.convert("L"))


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W) bool -> (height, width) bool: resized with Lanczos as 0/255, thresholded like a mask image."""
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.LANCZOS)
    return np.asarray(resized) >= MASK_THRESHOLD


def decode_mask(m: Image.Image) -> np.ndarray:
    """(H, W) bool: True where the mask image marks the product (value >= MASK_THRESHOLD)."""
    return mask_values(m) >= MASK_THRESHOLD


def _check_mask(mask: np.ndarray, when: str = "") -> None:
    if not mask.any():
        raise InputError(
            "mask",
            f"is empty{when}: no pixel marks the product (expected mask/alpha >= {MASK_THRESHOLD} on it)",
        )
    if mask.all():
        raise InputError("mask", f"covers the whole image{when}: nothing left to generate")




@dataclass(frozen=True)
class Placement:
    """Where the product went on the canvas: `scale` applied to it, `offset` (x, y) of its
    top-left corner, and `size` (w, h) of the placed product."""

    scale: float
    offset: tuple[int, int]
    size: tuple[int, int]
    stretched: bool = False  # the photo fills the canvas, its aspect ratio not kept (`stretch_on_canvas`)

    def to_dict(self) -> dict:
        placed = {"scale": round(self.scale, 6), "offset": list(self.offset), "size": list(self.size)}
        return placed | ({"stretched": True} if self.stretched else {})


def place_on_canvas(product: Product, width: int, height: int) -> tuple[Product, Placement]:
    """Fit the product inside a width x height canvas.

    A product that is already width x height is returned unchanged (the same object, so its
    pixels stay bit-exact) with scale 1.0 and offset (0, 0). Otherwise it is scaled to fit,
    keeping its aspect ratio (rgb with Lanczos; the mask resized with Lanczos as 0/255 and
    thresholded at 128), centred, on a grey (127) background with mask False outside it. The
    returned Product is what later stages treat as the input product.
    """
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise InputError(name, "expected a positive integer", v)
    width, height = int(width), int(height)
    h, w = product.rgb.shape[:2]
    if (w, h) == (width, height):
        return product, Placement(scale=1.0, offset=(0, 0), size=(w, h))

    scale = min(width / w, height / h)
    nw = min(width, max(1, round(w * scale)))
    nh = min(height, max(1, round(h * scale)))
    x0, y0 = (width - nw) // 2, (height - nh) // 2

    rgb_small = Image.fromarray(np.ascontiguousarray(product.rgb)).resize((nw, nh), Image.LANCZOS)
    mask_small = resize_mask(product.mask, nw, nh)

    rgb = np.full((height, width, 3), GREY, dtype=np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    rgb[y0 : y0 + nh, x0 : x0 + nw] = np.asarray(rgb_small)
    mask[y0 : y0 + nh, x0 : x0 + nw] = mask_small
    _check_mask(mask, when=f" after scaling the product to {nw}x{nh} for the {width}x{height} canvas")
    return Product(rgb=rgb, mask=mask), Placement(scale=float(scale), offset=(x0, y0), size=(nw, nh))


def check_canvas_size(width, height, min_side: int, max_side: int, multiple: int = 8) -> None:
    """Raise InputError("width"/"height", ...) unless each side is an integer multiple of
    `multiple` within [min_side, max_side]."""
    for name, v in (("width", width), ("height", height)):
        ok = (
            not isinstance(v, bool)
            and isinstance(v, (int, np.integer))
            and v % multiple == 0
            and min_side <= v <= max_side
        )
        if not ok:
            raise InputError(name, f"expected a multiple of {multiple} in [{min_side}, {max_side}]", v)




def canvas_size(product_w: int, product_h: int, width: int | None, height: int | None, preset: Preset) -> tuple[int, int]:
    """The requested size; else the product's own size when the preset allows it; else the preset default."""
    if width is None and height is None:
        try:
            check_canvas_size(product_w, product_h, preset.min_side, preset.max_side)
            return product_w, product_h
        except InputError:
            return preset.default_width, preset.default_height
    width = preset.default_width if width is None else width
    height = preset.default_height if height is None else height
    check_canvas_size(width, height, preset.min_side, preset.max_side)
    return width, height


@dataclass(frozen=True)
class PlacedProduct:
    """A request's product: the file it came from, its size as loaded, where it went on the
    canvas, the product on the canvas (what every later stage treats as the product) and the
    photo as loaded."""

    path: str
    size: tuple[int, int]
    placement: Placement
    product: Product
    photo: Product

    def to_dict(self) -> dict:
        return {"path": self.path, "size": list(self.size), "placement": self.placement.to_dict()}


def placed_product(
    preset: Preset,
    product: str | os.PathLike[str],
    mask: str | os.PathLike[str] | None,
    width: int | None,
    height: int | None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    stretch: bool = False,
) -> PlacedProduct:
    """Load the product (and its mask) and place it on its canvas: the size asked for, else its
    own when the preset allows it, else the preset's default. With `stretch` the canvas is the
    size asked for or the preset's default, and the photo is stretched onto it. At most
    `decode_budget` of the preset's largest side is decoded."""
    item = load_product(product, mask, max_pixels=max_pixels, decode_pixels=decode_budget(preset.max_side))
    if stretch:
        width, height = canvas_size(0, 0, width, height, preset)  # no own size to keep: asked for, else the default
        placed, placement = stretch_on_canvas(item, width, height)
    else:
        width, height = canvas_size(item.width, item.height, width, height, preset)
        placed, placement = place_on_canvas(item, width, height)
    return PlacedProduct(str(product), (item.width, item.height), placement, placed, item)


def stretch_on_canvas(product: Product, width: int, height: int) -> tuple[Product, Placement]:
    """The photo resized to fill a width x height canvas, aspect ratio not kept (rgb bilinear, the
    mask as `place_on_canvas` resizes it)."""
    rgb = resize_rgb(product.rgb, width, height)
    mask = resize_mask(product.mask, width, height)
    _check_mask(mask, when=f" after stretching the product to the {width}x{height} canvas")
    scale = float(np.sqrt(width * height / (product.width * product.height)))
    return Product(rgb=rgb, mask=mask), Placement(scale=scale, offset=(0, 0), size=(width, height), stretched=True)


def product_only(product: Product, fill: int = GREY) -> np.ndarray:
    """The product on a plain `fill` colour (neutral grey by default), (H, W, 3) uint8: what the
    encoders see of it."""
    return np.where(product.mask[..., None], product.rgb, np.uint8(fill))


def long_side_resized(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """RefAdGen's reference resize of a photo for a width x height canvas: scaled (bilinear) so its
    short side is the canvas's short side, then so its long side is the canvas's long side, each
    size rounded; then its sides floored to a multiple of 64 (at a 512-wide canvas; scaled with
    the canvas) and resized to that (bilinear)."""
    short, long = min(width, height), max(width, height)
    multiple = max(8, round(64 * short / 512))
    h, w = rgb.shape[:2]
    ratio = short / min(h, w)
    w, h = round(ratio * w), round(ratio * h)
    ratio = long / max(h, w)
    w, h = round(ratio * w), round(ratio * h)
    first = resize_rgb(rgb, w, h)
    return resize_rgb(first, max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple))


def resize_rgb(rgb: np.ndarray, width: int, height: int, resample: int = Image.BILINEAR) -> np.ndarray:
    """(H, W, 3) uint8 resized to (height, width, 3), aspect ratio not kept."""
    return np.asarray(Image.fromarray(rgb).resize((int(width), int(height)), resample))


def to_model_image(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> float32 (1, 3, H, W) in [-1, 1] (x / 127.5 - 1)."""
    _check_rgb(rgb, "to_model_image: rgb")
    x = rgb.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def from_model_image(x: np.ndarray) -> list[np.ndarray]:
    """(B, 3, H, W) (or (3, H, W)) float in [-1, 1] -> list of B (H, W, 3) uint8 arrays,
    computed as round((clip(x, -1, 1) + 1) * 127.5). NaN or inf raise ValueError: they mean
    the model failed and must not turn silently into some colour."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"from_model_image: expected a (B, 3, H, W) float array, got {describe_array(x)}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError("from_model_image: the model image contains NaN or inf values")
    u8 = np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return [np.ascontiguousarray(img.transpose(1, 2, 0)) for img in u8]


def resize_mask_nearest(mask: np.ndarray, h: int, w: int, corner: bool = False) -> np.ndarray:
    """(H, W) bool mask -> float32 (h, w) of 0.0/1.0, nearest-neighbour (e.g. to latent size).

    Pillow samples each output pixel at its centre, source floor((i + 0.5) * H / h); with
    `corner`, at its corner, source floor(i * H / h), as torch's `interpolate(mode="nearest")`."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise ValueError(f"resize_mask_nearest: expected an (H, W) bool array, got {describe_array(mask)}")
    if h <= 0 or w <= 0:
        raise ValueError(f"resize_mask_nearest: expected a positive size, got {h}x{w}")
    if corner:
        rows = np.minimum(np.floor(np.arange(h) * (mask.shape[0] / h)).astype(np.int64), mask.shape[0] - 1)
        cols = np.minimum(np.floor(np.arange(w) * (mask.shape[1] / w)).astype(np.int64), mask.shape[1] - 1)
        return mask.astype(bool)[rows[:, None], cols[None, :]].astype(np.float32)
    im = Image.fromarray(mask.astype(bool).astype(np.uint8) * 255)
    small = np.asarray(im.resize((int(w), int(h)), Image.NEAREST))
    return (small >= MASK_THRESHOLD).astype(np.float32)


def clip_pixels(
    rgb: np.ndarray,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    crop: bool = False,
) -> np.ndarray:
    """CLIP image input: pad (H, W, 3) uint8 to a centred square with grey, resize to
    size x size (bicubic), scale to [0, 1] and normalize per channel -> float32 (1, 3, size, size).

    With `crop`, as transformers' CLIPImageProcessor does instead: resize the short side to
    `size` (bicubic), then take the centred size x size crop (what falls outside is lost)."""
    _check_rgb(rgb, "clip_pixels: rgb")
    if size <= 0:
        raise ValueError(f"clip_pixels: expected a positive size, got {size}")
    h, w = rgb.shape[:2]
    if crop:
        short, long = (w, h) if w <= h else (h, w)
        other = int(size * long / short)  # transformers' shortest-edge rule truncates the long side
        sw, sh = (size, other) if w <= h else (other, size)
        resized = Image.fromarray(rgb).resize((sw, sh), Image.BICUBIC)
        x0, y0 = (sw - size) // 2, (sh - size) // 2
        im = resized.crop((x0, y0, x0 + size, y0 + size))
    else:
        side = max(h, w)
        square = np.full((side, side, 3), GREY, dtype=np.uint8)
        y0, x0 = (side - h) // 2, (side - w) // 2
        square[y0 : y0 + h, x0 : x0 + w] = rgb
        im = Image.fromarray(square).resize((int(size), int(size)), Image.BICUBIC)
    x = np.asarray(im).astype(np.float32) / 255.0
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def save_png(path: str | os.PathLike[str], rgb: np.ndarray, field: str = "output") -> None:
    """Write an (H, W, 3) uint8 array as a PNG. An unwritable path raises InputError(field)."""
    try:
        Path(path).write_bytes(png_bytes(rgb))
    except OSError as e:
        raise InputError(field, "could not be written", f"{path}: {e.strerror or e}") from None


def png_bytes(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as the bytes of a PNG file."""
    _check_rgb(rgb, "png_bytes: rgb")
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(out, format="PNG")
    return out.getvalue()


def _check_rgb(rgb: object, name: str) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{name}: expected an (H, W, 3) uint8 array, got {describe_array(rgb)}")
