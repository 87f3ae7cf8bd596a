"""`adgen generate` from the command line: the image and report, and a clear one-line error with
a non-zero exit (never a traceback) for every bad input."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from runtime.cli import main

ARGS = ["generate", "--pipeline", "refadgen", "--prompt", "a sneaker on a wooden table, soft light", "--steps", "3", "--quiet"]


def test_console_script_writes_image_and_report(tiny_graphs, cache_root, product_png, tmp_path):
    out = tmp_path / "ad.png"
    env = {**os.environ, "ADGEN_CACHE": str(cache_root)}
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", *ARGS, "--product", str(product_png), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    image = np.asarray(Image.open(out))
    assert image.shape == (report["height"], report["width"], 3) == (160, 128, 3)
    assert report["backend"] == "onnxruntime" and report["steps"] == 3
    assert len(report["timings_s"]["denoise_step"]["samples"]) == 3


def test_rgb_product_with_mask_and_canvas_resize(tiny_graphs, cache_root, tmp_path):
    rgb = np.full((100, 90, 3), 200, dtype=np.uint8)
    mask = np.zeros((100, 90), dtype=np.uint8)
    mask[20:80, 20:70] = 255
    Image.fromarray(rgb).save(tmp_path / "p.jpg")
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = tmp_path / "ad.png"
    code = main([*ARGS, "--product", str(tmp_path / "p.jpg"), "--mask", str(tmp_path / "m.png"),
                 "--width", "64", "--height", "72", "--out", str(out), "--cache-dir", str(cache_root)])
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert np.asarray(Image.open(out)).shape == (72, 64, 3)
    assert report["product"]["placement"]["scale"] == pytest.approx(min(64 / 90, 72 / 100), abs=1e-6)


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height with almost no data: a decompression bomb's shape."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _bad_inputs(tmp_path, product_png):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(product_png.read_bytes()[:300])
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 50_000, 50_000)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (128, 160), (10, 20, 30)).save(rgb)
    small_mask = tmp_path / "small_mask.png"
    Image.new("L", (64, 64), 255).save(small_mask)
    empty = tmp_path / "empty.png"
    Image.new("RGBA", (128, 160), (200, 0, 0, 0)).save(empty)
    p = str(product_png)
    return {
        "missing file": (["--product", str(tmp_path / "nope.png")], "product"),
        "not an image": (["--product", str(text)], "product"),
        "truncated": (["--product", str(truncated)], "product"),
        "decompression bomb": (["--product", str(bomb)], "product"),
        "rgb without mask": (["--product", str(rgb)], "product"),
        "mask of another size": (["--product", str(rgb), "--mask", str(small_mask)], "mask"),
        "empty mask": (["--product", str(empty)], "mask"),
        "width not multiple of 8": (["--product", p, "--width", "100", "--height", "160"], "width"),
        "height too large": (["--product", p, "--width", "128", "--height", "4096"], "height"),
        "zero steps": (["--product", p, "--steps", "0"], "steps"),
        "guidance out of range": (["--product", p, "--guidance", "100"], "guidance"),
        "guidance nan": (["--product", p, "--guidance", "nan"], "guidance"),
        "negative seed": (["--product", p, "--seed", "-1"], "seed"),
        "control character in prompt": (["--product", p, "--prompt", "bad\x07prompt"], "prompt"),
    }


CASES = [
    "missing file", "not an image", "truncated", "decompression bomb", "rgb without mask", "mask of another size",
    "empty mask", "width not multiple of 8", "height too large", "zero steps", "guidance out of range",
    "guidance nan", "negative seed", "control character in prompt",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_a_clear_error_and_nonzero_exit(case, tiny_graphs, cache_root, product_png, tmp_path, capsys):
    extra, field = _bad_inputs(tmp_path, product_png)[case]
    argv = [*ARGS, "--out", str(tmp_path / "ad.png"), "--cache-dir", str(cache_root), *extra]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"adgen: error: {field}"), err
    assert not (tmp_path / "ad.png").exists()


def test_bad_input_in_a_subprocess_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", *ARGS, "--product", str(tmp_path / "missing.png"), "--out", str(tmp_path / "a.png")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("adgen: error: product:")


def test_option_of_another_pipeline_or_missing_required_option_is_named(product_png, tmp_path, capsys):
    base = ["generate", "--pipeline", "refadgen", "--out", str(tmp_path / "a.png"), "--quiet"]
    assert main([*base, "--product", str(product_png)]) == 2
    assert "adgen: error: prompt: --prompt is required by pipeline refadgen" in capsys.readouterr().err
