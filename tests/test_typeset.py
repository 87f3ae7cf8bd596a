import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from environment import REQUIRE_CJK_FONT, env_flag

from runtime.errors import InputError
from runtime.finishing.fonts import find_font, font_coverage
from runtime.finishing.typeset import contrast_ratio, relative_luminance, typeset

LONG = "Limited offer: buy two bottles and get the third one free, only this week"
WORD = "Pneumonoultramicroscopicsilicovolcanoconiosis"


def _latin_font() -> Path:
    try:
        return find_font("Aa")
    except InputError:
        pytest.skip("no Latin font installed (install fonts-dejavu-core or the bench extra for matplotlib's DejaVu)")


def _changed_bbox(before: np.ndarray, after: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(np.any(before != after, axis=-1))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


@pytest.mark.parametrize("box", [(10, 10, 310, 90), (20, 100, 120, 300), (0, 0, 64, 32), (150, 300, 320, 480)])
@pytest.mark.parametrize("text", ["SALE", "Fresh Orange Juice", LONG, WORD, "mIxEd CaSe gQ jy ÅÉ"])
def test_drawn_pixels_lie_in_the_ink_box_inside_the_box(box, text):
    _latin_font()
    image = np.full((480, 320, 3), 200, dtype=np.uint8)
    out, (placed,) = typeset(image, [box], [text])
    assert out.shape == image.shape and out.dtype == np.uint8
    assert _inside(placed.ink_box, box)
    assert _inside(_changed_bbox(image, out), placed.ink_box)
    assert np.array_equal(image, np.full_like(image, 200)), "the input image must not be modified"


def test_a_long_text_wraps_on_word_boundaries():
    _latin_font()
    image = np.zeros((300, 200, 3), dtype=np.uint8)
    _, (placed,) = typeset(image, [(0, 0, 200, 300)], [LONG])
    assert len(placed.lines) > 1
    assert " ".join(placed.lines).split() == LONG.split()


def test_a_word_wider_than_the_box_at_a_legible_size_is_broken_between_characters():
    _latin_font()
    image = np.zeros((200, 40, 3), dtype=np.uint8)
    _, (placed,) = typeset(image, [(0, 0, 12, 200)], [WORD])
    assert len(placed.lines) > 1 and "".join(placed.lines) == WORD


def test_a_long_word_shrinks_rather_than_breaks_when_it_fits_legibly():
    _latin_font()
    image = np.zeros((200, 400, 3), dtype=np.uint8)
    _, (placed,) = typeset(image, [(0, 0, 400, 200)], [WORD])
    assert placed.lines == (WORD,)


@pytest.mark.parametrize("text", ["SALE", "Fresh Orange Juice", LONG])
def test_a_bigger_box_never_gives_a_smaller_font(text):
    _latin_font()
    image = np.zeros((400, 400, 3), dtype=np.uint8)
    sizes = []
    for w, h in [(40, 20), (80, 30), (120, 60), (200, 60), (200, 120), (300, 200), (400, 400)]:
        _, (placed,) = typeset(image, [(0, 0, w, h)], [text])
        sizes.append(placed.font_size)
    assert sizes == sorted(sizes)
    assert sizes[-1] > sizes[0]


def test_wcag_luminance_and_contrast():
    assert relative_luminance(np.array([255, 255, 255])) == pytest.approx(1.0)
    assert relative_luminance(np.array([0, 0, 0])) == pytest.approx(0.0)
    assert relative_luminance(np.array([128, 128, 128])) == pytest.approx(0.2158605, abs=1e-6)
    assert contrast_ratio(1.0, 0.0) == pytest.approx(21.0)


@pytest.mark.parametrize("grey", [255, 0])
def test_text_on_white_and_black_reaches_wcag_aa(grey):
    _latin_font()
    image = np.full((100, 200, 3), grey, dtype=np.uint8)
    _, (placed,) = typeset(image, [(0, 0, 200, 100)], ["Contrast"])
    ink = float(relative_luminance(np.array(placed.colour)))
    assert placed.contrast >= 4.5
    assert placed.contrast == pytest.approx(contrast_ratio(ink, grey / 255.0))
    assert (ink < 0.5) == (grey == 255), "dark text on white, light text on black"


def test_text_on_noise_takes_the_better_of_black_and_white():
    _latin_font()
    image = np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    _, (placed,) = typeset(image, [(0, 0, 200, 120)], ["Noise"])
    background = float(relative_luminance(image).mean())
    best = max(contrast_ratio(background, 0.0), contrast_ratio(background, 1.0))
    # Mean luminance of uniform sRGB noise is ~0.21: black wins with ~5:1, no tint reaches 7:1.
    assert placed.colour in ((0, 0, 0), (255, 255, 255))
    assert placed.contrast == pytest.approx(best)


def test_placement_reports_as_json():
    _latin_font()
    image = np.zeros((60, 200, 3), dtype=np.uint8)
    _, (placed,) = typeset(image, [(0, 0, 200, 60)], ["Fresh"])
    report = json.loads(json.dumps(placed.to_dict()))
    assert report["text"] == "Fresh" and report["box"] == [0, 0, 200, 60] and report["legible"] is True


def test_cmap_parser_agrees_with_fonttools():
    ttlib = pytest.importorskip("fontTools.ttLib")
    path = _latin_font()
    font = ttlib.TTFont(str(path), fontNumber=0, lazy=True)
    expected = set()
    for table in font["cmap"].tables:
        if table.format in (4, 12) and (table.platformID == 0 or (table.platformID == 3 and table.platEncID in (1, 10))):
            expected |= {c for c, glyph in table.cmap.items() if glyph != ".notdef"}
    coverage = font_coverage(path)
    got = {c for lo, hi in zip(coverage.starts, coverage.ends) for c in range(lo, hi + 1)}
    assert got == expected


def test_no_font_error_names_the_text_and_the_missing_characters(tmp_path, monkeypatch):
    monkeypatch.delenv("ADGEN_FONTS", raising=False)
    (tmp_path / "DejaVuSans.ttf").symlink_to(_latin_font())
    text = "Sale 新品上市"
    with pytest.raises(InputError) as err:
        find_font(text, [tmp_path], system=False)
    message = str(err.value)
    assert repr(text) in message and "新品上市" in message and "Sale" not in message.split("(got")[0]


def test_last_resort_placeholder_font_is_no_coverage():
    # matplotlib ships Apple's Last Resort font, whose format-13 cmap maps every code point
    # to a placeholder glyph; it must not count as drawing CJK.
    spec = importlib.util.find_spec("matplotlib")
    if spec is None:
        pytest.skip("matplotlib is not installed")
    folder = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"
    if not (folder / "LastResortHE-Regular.ttf").exists():
        pytest.skip("this matplotlib has no Last Resort font")
    with pytest.raises(InputError, match="新"):
        find_font("新", [folder], system=False)


def test_adgen_fonts_comes_before_system_fonts(tmp_path, monkeypatch):
    font = tmp_path / "MyBrandSans.ttf"
    font.symlink_to(_latin_font())
    monkeypatch.setenv("ADGEN_FONTS", str(tmp_path))
    assert find_font("Brand") == font


def test_cjk_text_uses_a_cjk_font():
    try:
        font = find_font("新品上市")
    except InputError as e:
        if env_flag(REQUIRE_CJK_FONT):
            pytest.fail(f"{REQUIRE_CJK_FONT}=1 but no CJK font was found: {e}")
        pytest.skip("no CJK font installed (e.g. apt install fonts-droid-fallback; CI installs it in .ci/run)")
    image = np.full((200, 120, 3), 255, dtype=np.uint8)
    text = "新品上市，限时优惠，买二送一"
    out, (placed,) = typeset(image, [(0, 0, 120, 200)], [text])
    assert placed.font == font
    assert len(placed.lines) > 1 and "".join(placed.lines) == text
    assert not any(line.startswith("，") for line in placed.lines)
    assert _inside(_changed_bbox(image, out), placed.ink_box) and _inside(placed.ink_box, placed.box)


def test_ci_installs_a_cjk_font_and_requires_it_before_the_readme_test_command():
    """So CI runs the test above instead of skipping it, and fails if the font did not install."""
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    command = 'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/python -m pytest -q'
    assert command in readme.splitlines()
    lines = (repo / ".ci" / "run").read_text().splitlines()
    install = next(i for i, line in enumerate(lines) if "apt-get install" in line and "fonts-droid-fallback" in line)
    require = lines.index(f"export {REQUIRE_CJK_FONT}=1")
    assert install < require < lines.index(command)


@pytest.mark.parametrize(
    ("boxes", "texts", "field"),
    [
        ([(0, 0, 50, 50)], ["a", "b"], "texts"),
        ([(0, 0, 50, 50)], [""], "texts[0]"),
        ([(0, 0, 50, 50)], ["   \n "], "texts[0]"),
        ([(0, 0, 50, 50)], ["bad\x00text"], "texts[0]"),
        ([(0, 0, 50, 50)], [7], "texts[0]"),
        ([(0, 0, 120, 50)], ["ok"], "boxes[0]"),
        ([(-1, 0, 50, 50)], ["ok"], "boxes[0]"),
        ([(10, 10, 10, 40)], ["ok"], "boxes[0]"),
        ([(10, 40, 30, 20)], ["ok"], "boxes[0]"),
        ([(0, 0, 50)], ["ok"], "boxes[0]"),
        ([(0.0, 0, 50, 50)], ["ok"], "boxes[0]"),
    ],
)
def test_bad_inputs_raise_input_error(boxes, texts, field):
    image = np.zeros((60, 100, 3), dtype=np.uint8)
    with pytest.raises(InputError) as err:
        typeset(image, boxes, texts)
    assert err.value.field == field


def test_a_box_too_small_for_any_size_names_the_text_and_the_box():
    _latin_font()
    image = np.zeros((60, 100, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="too small") as err:
        typeset(image, [(0, 0, 3, 3)], ["Unreadable"])
    assert "'Unreadable'" in str(err.value) and "(0, 0, 3, 3)" in str(err.value)


def test_a_bad_image_is_rejected():
    with pytest.raises(InputError, match="image"):
        typeset(np.zeros((60, 100, 4), dtype=np.uint8), [(0, 0, 10, 10)], ["a"])
