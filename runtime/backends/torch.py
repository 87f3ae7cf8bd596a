"""The torch reference backend: the networks themselves, eager; float32 on the CPU, the
source's precision on CUDA."""

from __future__ import annotations

import threading
from typing import Mapping

import numpy as np
from torch import nn

from networks.common.guided import WithGuidedSteps
from networks.common.runner import run_module
from networks.registry import build_modules
from runtime.backends.base import Component, ModelSource
from runtime.errors import BackendError
from runtime.specs.core import ComponentSpec, Precision
from runtime.timing import Progress


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
    built = WithGuidedSteps(build_modules(source.pipeline, source.preset, source.weights), specs)
    modules = {name: built[name] for name in specs}
    device = source.device.torch_device
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise BackendError(f"torch backend on {source.device.value}: torch {torch.__version__} sees no CUDA device")
        # fp16 on the GPU is the comparison that matters there; on the CPU the reference stays
        # float32 (half-precision CPU kernels are slow or missing), with float16 I/O cast.
        dtype = torch.float16 if source.precision is Precision.FP16 else torch.float32
        for module in modules.values():
            module.to(device=device, dtype=dtype)
    # afm_kv shares parameters (not call state) with unet; one lock per module is enough.
    return {name: TorchComponent(spec, modules[name], threading.Lock()) for name, spec in specs.items()}
