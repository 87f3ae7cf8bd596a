"""The torch reference backend: the networks themselves, eager, float32."""

from __future__ import annotations

from typing import Mapping

import numpy as np
from torch import nn

from networks.build import build_modules
from networks.runner import run_module

from ..specs import ComponentSpec
from .base import Component, ModelSource, Progress


class TorchComponent(Component):
    def __init__(self, spec: ComponentSpec, module: nn.Module):
        super().__init__(spec)
        self.module = module

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_module(self.module, self.spec, feed)


def load(specs: Mapping[str, ComponentSpec], source: ModelSource, progress: Progress | None = None) -> dict[str, Component]:
    if progress:
        progress(f"building {source.pipeline} networks ({source.preset.name}, {source.weights.describe()})")
    modules = build_modules(source.pipeline, source.preset, source.weights)
    return {name: TorchComponent(spec, modules[name]) for name, spec in specs.items()}
