"""Finding an installed font that can draw a given text.

Coverage is read from each font's `cmap` table (parsed here with `struct`, so neither
fontTools nor fontconfig is needed): Pillow draws a .notdef box for a character its font
lacks, so "Pillow rendered something" says nothing about coverage.

Choices, in one place:

* Only cmap subtables of formats 4 and 12 with a Unicode encoding (platform 0, or Windows
  1 and 10) are read. Format 13 ("many-to-one", used by Apple's Last Resort font that
  matplotlib ships) maps every code point to a placeholder glyph, so reading it would
  make that font "cover" everything.
* A .ttc/.otc collection is judged, and later drawn, by its first face (for Noto Sans CJK,
  Source Han Sans and WenQuanYi the first face covers all CJK ideographs).
* Whitespace and format characters (Unicode category Cf: zero-width joiner, soft hyphen)
  need no glyph of their own.
* Search order: explicit `font_dirs`, then `$ADGEN_FONTS` (os.pathsep-separated), then the
  system font folders, then matplotlib's bundled fonts (DejaVu Sans, when the `bench` extra
  is installed; found without importing matplotlib). The first tier holding a covering
  font wins; within a tier, regular sans-serif faces are preferred, CJK fonts for text with
  CJK characters and non-CJK fonts otherwise.
* Folder listings and cmaps are cached for the life of the process (a cmap per path,
  size and modification time).
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import os
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from runtime.errors import InputError

__all__ = ["FONT_SUFFIXES", "FontCoverage", "find_font", "font_coverage", "font_search_dirs", "is_cjk"]

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
SYSTEM_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts")

# Unicode blocks whose characters are set without spaces and may be broken between any two.
_CJK_RANGES = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x2E80, 0x2FDF),  # CJK radicals
    (0x3000, 0x303F),  # CJK symbols and punctuation
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x318F),  # Bopomofo, Hangul compatibility Jamo
    (0x31A0, 0x31FF),  # Bopomofo extended, CJK strokes, Katakana extension
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xAC00, 0xD7AF),  # Hangul syllables
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF00, 0xFFEF),  # half- and full-width forms
    (0x20000, 0x3FFFF),  # CJK extensions B and later
)
_CJK_FONT_WORDS = ("cjk", "sourcehan", "source han", "wqy", "wenquanyi", "droidsansfallback", "hei", "mincho", "gothic", "ming", "song")
_STYLE_WORDS = (
    "bold", "black", "heavy", "italic", "oblique", "mono", "light", "thin", "medium", "condensed",
    "narrow", "display", "math", "symbol", "semibold",
)  # fmt: skip


def is_cjk(char: str) -> bool:
    """True for a character of a script set without spaces (Han, Kana, Hangul, CJK punctuation)."""
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def needs_glyph(char: str) -> bool:
    return not char.isspace() and unicodedata.category(char) != "Cf"


@dataclass(frozen=True)
class FontCoverage:
    """The code points a font maps to a real glyph, as sorted disjoint inclusive ranges."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]

    def __contains__(self, char: str) -> bool:
        i = bisect.bisect_right(self.starts, ord(char)) - 1
        return i >= 0 and ord(char) <= self.ends[i]

    def __len__(self) -> int:
        return sum(e - s + 1 for s, e in zip(self.starts, self.ends))


def _merge(ranges: list[tuple[int, int]]) -> FontCoverage:
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return FontCoverage(tuple(r[0] for r in merged), tuple(r[1] for r in merged))


def _cmap_format4(data: bytes, at: int) -> list[tuple[int, int]]:
    seg_count = struct.unpack_from(">H", data, at + 6)[0] // 2
    ends_at = at + 14
    starts_at = ends_at + 2 * seg_count + 2  # after the reserved pad
    deltas_at = starts_at + 2 * seg_count
    range_offsets_at = deltas_at + 2 * seg_count
    ends = struct.unpack_from(f">{seg_count}H", data, ends_at)
    starts = struct.unpack_from(f">{seg_count}H", data, starts_at)
    deltas = struct.unpack_from(f">{seg_count}h", data, deltas_at)
    range_offsets = struct.unpack_from(f">{seg_count}H", data, range_offsets_at)
    ranges: list[tuple[int, int]] = []
    for i in range(seg_count):
        start, end = starts[i], min(ends[i], 0xFFFE)  # 0xFFFF closes the table, it is no character
        if start > end:
            continue
        if range_offsets[i] == 0:
            # glyph = (c + delta) mod 65536; only the code point that lands on 0 is missing
            hole = (-deltas[i]) % 0x10000
            if start <= hole <= end:
                ranges += [(start, hole - 1), (hole + 1, end)]
            else:
                ranges.append((start, end))
            continue
        # The offset is counted from where this segment's idRangeOffset entry is stored.
        glyphs_at = range_offsets_at + 2 * i + range_offsets[i]
        glyphs = struct.unpack_from(f">{end - start + 1}H", data, glyphs_at)
        ranges += [(start + k, start + k) for k, g in enumerate(glyphs) if g != 0 and (g + deltas[i]) % 0x10000 != 0]
    return [r for r in ranges if r[0] <= r[1]]


def _cmap_format12(data: bytes, at: int) -> list[tuple[int, int]]:
    n_groups = struct.unpack_from(">I", data, at + 12)[0]
    ranges = []
    for k in range(n_groups):
        start, end, glyph = struct.unpack_from(">3I", data, at + 16 + 12 * k)
        if glyph == 0:  # the first code point of the group maps to .notdef
            start += 1
        if start <= min(end, 0x10FFFF):
            ranges.append((start, min(end, 0x10FFFF)))
    return ranges


def _read_cmap(path: Path) -> FontCoverage:
    data = path.read_bytes()
    face = 0
    if data[:4] == b"ttcf":
        face = struct.unpack_from(">I", data, 12)[0]  # the first face's table directory
    n_tables = struct.unpack_from(">H", data, face + 4)[0]
    cmap_at = None
    for k in range(n_tables):
        tag, _, offset, _ = struct.unpack_from(">4sIII", data, face + 12 + 16 * k)
        if tag == b"cmap":
            cmap_at = offset
    if cmap_at is None:
        return FontCoverage((), ())
    n_subtables = struct.unpack_from(">H", data, cmap_at + 2)[0]
    ranges: list[tuple[int, int]] = []
    for k in range(n_subtables):
        platform, encoding, offset = struct.unpack_from(">HHI", data, cmap_at + 4 + 8 * k)
        if not (platform == 0 or (platform == 3 and encoding in (1, 10))):
            continue
        at = cmap_at + offset
        fmt = struct.unpack_from(">H", data, at)[0]
        if fmt == 4:
            ranges += _cmap_format4(data, at)
        elif fmt == 12:
            ranges += _cmap_format12(data, at)
    return _merge(ranges)


@functools.lru_cache(maxsize=None)
def _cached_coverage(path: str, size: int, mtime_ns: int) -> FontCoverage:
    try:
        return _read_cmap(Path(path))
    except (OSError, struct.error):
        # A truncated or corrupt font file covers nothing; the search moves on to the next one.
        return FontCoverage((), ())


def font_coverage(path: Path) -> FontCoverage:
    """The code points `path` (first face of a collection) maps to a glyph, from its cmap."""
    stat = Path(path).stat()
    return _cached_coverage(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _fonts_in(folder: str) -> tuple[Path, ...]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [Path(root) / f for f in sorted(files) if f.lower().endswith(FONT_SUFFIXES)]
    return tuple(found)


def _matplotlib_fonts() -> Path | None:
    spec = importlib.util.find_spec("matplotlib")  # locates the package without importing it
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"
    return folder if folder.is_dir() else None


def font_search_dirs(font_dirs: Sequence[os.PathLike | str] | None = None, *, system: bool = True) -> list[list[Path]]:
    """The font folders in search order, grouped in tiers (explicit, $ADGEN_FONTS, system,
    matplotlib); with `system=False` only `font_dirs`."""
    tiers: list[list[Path]] = []
    explicit = [Path(d).expanduser() for d in font_dirs or ()]
    for d in explicit:
        if not d.is_dir():
            raise InputError("font_dirs", "expected existing folders", str(d))
    tiers.append(explicit)
    if not system:
        return tiers
    env = [Path(d).expanduser() for d in os.environ.get("ADGEN_FONTS", "").split(os.pathsep) if d]
    for d in env:
        if not d.is_dir():
            raise InputError("ADGEN_FONTS", "expected existing folders separated by os.pathsep", str(d))
    tiers.append(env)
    tiers.append([p for p in (Path(d).expanduser() for d in SYSTEM_FONT_DIRS) if p.is_dir()])
    mpl = _matplotlib_fonts()
    tiers.append([mpl] if mpl else [])
    return tiers


def _preference(path: Path, cjk_text: bool) -> tuple[int, int, int, str]:
    """Sort key, smaller is better: script match, then plain style, then sans-serif."""
    name = path.stem.lower().replace("-", "").replace("_", "")
    cjk_font = any(w.replace(" ", "") in name for w in _CJK_FONT_WORDS)
    styled = any(w in name for w in _STYLE_WORDS)
    sans = "sans" in name or "hei" in name or "gothic" in name
    return (int(cjk_font != cjk_text), int(styled), int(not sans), path.name)


def find_font(text: str, font_dirs: Sequence[os.PathLike | str] | None = None, *, system: bool = True) -> Path:
    """A font file with a glyph for every non-space character of `text`.

    Raises InputError("text", ...) naming the characters when no font covers them all.
    """
    needed = list(dict.fromkeys(c for c in text if needs_glyph(c)))  # distinct, in text order
    cjk_text = any(is_cjk(c) for c in needed)
    best_missing: list[str] | None = None
    for tier in font_search_dirs(font_dirs, system=system):
        candidates = [p for d in tier for p in _fonts_in(str(d.resolve()))]
        for path in sorted(candidates, key=lambda p: _preference(p, cjk_text)):
            coverage = font_coverage(path)
            missing = [c for c in needed if c not in coverage]
            if not missing:
                return path
            if best_missing is None or len(missing) < len(best_missing):
                best_missing = missing
    chars = "".join(best_missing if best_missing is not None else needed)
    raise InputError(
        "text",
        f"no installed font can draw {chars!r}; install a font covering them (e.g. fonts-noto-cjk) or set ADGEN_FONTS",
        repr(text),
    )
