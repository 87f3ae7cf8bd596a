"""Fixtures a test module declares in one line, over the session's shared ones (conftest.py):

    layout_ort = fixtures.opened("layout")                 # the pipeline on ONNX Runtime, opened once
    layout_torch = fixtures.opened("layout", "torch")
    modules = fixtures.networks("poster")                  # its torch modules, built once
    graphs = fixtures.exported("poster", NEW)              # its graphs (or some of them), exported once
    product = fixtures.served_product()                    # an RGBA product PNG at tiny's default canvas, per module
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


def served_product(scope: str = "module"):
    """An RGBA product (alpha = mask) at tiny's default canvas size, 128 x 160, with texture: what
    the tests of served pipelines send."""
    @pytest.fixture(scope=scope)
    def fixture(tmp_path_factory):
        import numpy as np
        from PIL import Image

        rgba = np.zeros((160, 128, 4), dtype=np.uint8)
        rgba[..., :3] = np.random.default_rng(7).integers(0, 256, size=(160, 128, 3), dtype=np.uint8)
        rgba[40:120, 30:100, 3] = 255
        path = tmp_path_factory.mktemp("served-product") / "product.png"
        Image.fromarray(rgba, "RGBA").save(path)
        return path

    return fixture
