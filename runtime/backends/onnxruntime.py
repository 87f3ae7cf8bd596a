"""ONNX Runtime backend: one InferenceSession per exported component.

Graphs come from an explicit folder or from the cache, keyed by pipeline, preset, precision,
spec hash and weights fingerprint; on a cache miss they are exported first (this needs the
`export` extra, i.e. torch). Every folder is checked against its manifest before use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from runtime.artifacts.graphs import (
    ensure_graphs,
    graph_path,
)
from runtime.backends.base import Component, ModelSource
from runtime.backends.devices import CUDA_EP, TENSORRT_EP, resolve_providers
from runtime.errors import BackendError
from runtime.specs.core import ComponentSpec, Precision
from runtime.timing import Progress


class OnnxRuntimeComponent(Component):
    """One InferenceSession. On a GPU provider the call goes through IO binding: inputs the spec
    marks invariant (text embeddings, AFM keys/values: the same arrays every step of a request)
    are copied to the device once and reused while the caller passes the same array object;
    per-step inputs are copied in, outputs are allocated on the device and copied out once."""

    def __init__(
        self,
        spec: ComponentSpec,
        path: Path,
        providers: tuple[str, ...],
        threads: int | None,
        spin: bool = True,
        precision: Precision = Precision.FP32,
        engine_cache: Path | None = None,
    ):
        super().__init__(spec)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            # Idle pool threads otherwise busy-wait after each run and steal cores from whatever
            # runs next in the process (the Python loop, another backend being compared).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        resolved = resolve_providers(providers, ort.get_available_providers(), precision, engine_cache)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=resolved)
        except Exception as e:  # ORT raises its own exception types; name the graph
            raise BackendError(f"{spec.name}: cannot load {path}: {e}") from e
        names = tuple(i.name for i in self.session.get_inputs()), tuple(o.name for o in self.session.get_outputs())
        if names != (spec.input_names, spec.output_names):
            raise BackendError(f"{spec.name}: graph {path} has tensors {names}, spec has {(spec.input_names, spec.output_names)}")
        self.output_names = list(spec.output_names)
        self.device_type = "cuda" if providers[0] in (CUDA_EP, TENSORRT_EP) else None
        self._invariant = {t.name for t in spec.inputs if t.invariant}
        self._on_device: dict[str, tuple[np.ndarray, ort.OrtValue]] = {}

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.device_type is None:
            return dict(zip(self.output_names, self.session.run(self.output_names, dict(feed))))
        binding = self.session.io_binding()
        for name, array in feed.items():
            binding.bind_ortvalue_input(name, self._device_value(name, array))
        for name in self.output_names:
            binding.bind_output(name, self.device_type, 0)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

    def _device_value(self, name: str, array: np.ndarray) -> "ort.OrtValue":
        held = self._on_device.get(name)
        if held is not None and held[0] is array:
            return held[1]
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, 0)
        if name in self._invariant:
            self._on_device[name] = (array, value)  # keeps `array` alive, so its identity is stable
        return value


def load(specs: Mapping[str, ComponentSpec], source: ModelSource, progress: Progress | None = None) -> dict[str, Component]:
    folder = ensure_graphs(specs, source, progress)
    return {
        name: OnnxRuntimeComponent(
            spec, graph_path(folder, name), source.ort_providers, source.threads, source.spin,
            source.precision, folder / "tensorrt-ep-cache",
        )
        for name, spec in specs.items()
    }

