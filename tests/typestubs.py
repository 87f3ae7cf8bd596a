"""The TensorRT type stubs (`tensorrt-stubs` on PyPI, installed by `.ci/run` with
`pip install --no-deps --target .typestubs`: its dependency, tensorrt itself, cannot be installed
on these machines) made parseable. The published stubs are not valid Python in a few places: a
parameter named `in`, and parameters without a default after ones with one. Those `def` lines are
repaired in a copy (`in` -> `in_`, `= ...` added); nothing else is changed."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUBS = REPO / ".typestubs"
VERSION = "10.13.0.35.1"  # the version .ci/run installs
_DEF = re.compile(r"^(\s*def \w+\()(.*)(\)\s*(->.*)?:\s*)$")


def _split(params: str) -> list[str]:
    out, depth, current = [], 0, ""
    for ch in params:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return out + ([current] if current.strip() else [])


def repair_def(line: str) -> str:
    match = _DEF.match(line)
    if not match:
        return line
    seen_default, fixed = False, []
    for param in _split(match.group(2)):
        param = re.sub(r"^(\s*)in(\s*:)", r"\1in_\2", param)
        if "=" in param:
            seen_default = True
        elif seen_default and not param.strip().startswith("*"):
            param += " = ..."
        fixed.append(param)
    return match.group(1) + ",".join(fixed) + match.group(3)


def repaired_stubs(into: Path) -> Path:
    """A copy of the installed stubs with their `def` lines repaired; returns the folder."""
    shutil.copytree(STUBS, into)
    for path in into.rglob("*.pyi"):
        lines = path.read_text().split("\n")
        path.write_text("\n".join(repair_def(line) for line in lines))
    return into
