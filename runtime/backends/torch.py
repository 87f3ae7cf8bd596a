"""The torch reference backend: the networks themselves, eager; float32 on the CPU, the
source's precision on CUDA. On CUDA, inputs the spec marks invariant stay on the device while the
caller passes the same array, and `cuda_graphs` replays each component from CUDA graphs captured
per input-shape set (networks.common.runner.GraphedModule)."""

from __future__ import annotations

import threading
from typing import Mapping

import numpy as np
from torch import nn

from networks.common.guided import WithGuidedSteps
from networks.common.runner import GraphedModule, HeldInputs, run_module
from networks.registry import build_modules
from runtime.backends.base import Component, ModelSource
from runtime.errors import BackendError
from runtime.specs.core import ComponentSpec, Precision
from runtime.timing import Progress


class TorchComponent(Component):
    """Calls are serialised: the U-Nets hand per-call tensors to their attention processors
    through shared attributes, so two threads in one module would mix requests."""

    def __init__(self, spec: ComponentSpec, module: nn.Module, lock: threading.Lock, cuda_graphs: bool = False):
        super().__init__(spec)
        self.module = module
        self.lock = lock
        on_cuda = any(p.device.type == "cuda" for p in module.parameters())
        self.graphed = GraphedModule(module, spec) if cuda_graphs else None
        # invariant inputs kept on the device; on the CPU there is no copy to save
        self.held: HeldInputs | None = {} if on_cuda else None

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            if self.graphed is not None:
                return self.graphed(feed, self.held)
            return run_module(self.module, self.spec, feed, self.held)

    def close(self) -> None:
        if self.held is not None:
            self.held.clear()
        if self.graphed is not None:
            self.graphed.graphs.clear()


def load(specs: Mapping[str, ComponentSpec], source: ModelSource, progress: Progress | None = None) -> dict[str, Component]:
    if progress:
        progress(f"building {source.pipeline} networks ({source.preset.name}, {source.weights.describe()})")
    built = WithGuidedSteps(build_modules(source.pipeline, source.preset, source.weights), specs)
    modules = {name: built[name] for name in specs}
    device = source.device.torch_device
    if source.cuda_graphs and device == "cpu":
        raise BackendError("torch backend: CUDA graphs need --device cuda (they capture CUDA kernels)")
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
    return {
        name: TorchComponent(spec, modules[name], threading.Lock(), cuda_graphs=source.cuda_graphs)
        for name, spec in specs.items()
    }
