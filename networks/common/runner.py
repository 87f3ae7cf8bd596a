"""Calling a component module with a spec-keyed numpy feed: the one torch call path shared by
the torch backend and the export parity check, and its CUDA-graph replay (GraphedModule)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, MutableMapping

import numpy as np
import torch
from torch import nn

from runtime.specs.core import ComponentSpec

# (the numpy array a caller passed, the tensor made of it on the module's device)
HeldInputs = MutableMapping[str, tuple[np.ndarray, torch.Tensor]]


def module_inputs(
    module: nn.Module, spec: ComponentSpec, feed: Mapping[str, np.ndarray], held: HeldInputs | None = None
) -> list[torch.Tensor]:
    """`feed` as the module's positional arguments: float inputs on the module's device and in its
    parameter dtype (a float16 module on CUDA takes float16).

    With `held`, an input the spec marks invariant (fixed for a request: AFM keys/values, text
    embeddings) is moved once per array object and reused while the caller passes that array
    again, as the ONNX Runtime and TensorRT backends do."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    args = []
    for t in spec.inputs:
        array = feed[t.name]
        kept = held.get(t.name) if held is not None and t.invariant else None
        if kept is not None and kept[0] is array:
            args.append(kept[1])
            continue
        x = torch.from_numpy(np.ascontiguousarray(array)).to(device)
        x = x.to(dtype) if t.dtype.is_float else x
        if held is not None and t.invariant:
            held[t.name] = (array, x)
        args.append(x)
    return args


def numpy_outputs(spec: ComponentSpec, result) -> dict[str, np.ndarray]:
    """A module's output(s) keyed by spec output name, on the host in the spec's dtypes."""
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    if len(outputs) != len(spec.outputs):
        raise RuntimeError(f"{spec.name}: module returned {len(outputs)} outputs, spec has {len(spec.outputs)}")
    return {
        t.name: out.detach().to("cpu").numpy().astype(t.dtype.numpy, copy=False)
        for t, out in zip(spec.outputs, outputs)
    }


def run_module(
    module: nn.Module, spec: ComponentSpec, feed: Mapping[str, np.ndarray], held: HeldInputs | None = None
) -> dict[str, np.ndarray]:
    """Run `module` on `feed` (spec input order) and key its outputs by spec output name."""
    args = module_inputs(module, spec, feed, held)
    with torch.inference_mode():
        result = module(*args)
    return numpy_outputs(spec, result)


class GraphedModule:
    """`module` replayed from CUDA graphs: the first call at a new set of input shapes runs two
    warm-up calls on a side stream (lazy initialisation and library autotuning stay out of the
    graph) and captures a third; later calls at those shapes copy the inputs into the captured
    buffers and replay it, one launch instead of one per kernel.

    At most `limit` shape sets stay captured (each holds its own memory pool, the activations of
    one call); the least recently used is dropped first. Calls must not overlap (the torch
    backend serialises them)."""

    def __init__(self, module: nn.Module, spec: ComponentSpec, limit: int = 8):
        param = next(module.parameters(), None)
        if param is None or param.device.type != "cuda":
            raise ValueError(f"{spec.name}: CUDA graphs need a module on a CUDA device")
        if limit < 1:
            raise ValueError(f"{spec.name}: CUDA graph limit must be >= 1, got {limit}")
        self.module = module
        self.spec = spec
        self.limit = limit
        # shapes -> (graph, its input buffers, its outputs, the tensors last copied into the buffers)
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple, list]] = OrderedDict()
        self.captures = 0  # shape sets captured so far (a re-capture after eviction counts again)

    def __call__(self, feed: Mapping[str, np.ndarray], held: HeldInputs | None = None) -> dict[str, np.ndarray]:
        args = module_inputs(self.module, self.spec, feed, held)
        signature = tuple((tuple(a.shape), a.dtype) for a in args)
        entry = self.graphs.get(signature)
        if entry is None:
            entry = self._capture(args)
            self.graphs[signature] = entry
            while len(self.graphs) > self.limit:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(signature)
            graph, static_in, _, copied = entry
            for i, (buffer, arg) in enumerate(zip(static_in, args)):
                if copied[i] is not arg:  # a held invariant input is copied once per request, not per step
                    buffer.copy_(arg)
                    copied[i] = arg
            graph.replay()
        return numpy_outputs(self.spec, entry[2])

    def _capture(self, args: list[torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple, list]:
        static_in = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self.module(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            result = self.module(*static_in)
        self.captures += 1
        graph.replay()  # capture records without running: this call's outputs come from a replay
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        return graph, static_in, tuple(outputs), list(args)
