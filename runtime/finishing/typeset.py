"""Setting each selling point into its planned box on a generated poster (numpy + Pillow).

For every (box, text) pair: a font that covers the text (`runtime.finishing.fonts.find_font`), the
largest font size at which the wrapped text fits the box less its padding (binary search),
the block centred in the box, and the text colour with the best WCAG 2 contrast against the
box's background. Choices, in one place:

* Padding is `round(padding_frac * min(box width, box height))` on every side, so thin boxes
  keep a margin in proportion to their short side.
* Fitting uses the ink (the drawn pixels' bounding box, from Pillow's `getbbox`), so the
  reported `ink_box` is exactly where pixels may change, and it lies inside the padded box.
  The font size never exceeds the padded box's height, so a short run of punctuation is not
  blown up to fill a wide box.
* Wrapping: explicit newlines break lines; space-separated words are wrapped greedily; CJK
  characters may break anywhere except before closing punctuation. Words are kept whole
  when they fit at a legible size (shrinking rather than splitting "Hypoallergenic");
  only otherwise is a word broken between characters. So a bigger box never gets a smaller
  font size, except across that switch (a box too narrow for a whole word at
  `MIN_LEGIBLE_SIZE`). Lines are centred one by one; the line pitch is ascent + descent.
* Sizes below `MIN_LEGIBLE_SIZE` are used only when nothing larger fits (`legible` is False
  in the report); when not even 1 px fits, `InputError` names the text and the box.
* Colour: the background luminance is the mean WCAG relative luminance of the box's pixels
  in the input image (before any text is drawn). Black or white, whichever contrasts more,
  unless a tint of the background colour (a dark shade on light backgrounds, a pale one on
  dark) still reaches `TINT_MIN_CONTRAST` (7:1, WCAG AAA); the ratio used is recorded.
  One of black and white always reaches 4.5:1 unless the mean luminance lies in about
  (0.13, 0.23) (mid-grey); there the better of the two is taken and its ratio recorded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from runtime.errors import InputError
from runtime.finishing.fonts import find_font, is_cjk
from runtime.inputs.tokenizer import check_prompt

__all__ = [
    "MIN_LEGIBLE_SIZE",
    "TINT_MIN_CONTRAST",
    "TextPlacement",
    "contrast_ratio",
    "find_font",
    "relative_luminance",
    "typeset",
]

MIN_LEGIBLE_SIZE = 6
TINT_MIN_CONTRAST = 7.0
# Characters that must not start a line in CJK typesetting (kinsoku): they stay with the
# character before them.
_NO_LINE_START = set("，。、；：！？）」』】〕》〉・ー…,.;:!?)]}%")

Box = tuple[int, int, int, int]
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class TextPlacement:
    """Where and how one text was drawn. Boxes are pixel (x0, y0, x1, y1), x1/y1 exclusive."""

    text: str
    font: Path
    font_size: int
    lines: tuple[str, ...]
    colour: Colour
    contrast: float
    box: Box
    ink_box: Box

    @property
    def legible(self) -> bool:
        return self.font_size >= MIN_LEGIBLE_SIZE

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "font": str(self.font),
            "font_size": self.font_size,
            "legible": self.legible,
            "lines": list(self.lines),
            "colour": list(self.colour),
            "contrast": round(self.contrast, 3),
            "box": list(self.box),
            "ink_box": list(self.ink_box),
        }


def relative_luminance(rgb: np.ndarray) -> np.ndarray:
    """WCAG 2 relative luminance of sRGB uint8 colours, (..., 3) -> (...) in [0, 1]."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return linear @ np.array([0.2126, 0.7152, 0.0722])


def contrast_ratio(l1: float, l2: float) -> float:
    """WCAG 2 contrast ratio of two relative luminances, in [1, 21]."""
    hi, lo = max(l1, l2), min(l1, l2)
    return (hi + 0.05) / (lo + 0.05)


def _choose_colour(background: np.ndarray) -> tuple[Colour, float]:
    """background: (h, w, 3) uint8 -> the text colour and its contrast ratio."""
    bg_lum = float(relative_luminance(background).mean())
    mean_rgb = background.reshape(-1, 3).mean(axis=0)
    black, white = (0, 0, 0), (255, 255, 255)
    on_black, on_white = contrast_ratio(bg_lum, 0.0), contrast_ratio(bg_lum, 1.0)
    if on_black >= on_white:
        best, best_ratio = black, on_black
        tint = tuple(int(v) for v in np.round(mean_rgb * 0.25))
    else:
        best, best_ratio = white, on_white
        tint = tuple(int(v) for v in np.round(255 - (255 - mean_rgb) * 0.15))
    tint_ratio = contrast_ratio(bg_lum, float(relative_luminance(np.array(tint))))
    if tint_ratio >= TINT_MIN_CONTRAST:
        return tint, tint_ratio
    return best, best_ratio


def _units(paragraph: str) -> list[tuple[str, str]]:
    """Split a paragraph into unbreakable units, each with the joiner put before it
    (" " after a space, "" between CJK characters)."""
    units: list[tuple[str, str]] = []
    word, joiner = "", ""
    for char in paragraph:
        if char.isspace():
            if word:
                units.append((joiner, word))
            word, joiner = "", " " if units else ""
        elif char in _NO_LINE_START and not word and units and joiner == "":
            units[-1] = (units[-1][0], units[-1][1] + char)
        elif is_cjk(char):
            if word:
                units.append((joiner, word))
                joiner = ""
            units.append((joiner, char))
            word, joiner = "", ""
        else:
            word += char
    if word:
        units.append((joiner, word))
    return units


def _ink_width(font: ImageFont.FreeTypeFont, line: str) -> int:
    left, _, right, _ = font.getbbox(line, anchor="la")
    return right - left


def _break_word(font: ImageFont.FreeTypeFont, word: str, width: int) -> list[str] | None:
    pieces, piece = [], ""
    for char in word:
        if piece and _ink_width(font, piece + char) > width:
            pieces.append(piece)
            piece = ""
        piece += char
    pieces.append(piece)
    return pieces if all(_ink_width(font, p) <= width for p in pieces) else None


def _wrap(font: ImageFont.FreeTypeFont, text: str, width: int, break_words: bool) -> list[str] | None:
    """Greedy wrap of `text` to ink width `width`; None when a unit (a word, or with
    `break_words` a single character) is too wide."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for joiner, unit in _units(paragraph):
            candidate = line + joiner + unit if line else unit
            if _ink_width(font, candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            if _ink_width(font, unit) <= width:
                line = unit
                continue
            pieces = _break_word(font, unit, width) if break_words else None
            if pieces is None:
                return None
            lines += pieces[:-1]
            line = pieces[-1]
        lines.append(line)
    return lines


@dataclass(frozen=True)
class _Layout:
    font: ImageFont.FreeTypeFont
    lines: tuple[str, ...]
    origins: tuple[tuple[int, int], ...]  # each line's left-ascender anchor, block-relative
    ink: Box  # block-relative


def _layout(path: Path, size: int, text: str, width: int, height: int, break_words: bool) -> _Layout | None:
    """The text set at `size` px wrapped to `width`, or None if it does not fit width x height."""
    font = ImageFont.truetype(str(path), size)
    lines = _wrap(font, text, width, break_words)
    if lines is None:
        return None
    ascent, descent = font.getmetrics()
    origins, ink = [], None
    for i, line in enumerate(lines):
        left, top, right, bottom = font.getbbox(line, anchor="la")
        x, y = -((left + right) // 2), i * (ascent + descent)  # centre each line on x = 0
        origins.append((x, y))
        if right > left and bottom > top:
            box = (x + left, y + top, x + right, y + bottom)
            ink = box if ink is None else (min(ink[0], box[0]), min(ink[1], box[1]), max(ink[2], box[2]), max(ink[3], box[3]))
    if ink is None:
        ink = (0, 0, 0, 0)
    if ink[2] - ink[0] > width or ink[3] - ink[1] > height:
        return None
    return _Layout(font, tuple(lines), tuple(origins), ink)


def _fit(path: Path, text: str, width: int, height: int, break_words: bool) -> _Layout | None:
    """The layout at the largest font size in [1, height] that fits (binary search)."""
    lo, hi, best = 1, height, None
    while lo <= hi:
        mid = (lo + hi) // 2
        layout = _layout(path, mid, text, width, height, break_words)
        if layout is None:
            hi = mid - 1
        else:
            lo, best = mid + 1, layout
    return best


def _best_layout(path: Path, text: str, width: int, height: int) -> _Layout | None:
    """Whole words when they fit at a legible size, else words broken between characters
    if that allows a larger size."""
    whole = _fit(path, text, width, height, break_words=False)
    if whole is not None and whole.font.size >= MIN_LEGIBLE_SIZE:
        return whole
    broken = _fit(path, text, width, height, break_words=True)
    if whole is None or (broken is not None and broken.font.size > whole.font.size):
        return broken
    return whole


def normalize_text(text: str) -> str:
    lines = [" ".join(line.replace("\t", " ").split()) for line in text.strip().splitlines()]
    return "\n".join(lines)


def check_drawable(texts: Sequence[str], font_dirs: Sequence[os.PathLike | str] | None = None) -> None:
    """Raise InputError("text", ...) naming the characters when no installed font can draw one of
    `texts`: a request can be refused before any model runs instead of after the whole loop."""
    for text in texts:
        find_font(normalize_text(text), font_dirs)


def _check_inputs(image: np.ndarray, boxes: Sequence[Sequence[int]], texts: Sequence[str], padding_frac: float) -> list[Box]:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError("image", "expected a (H, W, 3) uint8 array", got)
    if len(boxes) != len(texts):
        raise InputError("texts", f"expected one text per box ({len(boxes)} boxes)", len(texts))
    if not 0.0 <= padding_frac < 0.5:
        raise InputError("padding_frac", "expected a fraction in [0, 0.5)", padding_frac)
    height, width = image.shape[:2]
    checked = []
    for i, (box, text) in enumerate(zip(boxes, texts)):
        check_prompt(f"texts[{i}]", text)
        if not text.strip():
            raise InputError(f"texts[{i}]", "expected a visible character", repr(text))
        if len(box) != 4 or not all(isinstance(v, (int, np.integer)) for v in box):
            raise InputError(f"boxes[{i}]", "expected 4 integer pixel coordinates (x0, y0, x1, y1)", box)
        x0, y0, x1, y1 = (int(v) for v in box)
        if x1 <= x0 or y1 <= y0:
            raise InputError(f"boxes[{i}]", "expected x1 > x0 and y1 > y0 (a positive size)", box)
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise InputError(f"boxes[{i}]", f"expected a box inside the {width}x{height} image", box)
        checked.append((x0, y0, x1, y1))
    return checked


def typeset(
    image: np.ndarray,
    boxes: Sequence[Sequence[int]],
    texts: Sequence[str],
    font_dirs: Sequence[os.PathLike | str] | None = None,
    padding_frac: float = 0.08,
) -> tuple[np.ndarray, list[TextPlacement]]:
    """Draw `texts[i]` into `boxes[i]` on a copy of `image`.

    image: (H, W, 3) uint8. boxes: pixel (x0, y0, x1, y1), x1/y1 exclusive, inside the image.
    Returns the new (H, W, 3) uint8 image and one `TextPlacement` per text.
    """
    checked = _check_inputs(image, boxes, texts, padding_frac)
    canvas = Image.fromarray(image.copy())
    draw = ImageDraw.Draw(canvas)
    placements = []
    for i, (box, raw) in enumerate(zip(checked, texts)):
        text = normalize_text(raw)
        font_path = find_font(text, font_dirs)
        x0, y0, x1, y1 = box
        pad = round(padding_frac * min(x1 - x0, y1 - y0))
        inner_w, inner_h = x1 - x0 - 2 * pad, y1 - y0 - 2 * pad
        layout = _best_layout(font_path, text, inner_w, inner_h) if inner_w > 0 and inner_h > 0 else None
        if layout is None:
            raise InputError(f"boxes[{i}]", f"box {box} is too small to hold text {raw!r} at any font size", box)
        # Shift the block so its ink is centred in the padded box (integer pixels: the ink
        # box stays exact).
        ink_w, ink_h = layout.ink[2] - layout.ink[0], layout.ink[3] - layout.ink[1]
        dx = x0 + pad + (inner_w - ink_w) // 2 - layout.ink[0]
        dy = y0 + pad + (inner_h - ink_h) // 2 - layout.ink[1]
        colour, ratio = _choose_colour(image[y0:y1, x0:x1])
        for line, (lx, ly) in zip(layout.lines, layout.origins):
            draw.text((lx + dx, ly + dy), line, font=layout.font, fill=colour, anchor="la")
        ink_box = (layout.ink[0] + dx, layout.ink[1] + dy, layout.ink[2] + dx, layout.ink[3] + dy)
        placements.append(TextPlacement(raw, font_path, layout.font.size, layout.lines, colour, ratio, box, ink_box))
    return np.asarray(canvas, dtype=np.uint8).copy(), placements
