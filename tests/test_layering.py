"""The layers of the codebase, checked: import-linter's contracts (pyproject.toml) hold, and every
runtime module a Triton client or the CLI may import loads without torch or the torch-side
packages (only the torch and TensorRT backends, opened by name, need them)."""

from __future__ import annotations

import json
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import runtime

REPO = Path(__file__).resolve().parents[1]
TORCH_SIDE = ("torch", "diffusers", "transformers", "networks", "export", "tensorrt")
NEEDS_TORCH = ("runtime.backends.torch", "runtime.backends.tensorrt")


def runtime_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime.") if m.name not in NEEDS_TORCH)


def test_every_runtime_module_imports_without_torch():
    modules = runtime_modules()
    assert "runtime.pipelines.poster" in modules and "runtime.serving.client" in modules
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "import runtime.cli\n"
        "runtime.cli.build_parser()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loaded = {name.split(".")[0] for name in json.loads(result.stdout)}
    assert not loaded & set(TORCH_SIDE), sorted(loaded & set(TORCH_SIDE))


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]' installs import-linter")
    result = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
