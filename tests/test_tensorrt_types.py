"""The TensorRT code that cannot run here (no GPU, no TensorRT) checked against the real API's
type stubs with mypy: the engine builder (export/tensorrt_build.py) and the backend
(runtime/backends/tensorrt.py) must type-check, and a misuse of the API must be caught, so the
check is not vacuous. CI installs the stubs (`.ci/run`); elsewhere the test skips unless
ADGEN_REQUIRE_TYPESTUBS=1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from environment import env_flag
from typestubs import REPO, STUBS, VERSION, repair_def, repaired_stubs

REQUIRE = "ADGEN_REQUIRE_TYPESTUBS"
CHECKED = ("export/tensorrt_build.py", "runtime/backends/tensorrt.py")


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> Path:
    if not (STUBS / "tensorrt").is_dir():
        message = (f"no TensorRT type stubs in {STUBS.name}/: python3 -m pip install --no-deps --target "
                   f"{STUBS.name} tensorrt-stubs=={VERSION}")
        if env_flag(REQUIRE):
            pytest.fail(f"{REQUIRE}=1 but {message}")
        pytest.skip(message)
    return repaired_stubs(tmp_path_factory.mktemp("typestubs") / "stubs")


def _mypy(stubs: Path, *targets: str) -> subprocess.CompletedProcess:
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if mypy is None:
        pytest.fail("mypy is not installed: pip install -e '.[dev]' installs it")
    env = dict(os.environ, MYPYPATH=str(stubs))
    return subprocess.run([mypy, "--no-incremental", *targets], cwd=REPO, env=env, capture_output=True, text=True)


def test_tensorrt_builder_and_backend_type_check_against_the_stubs(stubs):
    result = _mypy(stubs, *CHECKED)
    ours = [line for line in result.stdout.splitlines() if line.startswith(CHECKED)]
    assert result.returncode == 0 and not ours, result.stdout[-4000:] + result.stderr[-2000:]


def test_a_misuse_of_the_tensorrt_api_is_caught(stubs, tmp_path):
    misuse = tmp_path / "misuse.py"
    misuse.write_text(
        "import tensorrt as trt\n"
        "logger = trt.Logger(trt.Logger.WARNING)\n"
        "builder = trt.Builder(logger)\n"
        "network = builder.create_network(0)\n"
        "network.add_input('x', trt.float32)\n"  # shape missing
        "builder.build_serialized_network(network)\n"  # config missing
    )
    result = _mypy(stubs, str(misuse))
    errors = [line for line in result.stdout.splitlines() if line.startswith(str(misuse))]
    assert result.returncode == 1 and len(errors) == 2, result.stdout[-3000:]


def test_the_stub_repair_changes_only_what_does_not_parse():
    assert repair_def("    def f(self, in: list[int], out: list[int]) -> None:") == \
        "    def f(self, in_: list[int], out: list[int]) -> None:"
    assert repair_def("    def g(self, a: int = None, b: int) -> X:") == "    def g(self, a: int = None, b: int = ...) -> X:"
    line = "    def h(self, inputs: list[int], *args, flag: bool = True) -> None:"
    assert repair_def(line) == line
