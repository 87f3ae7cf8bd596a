"""Fixtures a test module declares in one line, over the session's shared ones (conftest.py):

    layout_ort = fixtures.opened("layout")                 # the pipeline on ONNX Runtime, opened once
    layout_torch = fixtures.opened("layout", "torch")
    modules = fixtures.networks("poster")                  # its torch modules, built once
    graphs = fixtures.exported("poster", NEW)              # its graphs (or some of them), exported once
"""

from __future__ import annotations

import pytest


def opened(pipeline: str, backend: str = "onnxruntime", scope: str = "session"):
    @pytest.fixture(scope=scope)
    def fixture(open_tiny):
        return open_tiny(pipeline, backend)

    return fixture


def networks(pipeline: str, scope: str = "session"):
    @pytest.fixture(scope=scope)
    def fixture(tiny_networks):
        return tiny_networks(pipeline)

    return fixture


def exported(pipeline: str, components: tuple[str, ...] | None = None, scope: str = "session"):
    @pytest.fixture(scope=scope)
    def fixture(tiny_export):
        return tiny_export(pipeline, components)

    return fixture
