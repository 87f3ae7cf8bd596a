"""The torch reference backend: the networks themselves, eager, float32."""

from __future__ import annotations

import threading
from typing import Mapping

import numpy as np
from torch import nn

from networks.build import build_modules
from networks.runner import run_module

from ..specs import ComponentSpec
from .base import Component, ModelSource, Progress


class TorchComponent(Component):
    """Calls are serialised: the U-Nets hand per-call tensors to their attention processors
    through shared attributes, so two threads in one module would mix requests."""

    def __init__(self, spec: ComponentSpec, module: nn.Module, lock: threading.Lock):
        super().__init__(spec)
        self.module = module
        self.lock = lock

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            return run_module(self.module, self.spec, feed)


def load(specs: Mapping[str, ComponentSpec], source: ModelSource, progress: Progress | None = None) -> dict[str, Component]:
    if progress:
        progress(f"building {source.pipeline} networks ({source.preset.name}, {source.weights.describe()})")
    modules = build_modules(source.pipeline, source.preset, source.weights)
    # afm_kv shares parameters (not call state) with unet; one lock per module is enough.
    return {name: TorchComponent(spec, modules[name], threading.Lock()) for name, spec in specs.items()}
