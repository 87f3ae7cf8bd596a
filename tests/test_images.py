"""Tests for runtime.images. Every test image is made here, in tmp_path."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from environment import REQUIRE_GHOSTSCRIPT, env_flag
from PIL import EpsImagePlugin, Image, ImageFile

from runtime.errors import InputError
from runtime.finishing.compose import compose
from runtime.inputs.images import (
    CLIP_MEAN,
    CLIP_STD,
    Placement,
    Product,
    check_canvas_size,
    clip_pixels,
    decode_budget,
    from_model_image,
    load_image,
    load_product,
    place_on_canvas,
    placed_product,
    resize_mask_nearest,
    save_png,
    to_model_image,
)

RED = (200, 30, 10)
BLUE = (10, 40, 220)


def _rgba_product(h=48, w=64, box=(10, 12, 40, 50)):
    """RGBA array: a noisy product inside box (y0, x0, y1, x1), transparent black outside."""
    rng = np.random.default_rng(0)
    a = np.zeros((h, w, 4), dtype=np.uint8)
    y0, x0, y1, x1 = box
    a[y0:y1, x0:x1, :3] = rng.integers(0, 256, size=(y1 - y0, x1 - x0, 3), dtype=np.uint8)
    a[y0:y1, x0:x1, 3] = 255
    return a


def _save(tmp_path, name, arr_or_im, **kw):
    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    p = tmp_path / name
    im.save(p, **kw)
    return p


def _box_product(h, w, box, inside=RED, outside=(0, 0, 0)):
    y0, x0, y1, x1 = box
    rgb = np.zeros((h, w, 3), dtype=np.uint8)
    rgb[:] = outside
    rgb[y0:y1, x0:x1] = inside
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return Product(rgb=rgb, mask=mask)


def _raises(field, fn, *args, **kw):
    with pytest.raises(InputError) as ei:
        fn(*args, **kw)
    assert ei.value.field == field
    assert str(ei.value).startswith(f"{field}: ")
    return str(ei.value)


# --------------------------------------------------------------------------- bad inputs


def test_missing_file_names_field(tmp_path):
    msg = _raises("product", load_image, tmp_path / "nope.png", "product")
    assert "not found" in msg


def test_directory_is_rejected(tmp_path):
    msg = _raises("mask", load_image, tmp_path, "mask")
    assert "image file" in msg


def test_text_file_named_png_is_not_an_image(tmp_path):
    p = tmp_path / "fake.png"
    p.write_text("this is not a picture\n")
    msg = _raises("product", load_image, p, "product")
    assert "not a recognized image" in msg


def test_truncated_png_is_rejected(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    p = _save(tmp_path, "full.png", noise)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    msg = _raises("product", load_image, p, "product")
    assert "truncated" in msg
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_rejected_before_decoding(tmp_path, monkeypatch):
    p = _save(tmp_path, "big.png", np.zeros((2000, 2000), dtype=np.uint8))

    def no_decode(self):  # the size check must come first
        raise AssertionError("decoded despite too many pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    msg = _raises("product", load_image, p, "product", max_pixels=1_000_000)
    assert "too many pixels" in msg and "2000x2000" in msg


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_header_only_huge_png_is_rejected(tmp_path):
    # A ~100 KB file whose header claims 60000 x 60000 pixels (3.6 Gpx): caught from the header.
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100_000)
    p = tmp_path / "bomb.png"
    p.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )
    msg = _raises("product", load_image, p, "product")  # Pillow's own guard fires in open()
    assert "too many pixels" in msg
    msg = _raises("mask", load_image, p, "mask", max_pixels=10**12)
    assert "too many pixels" in msg


@pytest.mark.parametrize("name, image", [
    ("still.gif", Image.new("RGB", (16, 16), RED)),
    ("photo.tiff", Image.new("RGB", (16, 16), RED)),
    ("photo.bmp", Image.new("RGB", (16, 16), RED)),
    ("float.tiff", Image.fromarray(np.ones((8, 8), dtype=np.float32))),
])
def test_formats_other_than_png_jpeg_webp_are_not_decoded(tmp_path, name, image):
    p = _save(tmp_path, name, image)
    with Image.open(p) as plain:
        plain.load()  # Pillow alone would decode it
    msg = _raises("product", load_image, p, "product")
    assert "is not a recognized image file: expected PNG, JPEG or WebP" in msg


def test_webp_is_decoded(tmp_path):
    p = _save(tmp_path, "p.webp", _rgba_product(), lossless=True)
    assert np.array_equal(np.asarray(load_image(p, "product")), _rgba_product())


EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 16 16
newpath 0 0 moveto 16 0 lineto 16 16 lineto 0 16 lineto closepath 0.5 setgray fill
showpage
%%EOF
"""


def test_eps_never_reaches_ghostscript(tmp_path, monkeypatch):
    """Pillow hands an EPS file to Ghostscript, an external program running its PostScript. A
    recording stand-in for `gs` (which runs the real one) shows plain Pillow calls it for this
    file, and `load_image` does not, even under a .png name."""
    real = shutil.which("gs")
    if real is None:
        if env_flag(REQUIRE_GHOSTSCRIPT):
            pytest.fail(f"{REQUIRE_GHOSTSCRIPT}=1 but Ghostscript (gs) is not installed")
        pytest.skip("Ghostscript (gs) is not installed")
    calls = tmp_path / "gs-calls"
    shim = tmp_path / "gs"
    shim.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {real} "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", str(shim))
    eps = tmp_path / "product.eps"
    eps.write_bytes(EPS)
    with Image.open(eps) as plain:
        plain.load()
        assert plain.size == (16, 16)
    assert calls.read_text(), "plain Pillow did not run Ghostscript: the test file proves nothing"
    calls.unlink()
    for name in ("product.eps", "product.png"):
        disguised = tmp_path / name
        disguised.write_bytes(EPS)
        msg = _raises("product", load_image, disguised, "product")
        assert "is not a recognized image file" in msg
        with pytest.raises(InputError, match="not a recognized image file"):
            load_product(disguised)
    assert not calls.exists(), "load_image ran Ghostscript"


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny valid-looking PNG whose header claims width x height greyscale pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return path


def _no_decode(monkeypatch):
    def no_decode(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)


def test_header_promising_more_pixels_than_the_data_holds_is_refused_unread(tmp_path, monkeypatch):
    png = _png_claiming(tmp_path / "bomb.png", 6000, 6000)
    assert png.stat().st_size < 120
    jpeg = tmp_path / "bomb.jpg"
    Image.new("L", (16, 16)).save(jpeg, quality=50)
    data = bytearray(jpeg.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 6000, 6000)  # SOF0 height, width
    jpeg.write_bytes(bytes(data))
    _no_decode(monkeypatch)
    for path, fmt in ((png, "PNG"), (jpeg, "JPEG")):
        msg = _raises("product", load_image, path, "product")
        assert "holds less data than its header's size needs" in msg and f"6000x6000 {fmt}" in msg, msg


def test_a_real_png_passes_the_data_check(tmp_path):
    """Flat images compress best: a flat 2000 x 2000 PNG is far above the deflate bound."""
    p = _save(tmp_path, "flat.png", np.zeros((2000, 2000), dtype=np.uint8))
    assert load_image(p, "mask").size == (2000, 2000)


def test_png_past_what_the_canvas_can_use_is_refused_unread(tmp_path, monkeypatch, tiny):
    budget = decode_budget(tiny.max_side)
    width = budget // 8 + 64
    p = _save(tmp_path, "big.png", np.random.default_rng(0).integers(0, 256, (8, width), dtype=np.uint8))
    _no_decode(monkeypatch)
    msg = _raises("product", placed_product, tiny, p, None, None, None)
    assert f"at most {budget}" in msg and f"{width}x8 PNG" in msg


def test_jpeg_past_what_the_canvas_can_use_is_decoded_reduced(tmp_path, tiny):
    budget = decode_budget(tiny.max_side)
    rgba = np.zeros((4400, 2200, 3), dtype=np.uint8)
    rgba[1000:3400, 500:1700] = RED
    product = _save(tmp_path, "big.jpg", rgba, quality=90)
    mask = np.zeros((4400, 2200), dtype=np.uint8)
    mask[1000:3400, 500:1700] = 255
    mask_path = _save(tmp_path, "mask.jpg", mask, quality=95)
    placed = placed_product(tiny, product, mask_path, 256, 512)
    assert placed.size == (1100, 2200) and 1100 * 2200 <= budget  # decoded at 1/2
    assert placed.product.rgb.shape == (512, 256, 3)


def test_mask_of_another_size_names_both_sizes(tmp_path):
    prod = _save(tmp_path, "p.png", np.full((40, 60, 3), 50, dtype=np.uint8))
    mask = _save(tmp_path, "m.png", np.full((30, 60), 255, dtype=np.uint8))
    msg = _raises("mask", load_product, prod, mask)
    assert "60x40" in msg and "60x30" in msg


def test_empty_mask_is_rejected(tmp_path):
    prod = _save(tmp_path, "p.png", np.full((40, 60, 3), 50, dtype=np.uint8))
    mask = _save(tmp_path, "m.png", np.full((40, 60), 127, dtype=np.uint8))  # all below 128
    msg = _raises("mask", load_product, prod, mask)
    assert "is empty" in msg


def test_empty_alpha_is_rejected(tmp_path):
    a = np.zeros((20, 20, 4), dtype=np.uint8)
    msg = _raises("mask", load_product, _save(tmp_path, "p.png", a))
    assert "is empty" in msg


def test_full_mask_is_rejected(tmp_path):
    prod = _save(tmp_path, "p.png", np.full((40, 60, 3), 50, dtype=np.uint8))
    mask = _save(tmp_path, "m.png", np.full((40, 60), 128, dtype=np.uint8))
    msg = _raises("mask", load_product, prod, mask)
    assert "covers the whole image" in msg


def test_rgb_without_mask_is_rejected(tmp_path):
    prod = _save(tmp_path, "p.png", np.full((40, 60, 3), 50, dtype=np.uint8))
    msg = _raises("product", load_product, prod)
    assert "expected an RGBA image" in msg and "--mask" in msg


@pytest.mark.parametrize(
    "width,height,field",
    [(500, 512, "width"), (512, 500, "height"), (128, 512, "width"), (512, 4096, "height"),
     (512.0, 512, "width"), (True, 512, "width"), ("512", 512, "width")],
)
def test_bad_canvas_sizes(width, height, field):
    msg = _raises(field, check_canvas_size, width, height, 256, 1024)
    assert "expected a multiple of 8 in [256, 1024]" in msg


def test_good_canvas_sizes_pass():
    check_canvas_size(256, 1024, 256, 1024)
    check_canvas_size(np.int64(512), 768, 256, 1024, multiple=64)


# --------------------------------------------------------------------------- conversions


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    im = Image.new("CMYK", (32, 24), (0, 255, 255, 0))  # pure red in CMYK
    p = _save(tmp_path, "c.jpg", im, quality=95)
    out = load_image(p, "product")
    assert out.mode == "RGB" and out.size == (32, 24)
    r, g, b = np.asarray(out).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_16bit_greyscale_png_is_scaled_to_8bit(tmp_path):
    a = np.zeros((4, 8), dtype=np.uint16)
    a[:, 0], a[:, 1], a[:, 2], a[:, 3] = 0, 257 * 100, 65535, 32896
    p = _save(tmp_path, "g16.png", Image.fromarray(a))
    with Image.open(p) as raw:
        assert raw.mode.startswith("I")
    out = load_image(p, "mask")
    assert out.mode == "L"
    got = np.asarray(out)
    assert got[0, 0] == 0 and got[0, 1] == 100 and got[0, 2] == 255 and got[0, 3] == 128


def test_palette_with_transparency_becomes_rgba_and_mask(tmp_path):
    im = Image.new("P", (20, 10), 0)
    im.putpalette([0, 0, 0, *RED] + [0] * (256 * 3 - 6))
    px = np.zeros((10, 20), dtype=np.uint8)
    px[2:8, 5:15] = 1
    im.putdata(px.ravel().tolist())
    p = _save(tmp_path, "p.png", im, transparency=0)
    assert load_image(p, "product").mode == "RGBA"
    prod = load_product(p)
    assert np.array_equal(prod.mask, px == 1)
    assert (prod.rgb[prod.mask] == RED).all()


def test_la_image_gives_grey_rgb_and_alpha_mask(tmp_path):
    la = np.zeros((16, 16, 2), dtype=np.uint8)
    la[..., 0] = 90
    la[4:12, 4:12, 1] = 255
    la[0, 0, 1] = 127  # just below the threshold
    la[0, 1, 1] = 128  # at the threshold
    p = _save(tmp_path, "la.png", _la_image(la))
    prod = load_product(p)
    assert prod.rgb.shape == (16, 16, 3) and prod.rgb.dtype == np.uint8
    assert (prod.rgb[prod.mask] == 90).all()
    expected = la[..., 1] >= 128
    assert np.array_equal(prod.mask, expected)


def _la_image(la):
    return Image.merge("LA", [Image.fromarray(la[..., 0]), Image.fromarray(la[..., 1])])


def test_rgba_product_is_exact_and_mask_from_alpha(tmp_path):
    a = _rgba_product()
    prod = load_product(_save(tmp_path, "p.png", a))
    assert np.array_equal(prod.mask, a[..., 3] >= 128)
    assert np.array_equal(prod.rgb[prod.mask], a[..., :3][prod.mask])


def test_rgb_plus_mask_file(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    m = np.zeros((30, 40), dtype=np.uint8)
    m[5:20, 10:30] = 200
    prod = load_product(_save(tmp_path, "p.jpg.png", rgb), _save(tmp_path, "m.png", Image.fromarray(m).convert("RGB")))
    assert np.array_equal(prod.rgb, rgb)
    assert np.array_equal(prod.mask, m >= 128)


# --------------------------------------------------------------------------- compose


def test_compose_inside_mask_is_bit_exact_and_far_is_generated():
    prod = _box_product(40, 50, (10, 10, 30, 40), inside=RED, outside=(0, 255, 0))
    gen = np.zeros((40, 50, 3), dtype=np.uint8)
    gen[:] = BLUE
    out = compose(gen, prod, feather=3)
    assert np.array_equal(out[prod.mask], prod.rgb[prod.mask])
    far = np.ones((40, 50), dtype=bool)
    far[10 - 3 : 30 + 3, 10 - 3 : 40 + 3] = False
    assert np.array_equal(out[far], gen[far])


def test_compose_feather_ring_is_strictly_between():
    prod = _box_product(40, 50, (10, 10, 30, 40), inside=RED, outside=(0, 255, 0))
    gen = np.zeros((40, 50, 3), dtype=np.uint8)
    gen[:] = BLUE
    out = compose(gen, prod, feather=2).astype(int)
    ring = np.zeros((40, 50), dtype=bool)
    ring[8:32, 8:42] = True
    ring &= ~prod.mask
    lo = np.minimum(RED, BLUE)
    hi = np.maximum(RED, BLUE)
    assert ring.sum() > 0
    assert ((out[ring] > lo) & (out[ring] < hi)).all()
    # the product photo's old background (green) never shows in the seam
    assert (out[ring][:, 1] <= max(RED[1], BLUE[1])).all()
    # alpha falls off with distance: nearer the mask is redder
    assert out[10, 9, 0] > out[10, 8, 0]


def test_compose_feather_zero_is_a_hard_paste():
    prod = _box_product(20, 20, (5, 5, 15, 15))
    gen = np.full((20, 20, 3), 77, dtype=np.uint8)
    out = compose(gen, prod, feather=0)
    expected = gen.copy()
    expected[prod.mask] = prod.rgb[prod.mask]
    assert np.array_equal(out, expected)
    assert out is not gen and (gen == 77).all()


def test_compose_validates_shapes():
    prod = _box_product(20, 20, (5, 5, 15, 15))
    with pytest.raises(ValueError, match="generated"):
        compose(np.zeros((20, 21, 3), dtype=np.uint8), prod)
    with pytest.raises(ValueError, match="generated"):
        compose(np.zeros((20, 20, 3), dtype=np.float32), prod)
    _raises("feather", compose, np.zeros((20, 20, 3), dtype=np.uint8), prod, feather=-1)


def test_product_validates_arrays():
    with pytest.raises(ValueError, match="Product.mask"):
        Product(rgb=np.zeros((4, 4, 3), np.uint8), mask=np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="Product.rgb"):
        Product(rgb=np.zeros((4, 4), np.uint8), mask=np.zeros((4, 4), bool))


# --------------------------------------------------------------------------- place_on_canvas


def test_place_same_size_is_unchanged():
    prod = _box_product(64, 48, (10, 10, 30, 30))
    placed, where = place_on_canvas(prod, 48, 64)
    assert np.array_equal(placed.rgb, prod.rgb) and np.array_equal(placed.mask, prod.mask)
    assert where == Placement(scale=1.0, offset=(0, 0), size=(48, 64))


def test_place_other_size_keeps_aspect_and_centres():
    prod = _box_product(50, 100, (5, 5, 45, 95), inside=RED)  # 100 wide, 50 high
    placed, where = place_on_canvas(prod, 64, 64)
    assert placed.rgb.shape == (64, 64, 3) and placed.mask.shape == (64, 64)
    assert where.size == (64, 32) and where.offset == (0, 16) and where.scale == pytest.approx(0.64)
    outside = np.ones((64, 64), dtype=bool)
    outside[16:48, :] = False
    assert not placed.mask[outside].any()
    assert (placed.rgb[outside] == 127).all()
    ys, xs = np.nonzero(placed.mask)
    assert abs((ys.min() + ys.max()) / 2 - 31.5) <= 1 and abs((xs.min() + xs.max()) / 2 - 31.5) <= 1
    # the box kept its aspect ratio (90 x 40 -> about 57.6 x 25.6)
    assert abs((xs.max() - xs.min() + 1) - 57.6) <= 1.5 and abs((ys.max() - ys.min() + 1) - 25.6) <= 1.5


def test_place_upscales_small_product():
    prod = _box_product(10, 10, (2, 2, 8, 8))
    placed, where = place_on_canvas(prod, 40, 80)
    assert where.size == (40, 40) and where.offset == (0, 20) and where.scale == 4.0
    assert not placed.mask[:20].any() and not placed.mask[60:].any()
    assert placed.mask[40, 20]


# --------------------------------------------------------------------------- array helpers


def test_model_image_round_trip():
    rgb = np.random.default_rng(3).integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
    x = to_model_image(rgb)
    assert x.dtype == np.float32 and x.shape == (1, 3, 8, 12)
    assert x.min() >= -1.0 and x.max() <= 1.0
    back = from_model_image(x)
    assert len(back) == 1 and back[0].dtype == np.uint8 and np.array_equal(back[0], rgb)


def test_from_model_image_clips_and_rejects_nan():
    x = np.array([-3.0, -1.0, 0.0, 1.0, 5.0], dtype=np.float32).reshape(1, 1, 1, 5).repeat(3, axis=1)
    out = from_model_image(x)[0]
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match="NaN"):
        from_model_image(np.full((1, 3, 2, 2), np.nan, dtype=np.float32))


def test_resize_mask_nearest():
    mask = np.zeros((64, 64), dtype=bool)
    mask[:32, :] = True
    small = resize_mask_nearest(mask, 8, 8)
    assert small.dtype == np.float32 and small.shape == (8, 8)
    assert set(np.unique(small).tolist()) <= {0.0, 1.0}
    assert (small[:4] == 1).all() and (small[4:] == 0).all()


def test_clip_pixels_shape_and_normalization():
    rgb = np.full((30, 60, 3), 255, dtype=np.uint8)
    x = clip_pixels(rgb, 32)
    assert x.dtype == np.float32 and x.shape == (1, 3, 32, 32)
    white = (1.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    grey = (127 / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.allclose(x[0, :, 16, 16], white, atol=1e-5)  # centre: the image
    assert np.allclose(x[0, :, 0, 16], grey, atol=1e-5)  # top: grey padding


def test_save_png_round_trip(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
    p = tmp_path / "out.png"
    save_png(p, rgb)
    assert np.array_equal(np.asarray(load_image(p, "output")), rgb)
    _raises("output", save_png, tmp_path / "missing_dir" / "x.png", rgb)


# --------------------------------------------------------------------------- more formats


def test_animated_png_is_rejected(tmp_path):
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    p = tmp_path / "anim.png"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    msg = _raises("mask", load_image, p, "mask")
    assert "expected a still image" in msg


def test_mpo_phone_jpeg_uses_primary_picture(tmp_path):
    p = tmp_path / "phone.jpg"
    Image.new("RGB", (16, 16), RED).save(
        p, format="MPO", save_all=True, append_images=[Image.new("RGB", (16, 16), BLUE)]
    )
    out = np.asarray(load_image(p, "product")).astype(int)
    assert np.abs(out - RED).max() <= 8


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((10, 20, 3), dtype=np.uint8)  # 20 wide, 10 high
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    p = tmp_path / "rot.png"
    im.save(p, exif=exif.tobytes())
    assert load_image(p, "product").size == (10, 20)


def test_fully_transparent_pixels_become_grey(tmp_path):
    a = _rgba_product()
    a[0, 0] = (0, 0, 0, 0)
    a[0, 1] = (250, 0, 0, 60)  # partly transparent: colour kept
    prod = load_product(_save(tmp_path, "p.png", a))
    assert tuple(prod.rgb[0, 0]) == (127, 127, 127)
    assert tuple(prod.rgb[0, 1]) == (250, 0, 0)


def test_compose_at_image_border_and_many_shapes():
    rng = np.random.default_rng(5)
    for _ in range(20):
        h, w = rng.integers(8, 40, size=2)
        rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        mask = rng.random((h, w)) > 0.9
        mask[0, 0] = True
        gen = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        feather = int(rng.integers(0, 5))
        out = compose(gen, Product(rgb=rgb, mask=mask), feather=feather)
        assert out.shape == gen.shape and out.dtype == np.uint8
        assert np.array_equal(out[mask], rgb[mask])
        # pixels farther than `feather` (chessboard distance) from the mask are untouched
        near = mask.copy()
        for _ in range(feather):
            p = np.pad(near, 1)
            near = np.zeros_like(near)
            for dy in range(3):
                for dx in range(3):
                    near |= p[dy : dy + h, dx : dx + w]
        assert np.array_equal(out[~near], gen[~near])


def test_ci_installs_ghostscript_and_requires_it_before_the_readme_test_command():
    """So CI runs the EPS test against the real program instead of skipping it."""
    lines = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text().splitlines()
    install = next(i for i, line in enumerate(lines) if "apt-get install" in line and "ghostscript" in line.split())
    require = lines.index(f"export {REQUIRE_GHOSTSCRIPT}=1")
    command = next(i for i, line in enumerate(lines) if line.endswith("-m pytest -q"))
    assert install < require < command == len(lines) - 1
