"""TensorRT backend: one deserialized engine per component, run with `execute_async_v3`.

NOT EXECUTED on this project's machines (no GPU, and TensorRT cannot be installed there); it is
written against the TensorRT 10 Python API and its tests are marked `tensorrt`. Device memory
and the CUDA stream come from torch (CUDA build), which the engine reads and writes through raw
pointers (`set_tensor_address`).

Before an engine is deserialized its manifest is checked against the key this process needs
(GPU name, compute capability, TensorRT version, spec hash, precision, profile, weights, source
graphs): a mismatch is refused with the field named, never silently used.

Per call: inputs are copied to the device (inputs the spec marks invariant are copied once per
array object, as in the ONNX Runtime backend), the optimization profile holding the shapes is
selected, input shapes set, outputs allocated from the context's inferred shapes, and the
engine enqueued on the component's stream. With `cuda_graphs`, the first call at a new set of
shapes is followed by a capture of the enqueue into a CUDA graph; later calls at those shapes
copy into the captured buffers and replay it (no per-layer launch cost).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from runtime.artifacts.engines import GpuIdentity, Profile, engine_keys, find_engine, read_index, select_profile
from runtime.artifacts.graphs import GraphKey
from runtime.backends.base import Component, ModelSource
from runtime.errors import BackendError
from runtime.specs.core import AttentionKernel, ComponentSpec
from runtime.timing import Progress

try:
    import tensorrt as trt
except ImportError as e:  # the registry's import error names the package
    raise ImportError("tensorrt is not installed", name="tensorrt") from e


def query_gpu() -> GpuIdentity:
    """Name, compute capability and CUDA version of CUDA device 0 (through torch)."""
    try:
        import torch
    except ImportError as e:
        raise BackendError("the tensorrt backend needs torch with CUDA for device buffers: pip install torch") from e
    if not torch.cuda.is_available():
        raise BackendError(f"the tensorrt backend needs a CUDA device; torch {torch.__version__} sees none")
    return GpuIdentity(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), str(torch.version.cuda))


def trt_to_numpy(dtype: "trt.DataType") -> np.dtype:
    return np.dtype(trt.nptype(dtype))



class DeviceTensor(Protocol):
    """What the backend needs of a device buffer (a CUDA torch tensor): its address for TensorRT."""

    def data_ptr(self) -> int: ...


class CapturedGraph(Protocol):
    """A captured CUDA graph (torch.cuda.CUDAGraph): replayed for a step shape seen before."""

    def replay(self) -> None: ...

class TensorRTComponent(Component):
    def __init__(self, spec: ComponentSpec, engine_file: Path, profile_set: list[Profile], cuda_graphs: bool = False):
        super().__init__(spec)
        import torch

        self.torch = torch
        self.profiles = profile_set
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise BackendError(f"{spec.name}: TensorRT could not deserialize {engine_file}")
        if self.engine.num_optimization_profiles != len(profile_set):
            raise BackendError(
                f"{spec.name}: engine has {self.engine.num_optimization_profiles} optimization profiles, manifest lists {len(profile_set)}"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        outputs = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if set(inputs) != set(spec.input_names) or set(outputs) != set(spec.output_names):
            raise BackendError(f"{spec.name}: engine tensors {inputs} -> {outputs}, spec has {spec.input_names} -> {spec.output_names}")
        for t in spec.inputs + spec.outputs:
            got = trt_to_numpy(self.engine.get_tensor_dtype(t.name))
            if got != t.dtype.numpy:
                raise BackendError(f"{spec.name}.{t.name}: engine tensor is {got}, spec says {t.dtype.value}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.profile_index = -1
        self.cuda_graphs = cuda_graphs
        self._invariant = {t.name for t in spec.inputs if t.invariant}
        self._on_device: dict[str, tuple[np.ndarray, DeviceTensor]] = {}
        self._graphs: dict[tuple, tuple[CapturedGraph, dict, dict]] = {}  # shapes -> (graph, inputs, outputs)
        self._torch_dtype = {t.name: getattr(torch, t.dtype.value) for t in spec.inputs + spec.outputs}

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        shapes = {name: tuple(feed[name].shape) for name in self.spec.input_names}
        signature = tuple(sorted(shapes.items()))
        with torch.cuda.stream(self.stream):
            captured = self._graphs.get(signature)
            if captured is not None:
                graph, inputs, outputs = captured
                for name, buffer in inputs.items():
                    buffer.copy_(torch.from_numpy(np.ascontiguousarray(feed[name])), non_blocking=True)
                graph.replay()
            else:
                inputs = {name: self._device_tensor(name, feed[name]) for name in self.spec.input_names}
                outputs = self._bind(inputs, shapes)
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise BackendError(f"{self.spec.name}: TensorRT execute_async_v3 failed")
                if self.cuda_graphs:
                    self._capture(signature, inputs, outputs, shapes)
            host = {name: out.to("cpu", non_blocking=True) for name, out in outputs.items()}
        self.stream.synchronize()
        return {name: host[name].numpy() for name in self.spec.output_names}

    def _bind(self, inputs: Mapping[str, DeviceTensor], shapes: Mapping[str, tuple[int, ...]]) -> dict:
        index = select_profile(self.profiles, shapes)
        if index != self.profile_index:
            self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.profile_index = index
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, shapes[name])
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.spec.output_names:
            dims = self.context.get_tensor_shape(name)
            shape = tuple(dims[i] for i in range(len(dims)))
            outputs[name] = self.torch.empty(shape, dtype=self._torch_dtype[name], device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def _capture(self, signature: tuple, inputs: dict, outputs: dict, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Capture the enqueue at these shapes into a CUDA graph over private buffers."""
        torch = self.torch
        static_in = {name: t.clone() for name, t in inputs.items()}
        static_out = self._bind(static_in, shapes)
        self.context.execute_async_v3(self.stream.cuda_stream)  # TensorRT wants one run before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self.context.execute_async_v3(self.stream.cuda_stream)
        self._graphs[signature] = (graph, static_in, static_out)
        self.profile_index = -1  # the captured addresses belong to the graph; rebind on the next plain call

    def _device_tensor(self, name: str, array: np.ndarray):
        held = self._on_device.get(name)
        if held is not None and held[0] is array:
            return held[1]
        tensor = self.torch.from_numpy(np.ascontiguousarray(array)).to("cuda", non_blocking=True)
        if name in self._invariant:
            self._on_device[name] = (array, tensor)
        return tensor


def load(specs: Mapping[str, ComponentSpec], source: ModelSource, progress: Progress | None = None) -> dict[str, Component]:
    if source.engines_dir is None:
        raise BackendError("the tensorrt backend needs an engines folder (--engines DIR, made by `adgen engines`)")
    root = Path(source.engines_dir)
    index = read_index(root)
    # Engines are built from portable-attention graphs; the key is what this process needs.
    graphs = GraphKey.of(
        source.pipeline, source.preset.name, source.precision, specs,
        source.weights.fingerprint(source.preset.name), AttentionKernel.ONNX,
    )
    gpu = query_gpu()
    components: dict[str, Component] = {}
    for name, (key, profile_set) in engine_keys(specs, graphs, gpu, trt.__version__, index.get("canvases", [])).items():
        engine = find_engine(root, key)  # checks the manifest, names the mismatched field
        if progress:
            progress(f"{name}: loading {engine.name}")
        components[name] = TensorRTComponent(specs[name], engine, profile_set, cuda_graphs=source.cuda_graphs)
    return components
