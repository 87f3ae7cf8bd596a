"""Layouts as data: the element classes, the selling points a layout places, user-fixed boxes
(`--layout-fixed`), planned elements, and the picture `adgen generate --pipeline layout` draws.

`--layout-fixed` file (canvas pixels, x0 < x1, y0 < y1, inside the canvas):

    [{"class": "text", "box": [16, 12, 112, 40], "text": 0},
     {"class": "logo", "box": [8, 130, 40, 152]}]

(or {"boxes": [...]}). `class` defaults to "text". `text` is the 0-based index of the `--text`
the box holds; a text box without it takes the first selling point no other box claimed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from runtime.errors import InputError
from runtime.inputs.files import read_capped
from runtime.inputs.tokenizer import check_prompt
from runtime.specs.layout import LAYOUT_CLASSES

TEXT_CLASS = LAYOUT_CLASSES.index("text")
MAX_TEXTS = 20  # RADM: up to 20 selling points per canvas
MAX_TEXT_CHARS = 200
MAX_FIXED_FILE_BYTES = 1 << 20
_FIXED_KEYS = {"class", "box", "text"}
_COLOURS = {"logo": (230, 60, 60), "text": (40, 110, 230), "underlay": (40, 170, 90), "embellishment": (220, 160, 30)}


def check_texts(texts: object, max_texts: int = MAX_TEXTS) -> tuple[str, ...]:
    """The selling points of a request: 1 to `max_texts` non-empty strings without control characters."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise InputError("text", "expected a list of selling points (--text, repeatable)", type(texts).__name__)
    if not 1 <= len(texts) <= max_texts:
        raise InputError("text", f"expected 1 to {max_texts} selling points", len(texts))
    for i, text in enumerate(texts):
        check_prompt(f"text[{i}]", text)
        if not text.strip():
            raise InputError(f"text[{i}]", "expected a non-empty selling point", repr(text))
        if len(text) > MAX_TEXT_CHARS:
            raise InputError(f"text[{i}]", f"expected at most {MAX_TEXT_CHARS} characters", len(text))
    return tuple(texts)


@dataclass(frozen=True)
class FixedBox:
    """A box the user fixed: kept exactly as given (canvas pixels)."""

    class_name: str
    box: tuple[float, float, float, float]
    text: int | None  # index into the request's texts (text boxes only)

    def normalized(self, width: int, height: int) -> np.ndarray:
        return np.array(self.box, dtype=np.float64) / np.array([width, height, width, height])


def load_fixed_boxes(
    path: str | Path,
    width: int,
    height: int,
    texts: Sequence[str],
    classes: Sequence[str] = LAYOUT_CLASSES,
    max_boxes: int | None = None,
) -> tuple[FixedBox, ...]:
    """Read and check a `--layout-fixed` file for a width x height canvas (format: module docstring).

    Text boxes come back with their text index resolved, in the order of the file."""
    field = "layout_fixed"
    raw = read_capped(path, field, MAX_FIXED_FILE_BYTES, "a JSON file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(field, "expected a UTF-8 JSON file", str(path)) from None
    except json.JSONDecodeError as e:
        raise InputError(field, f"expected JSON: {e.msg} at line {e.lineno} column {e.colno}", str(path)) from None
    if isinstance(data, dict) and set(data) == {"boxes"}:
        data = data["boxes"]
    if not isinstance(data, list):
        raise InputError(field, 'expected a list of boxes (or {"boxes": [...]})', type(data).__name__)
    if max_boxes is not None and len(data) > max_boxes:
        raise InputError(field, f"expected at most {max_boxes} boxes", len(data))
    parsed = [_fixed_box(f"{field}[{i}]", item, width, height, classes) for i, item in enumerate(data)]
    return _claim_texts(parsed, texts)


def _fixed_box(field: str, item: object, width: int, height: int, classes: Sequence[str]) -> tuple[str, tuple, object]:
    if not isinstance(item, dict):
        raise InputError(field, 'expected an object like {"class": "text", "box": [x0, y0, x1, y1]}', type(item).__name__)
    unknown = sorted(set(item) - _FIXED_KEYS)
    if unknown:
        raise InputError(field, f"expected only the keys {sorted(_FIXED_KEYS)}", unknown)
    class_name = item.get("class", "text")
    if class_name not in classes:
        raise InputError(f"{field}.class", f"expected one of {', '.join(classes)}", repr(class_name))
    box = item.get("box")
    if not isinstance(box, list) or len(box) != 4:
        raise InputError(f"{field}.box", "expected [x0, y0, x1, y1] in canvas pixels", repr(box))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise InputError(f"{field}.box", "expected four finite numbers", repr(box))
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        raise InputError(f"{field}.box", "expected x0 < x1 and y0 < y1", repr(box))
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise InputError(f"{field}.box", f"expected a box inside the {width}x{height} canvas", repr(box))
    text = item.get("text")
    if text is not None and class_name != "text":
        raise InputError(f"{field}.text", "only text boxes hold a selling point", repr(text))
    return class_name, tuple(box), text


def _claim_texts(parsed: list[tuple[str, tuple, object]], texts: Sequence[str]) -> tuple[FixedBox, ...]:
    claimed: dict[int, int] = {}
    for i, (class_name, _, text) in enumerate(parsed):
        if text is None:
            continue
        if isinstance(text, bool) or not isinstance(text, int) or not 0 <= text < len(texts):
            raise InputError(f"layout_fixed[{i}].text", f"expected the index of a --text, 0 to {len(texts) - 1}", repr(text))
        if text in claimed:
            raise InputError(f"layout_fixed[{i}].text", f"selling point {text} is already held by box {claimed[text]}", text)
        claimed[text] = i
    free = iter(t for t in range(len(texts)) if t not in claimed)
    boxes = []
    for i, (class_name, box, text) in enumerate(parsed):
        if class_name == "text" and text is None:
            text = next(free, None)
            if text is None:
                raise InputError(f"layout_fixed[{i}]", f"more text boxes than selling points ({len(texts)})")
        boxes.append(FixedBox(class_name, box, text))
    return tuple(boxes)


@dataclass(frozen=True)
class Element:
    """One planned (or fixed) element of a layout, in canvas pixels."""

    class_name: str
    box: tuple[float, float, float, float]
    score: float | None  # None: planned by a network without class scores (PlanNet)
    text: int | None = None  # index of the selling point it holds
    fixed: bool = False
    below_threshold: bool = False  # a text box taken below the score threshold to hold a selling point
    repairs: tuple[str, ...] = ()  # "grown" to a legible size, "moved" off the product

    def to_dict(self, texts: Sequence[str]) -> dict:
        return {
            "class": self.class_name,
            "score": None if self.score is None else round(float(self.score), 6),
            "box": [v if isinstance(v, int) else round(float(v), 3) for v in self.box],
            "text": None if self.text is None else texts[self.text],
            "text_index": self.text,
            "fixed": self.fixed,
            "below_threshold": self.below_threshold,
            "repairs": list(self.repairs),
        }


def draw_layout(canvas: np.ndarray, elements: Sequence[Element], texts: Sequence[str]) -> np.ndarray:
    """The canvas with each element's box outlined and lightly filled in its class colour, text
    boxes labelled with their selling point's index: (H, W, 3) uint8."""
    base = Image.fromarray(canvas).convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for e in elements:
        colour = _COLOURS[e.class_name]
        x0, y0, x1, y1 = e.box
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour + (48,), outline=colour + (255,), width=2 if e.fixed else 1)
        label = e.class_name if e.text is None else f"text {e.text}"
        draw.text((x0 + 2, y0 + 1), label, fill=colour + (255,))
    return np.asarray(Image.alpha_composite(base, overlay).convert("RGB"))


def layout_mask(elements: Sequence[Element], width: int, height: int, class_name: str = "text") -> np.ndarray:
    """(H, W) float32: 1 inside the boxes of `class_name`, the picture RenderNet conditions on."""
    mask = np.zeros((height, width), dtype=np.float32)
    for e in elements:
        if e.class_name == class_name:
            x0, y0, x1, y1 = (int(round(v)) for v in e.box)
            mask[max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)] = 1.0
    return mask
