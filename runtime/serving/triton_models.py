"""The Python-backend models of the generated repository; they run inside Triton's stub process.

`ComponentModel` hosts one component's ONNX Runtime session. Every request is checked against
the component's spec (names, dtypes, shapes, bounds, finite values) and a bad one is answered
INVALID_ARG (HTTP 400) naming the tensor, without failing the others of its batch. The valid
requests of one execution that share their non-batch shapes run as ONE session call,
concatenated along the batch dim: this is how steps of concurrent requests share a U-Net call.
Outputs are checked against the spec before they are returned (Triton 2.51 does not check a
Python model's outputs).

`PipelineModel` runs the pipeline definition's own runner, the same orchestrator as in-process,
over `BlsComponent`s: each component call is a BLS request to the component model, checked
against the spec both ways by `Component.run`.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.api import LoadedPipeline, prepare, run
from runtime.artifacts.graphs import check_component_graph, read_manifest
from runtime.backends.base import Component, ModelSource
from runtime.errors import AdgenError, BackendError, InputError, SpecError
from runtime.pipelines import get_pipeline
from runtime.serving.names import ConfigKey, config_preset, config_weights, read_parameters
from runtime.serving.protocol import (
    batch_dim,
    decode_request,
    encode_response,
    from_wire,
    model_name,
    request_tensors,
    to_wire,
)
from runtime.specs.core import ComponentSpec, Precision, specs_hash


def _pb_utils():
    import triton_python_backend_utils  # only inside the stub

    return triton_python_backend_utils


def _parameters(args: Mapping[str, str]) -> dict[str, str]:
    return read_parameters(json.loads(args["model_config"]))


def _error(pb: Any, message: str, user_error: bool) -> Any:
    code = pb.TritonError.INVALID_ARG if user_error else pb.TritonError.INTERNAL
    return pb.InferenceResponse(error=pb.TritonError(message, code))


class ComponentModel:
    def __init__(self, args: Mapping[str, str]):
        from runtime.backends.onnxruntime import OnnxRuntimeComponent

        self.pb = _pb_utils()
        self.name = args["model_name"]
        params = _parameters(args)
        preset = config_preset(params)
        specs = get_pipeline(params[ConfigKey.PIPELINE]).specs(preset, Precision(params[ConfigKey.PRECISION]))
        self.spec = specs[params[ConfigKey.COMPONENT]]
        if self.spec.spec_hash() != params[ConfigKey.SPEC_HASH]:
            raise BackendError(
                f"{self.name}: config generated for spec hash {params[ConfigKey.SPEC_HASH]}, this runtime's spec is "
                f"{self.spec.spec_hash()}; regenerate the repository (python -m runtime.serving.repository)"
            )
        if not params.get(ConfigKey.GRAPHS_DIR):
            raise BackendError(
                f"{self.name}: parameter {ConfigKey.GRAPHS_DIR} is empty: set it to a folder from `adgen export`, "
                "or use `adgen serve`"
            )
        folder = Path(params[ConfigKey.GRAPHS_DIR])
        path = check_component_graph(folder, read_manifest(folder), self.spec)
        threads = int(params.get(ConfigKey.THREADS) or 0) or None
        # Idle pool threads must not spin: other models' processes share the cores.
        self.session = OnnxRuntimeComponent(self.spec, path, (params[ConfigKey.PROVIDER],), threads, spin=False)
        self.batched = batch_dim(self.spec) is not None

    def execute(self, requests: list) -> list:
        pb = self.pb
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
        for i, request in enumerate(requests):
            feed = {}
            for name in self.spec.input_names:
                tensor = pb.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    feed[name] = tensor.as_numpy()
            try:
                self.spec.validate_inputs(feed, check_values=True)
            except SpecError as e:
                responses[i] = _error(pb, str(e), user_error=True)
                continue
            key = tuple(feed[n].shape[1:] for n in self.spec.input_names) if self.batched else (i,)
            groups.setdefault(key, []).append((i, feed))
        for members in groups.values():
            feeds = [feed for _, feed in members]
            try:
                outputs = self._run(feeds)
            except Exception as e:  # ONNX Runtime raises its own types; every request of the group gets the message
                for i, _ in members:
                    responses[i] = _error(pb, f"{self.name}: {type(e).__name__}: {e}", user_error=False)
                continue
            for (i, _), part in zip(members, outputs):
                responses[i] = pb.InferenceResponse(output_tensors=[pb.Tensor(n, a) for n, a in part.items()])
        return responses

    def _run(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """One session call for all `feeds` (concatenated along the batch dim), split back."""
        if len(feeds) == 1:
            return [self.session.run(feeds[0])]
        sizes = [next(iter(f.values())).shape[0] for f in feeds]
        batch = {n: np.concatenate([f[n] for f in feeds]) for n in self.spec.input_names}
        outputs = self.session.run(batch)
        cuts = np.cumsum(sizes)[:-1]
        parts = {n: np.split(a, cuts) for n, a in outputs.items()}
        return [{n: parts[n][k] for n in outputs} for k in range(len(feeds))]

    def finalize(self) -> None:
        self.session = None


class BlsComponent(Component):
    """A component called from inside the server: a BLS request to its component model."""

    def __init__(self, spec: ComponentSpec, model: str, pb: Any):
        super().__init__(spec)
        self.model = model
        self.pb = pb

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        pb = self.pb
        request = pb.InferenceRequest(
            model_name=self.model,
            inputs=[pb.Tensor(name, np.ascontiguousarray(a)) for name, a in to_wire(self.spec, feed).items()],
            requested_output_names=list(self.spec.output_names),
        )
        response = request.exec()
        if response.has_error():
            raise BackendError(f"{self.model}: {response.error().message()}")
        outputs = {}
        for name in self.spec.output_names:
            tensor = pb.get_output_tensor_by_name(response, name)
            if tensor is not None:  # a missing one fails the spec check in Component.run
                outputs[name] = tensor.as_numpy()
        return from_wire(self.spec, outputs)


class PipelineModel:
    def __init__(self, args: Mapping[str, str]):
        started = time.perf_counter()
        self.pb = _pb_utils()
        self.name = args["model_name"]
        self.instance = args.get("model_instance_name", "")
        params = _parameters(args)
        self.definition = get_pipeline(params[ConfigKey.PIPELINE])
        weights = config_weights(params)
        preset = config_preset(params)
        precision = Precision(params[ConfigKey.PRECISION])
        specs = self.definition.specs(preset, precision)
        if specs_hash(specs) != params[ConfigKey.SPECS_HASH]:
            raise BackendError(
                f"{self.name}: config generated for specs hash {params[ConfigKey.SPECS_HASH]}, this runtime's is "
                f"{specs_hash(specs)}; regenerate the repository (python -m runtime.serving.repository)"
            )
        components = {
            name: BlsComponent(spec, model_name(self.definition.name, name), self.pb) for name, spec in specs.items()
        }
        runner = self.definition.create(components, preset, weights)
        source = ModelSource(pipeline=self.definition.name, preset=preset, weights=weights, precision=precision)
        self.loaded = LoadedPipeline(
            self.definition, "triton-bls", runner, source, specs_hash(specs), time.perf_counter() - started
        )
        self.tensors = request_tensors(self.definition)
        self.runtime_root = str(Path(__file__).resolve().parents[2])

    def execute(self, requests: list) -> list:
        return [self._one(request) for request in requests]

    def _one(self, request: Any) -> Any:
        pb = self.pb
        arrays = {}
        for t in self.tensors:
            tensor = pb.get_input_tensor_by_name(request, t.name)
            arrays[t.name] = None if tensor is None else tensor.as_numpy()
        try:
            with tempfile.TemporaryDirectory(prefix="adgen-request-") as folder:
                options = decode_request(self.definition, arrays, Path(folder))
                prepared = prepare(self.loaded, **options)  # the weights folder's processing profile by default
                request_files = {str(v): f"request:{k}" for k, v in options.items() if isinstance(v, Path)}
            result = run(self.loaded, prepared)
        except InputError as e:
            return _error(pb, str(e), user_error=True)
        except AdgenError as e:
            return _error(pb, f"{self.name}: {e}", user_error=False)
        report = _replace_strings(result.report, request_files)
        report["server"] = {"model": self.name, "instance": self.instance, "runtime_root": self.runtime_root}
        outputs = encode_response(result.image, report)
        return pb.InferenceResponse(output_tensors=[pb.Tensor(n, a) for n, a in outputs.items()])

    def finalize(self) -> None:
        self.loaded = None


def _replace_strings(value: Any, replacements: Mapping[str, str]) -> Any:
    """The report without the server's temporary file names."""
    if isinstance(value, dict):
        return {k: _replace_strings(v, replacements) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_strings(v, replacements) for v in value]
    if isinstance(value, str):
        return replacements.get(value, value)
    return value
