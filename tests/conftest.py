"""Shared fixtures: the tiny RefAdGen networks, their exported graphs (once per session), and
pipelines on both backends. Tests build real components at tiny sizes; nothing is mocked.

With ADGEN_TESTS_WITHOUT_TORCH=1 the run behaves as on a runtime-only install (tests/environment.py)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from environment import WITHOUT_TORCH, env_flag, hide_export_extra

if env_flag(WITHOUT_TORCH):
    hide_export_extra()  # before this file or any test module imports runtime, networks or export

from runtime.artifacts.graphs import GraphKey, find_graphs  # noqa: E402
from runtime.artifacts.weights import WeightsSource  # noqa: E402
from runtime.errors import InputError  # noqa: E402
from runtime.pipelines import get_pipeline  # noqa: E402
from runtime.presets import get_preset  # noqa: E402
from runtime.specs.core import Precision  # noqa: E402
from runtime.specs.refadgen import refadgen_specs  # noqa: E402


@pytest.fixture(scope="session")
def torch():
    """The torch module: a test that takes it skips where torch is not installed."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def tiny():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_specs(tiny):
    return refadgen_specs(tiny)


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adgen-cache")


@pytest.fixture(scope="session")
def tiny_networks(tiny, torch):
    """tiny_networks(pipeline) -> the pipeline's torch modules at tiny (random init, seed 0), built
    once per session."""
    from networks.registry import build_modules

    torch.set_num_threads(2)
    return functools.cache(lambda pipeline: build_modules(pipeline, tiny, WeightsSource(seed=0)))


@pytest.fixture(scope="session")
def tiny_export(tiny, tiny_networks, cache_root):
    """tiny_export(pipeline, components=None) -> the folder of the pipeline's tiny graphs (or of
    `components` only), exported with parity into the session's cache once; reused when a test
    has already exported them there (load_pipeline does on a miss)."""
    from export.onnx_export import export_pipeline

    def export(pipeline: str, components: tuple[str, ...] | None = None) -> Path:
        specs = get_pipeline(pipeline).specs(tiny)
        specs = {name: specs[name] for name in components or specs}
        key = GraphKey.of(pipeline, tiny.name, Precision.FP32, specs, WeightsSource(seed=0).fingerprint(tiny.name))
        modules = tiny_networks(pipeline)
        return find_graphs(cache_root, key, specs) or export_pipeline(modules, specs, key, cache_root / key.dirname)

    return export


@pytest.fixture(scope="session")
def open_tiny(cache_root):
    """open_tiny(pipeline, backend="onnxruntime") -> the pipeline at tiny on that backend, opened
    once per session (ONNX Runtime graphs from the session's cache)."""
    from runtime.api import load_pipeline

    @functools.cache
    def open_(pipeline: str, backend: str = "onnxruntime"):
        if backend == "torch":
            pytest.importorskip("torch")
        return load_pipeline(pipeline, preset="tiny", backend=backend, cache_dir=cache_root)

    return open_


@pytest.fixture(scope="session")
def tiny_modules(tiny_networks):
    return tiny_networks("refadgen")


@pytest.fixture(scope="session")
def tiny_graphs(tiny_export) -> Path:
    """The tiny RefAdGen graphs exported (with parity) into the session's cache, where the ORT backend finds them."""
    return tiny_export("refadgen")


@pytest.fixture(scope="session")
def ort_pipeline(tiny_graphs, open_tiny):
    return open_tiny("refadgen")


@pytest.fixture(scope="session")
def torch_pipeline(open_tiny):
    return open_tiny("refadgen", "torch")


@pytest.fixture
def product_png(tmp_path) -> Path:
    """An RGBA product (alpha = mask) at tiny's default canvas size, with some texture."""
    from PIL import Image

    h, w = 160, 128
    rng = np.random.default_rng(7)
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[..., :3] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    rgba[40:120, 30:100, 3] = 255
    rgba[60:70, 20:30, 3] = 200  # partly transparent edge: above the 128 threshold, so product
    path = tmp_path / "product.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


class BadInputTally:
    """Every bad input a test sends, at any entry (API, CLI, Triton models), and how it ended:
    a clear error (typed, naming the field and the rule), accepted by a documented conversion,
    or unexpected. Printed as one line at the end of the run."""

    def __init__(self):
        self.tried = 0
        self.clear = 0
        self.converted = 0
        self.unexpected: list[str] = []

    def record(self, entry: str, case: str, outcome: str, detail: str = "") -> None:
        self.tried += 1
        if outcome == "clear":
            self.clear += 1
        elif outcome == "converted":
            self.converted += 1
        else:
            self.unexpected.append(f"{entry} / {case}: {detail}")

    def expect_refused(self, entry: str, case: str, field: str, call: Callable[[], object]) -> InputError:
        """Run `call`, which must raise an InputError naming `field`; recorded either way."""
        try:
            call()
        except InputError as e:
            self.record(entry, case, "clear" if e.field == field else "unexpected", str(e))
            assert e.field == field, str(e)
            return e
        self.record(entry, case, "unexpected", "accepted")
        pytest.fail(f"{entry} / {case}: accepted")

    def line(self) -> str:
        line = f"bad inputs tried: {self.tried} / clear errors: {self.clear} / unexpected: {len(self.unexpected)}"
        if self.converted:
            line += f" (accepted by a documented conversion: {self.converted})"
        return line


TALLY = BadInputTally()


@pytest.fixture(scope="session")
def bad_input_tally() -> BadInputTally:
    return TALLY


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if TALLY.tried:
        terminalreporter.write_line(TALLY.line())
        for item in TALLY.unexpected:
            terminalreporter.write_line(f"  unexpected: {item}")
