"""Backends by name, imported lazily so `import runtime` needs neither torch nor onnxruntime."""

from __future__ import annotations

from importlib import import_module
from typing import Mapping

from runtime.backends.base import Component, ModelSource
from runtime.errors import BackendError, InputError
from runtime.specs.core import ComponentSpec
from runtime.timing import Progress

BACKENDS = {
    "onnxruntime": "runtime.backends.onnxruntime",
    "torch": "runtime.backends.torch",
    "triton": "runtime.serving.client",
    "tensorrt": "runtime.backends.tensorrt",
}


def load_components(
    backend: str, specs: Mapping[str, ComponentSpec], source: ModelSource, progress: Progress | None = None
) -> dict[str, Component]:
    """Open every component in `specs` on `backend`."""
    if backend not in BACKENDS:
        raise InputError("backend", f"expected one of {', '.join(BACKENDS)}", repr(backend))
    try:
        module = import_module(BACKENDS[backend])
    except ImportError as e:
        raise BackendError(f"backend {backend} is not installed ({e.name} missing): {INSTALL_HINTS[backend]}") from e
    return module.load(specs, source, progress)


INSTALL_HINTS = {
    "onnxruntime": "pip install onnxruntime (or onnxruntime-gpu)",
    "torch": "pip install 'adgen[export]'",
    "triton": "pip install 'adgen[triton]'",
    "tensorrt": "pip install 'adgen[tensorrt]' on a machine with an NVIDIA GPU and CUDA",
}

__all__ = ["BACKENDS", "Component", "ModelSource", "load_components"]
