"""What the environment asks of a test run, read from two variables in one place.

ADGEN_TESTS_WITHOUT_TORCH=1: run as on a runtime-only install (`pip install adgen`, no
`export` extra). tests/conftest.py installs an import blocker for the extra's packages before
any test module is collected, so a test that needs torch skips through its own
`pytest.importorskip` and every other test must pass without it.

ADGEN_REQUIRE_CJK_FONT=1: a CJK font must be installed (CI installs one); the CJK typesetting
test fails instead of skipping when none is found.

ADGEN_REQUIRE_GHOSTSCRIPT=1: Ghostscript must be installed (CI installs it); the test that an
EPS product never reaches it fails instead of skipping when `gs` is missing.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

WITHOUT_TORCH = "ADGEN_TESTS_WITHOUT_TORCH"
REQUIRE_CJK_FONT = "ADGEN_REQUIRE_CJK_FONT"
REQUIRE_GHOSTSCRIPT = "ADGEN_REQUIRE_GHOSTSCRIPT"

# The `export` extra of pyproject.toml: what a runtime-only install lacks.
EXPORT_EXTRA = ("torch", "diffusers", "transformers", "safetensors", "onnx", "onnxscript", "onnxslim")


def env_flag(name: str) -> bool:
    """True for "1", False for unset, "" or "0"; any other value is a mistake worth stopping on
    (ADGEN_REQUIRE_CJK_FONT=true must not quietly mean false)."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name}: expected 1, 0 or unset, got {value!r}")
    return value == "1"


class HiddenPackages(importlib.abc.MetaPathFinder):
    """Makes `import torch` (and its submodules, and the rest of the export extra) raise
    ModuleNotFoundError as if the packages were not installed. First on sys.meta_path, so no
    other finder gets to find them. `importlib.util.find_spec("torch")` raises too, rather
    than returning None: a caller relying on it shows up as an error, not as a wrong answer."""

    def __init__(self, packages: tuple[str, ...]):
        self.packages = frozenset(packages)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.packages:
            raise ModuleNotFoundError(f"No module named {fullname!r} ({WITHOUT_TORCH}=1 hides it)", name=fullname)
        return None


def hide_export_extra() -> HiddenPackages:
    already = sorted(name for name in sys.modules if name.partition(".")[0] in EXPORT_EXTRA)
    if already:
        raise RuntimeError(f"{WITHOUT_TORCH}=1, but {already[:3]} were imported before tests/conftest.py could hide them")
    finder = HiddenPackages(EXPORT_EXTRA)
    sys.meta_path.insert(0, finder)
    return finder
