"""The Python-backend models of the generated repository; they run inside Triton's stub process.

`ComponentModel` hosts one component's ONNX Runtime session. Every request is checked against
the component's spec (names, dtypes, shapes, bounds, finite values, value limits) and a bad one
is answered INVALID_ARG (HTTP 400) naming the tensor, without failing the others of its batch.
The valid requests of one execution that share their non-batch shapes run as ONE session call,
concatenated along the batch dim: this is how steps of concurrent requests share a U-Net call
(unless the config's `adgen_batch_calls` is 0). Outputs are checked against the spec before they
are returned (Triton 2.51 does not check a Python model's outputs).

`PipelineModel` runs the pipeline definition's own runner, the same orchestrator as in-process,
over `BlsComponent`s: each component call is a BLS request to the component model, checked
against the spec both ways by `Component.run`. Before each such call it checks whether the
request was cancelled (the gRPC client cancelled or its deadline passed: Triton marks the request;
an HTTP client disconnected: the front leaves a marker file), so a cancelled request stops within
one step of whichever loop it is in.

What goes back to a client names the field or the tensor and the rule, never this host's folders
or a traceback: a file a request carried is called `request:<field>`, and a failure that is not
the client's is answered with the model's name and logged here in full.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from runtime.api import LoadedPipeline, prepare, run
from runtime.artifacts.graphs import check_component_graph, read_manifest
from runtime.backends.base import Component, ModelSource
from runtime.errors import (
    AdgenError,
    BackendError,
    InputError,
    RequestCancelled,
    ServerBusyError,
    ServerError,
    ServerUnavailableError,
    SpecError,
)
from runtime.pipelines import get_pipeline
from runtime.serving.names import (
    CANCEL_HEADER,
    HOST_FILE,
    NOT_READY_MESSAGES,
    QUEUE_MESSAGES,
    STUB_DEAD_MESSAGE,
    ConfigKey,
    HostKey,
    config_preset,
    config_weights,
    read_parameters,
)
from runtime.serving.protocol import (
    RESPONSE_OUTPUTS,
    batch_dim,
    decode_request,
    encode_response,
    from_wire,
    model_name,
    request_tensors,
    to_wire,
)
from runtime.serving.resident import (
    CONTEXT_PARAMETER,
    END_PARAMETER,
    UNKNOWN_CONTEXT,
    ResidentBounds,
    ResidentCaller,
    ResidentStore,
)
from runtime.specs.core import ComponentSpec, Precision, specs_hash

CANCEL_TOKEN = re.compile(r"[0-9a-f]{32}")  # what the front sends; anything else is not ours


def _pb_utils():
    import triton_python_backend_utils  # only inside the stub

    return triton_python_backend_utils


def _parameters(args: Mapping[str, str]) -> dict[str, str]:
    return read_parameters(json.loads(args["model_config"]))


def _host(args: Mapping[str, str]) -> dict[str, str]:
    """This host's folders for the model (its HOST_FILE, written by `adgen serve`)."""
    path = Path(args["model_repository"]) / HOST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _error(pb: Any, message: str, code: str) -> Any:
    return pb.InferenceResponse(error=pb.TritonError(message, getattr(pb.TritonError, code)))


def _internal(pb: Any, model: str, error: BaseException) -> Any:
    """A failure that is not the client's: logged here in full, answered without internals."""
    pb.Logger.log_error(f"{model}: {''.join(traceback.format_exception(error))}")
    return _error(pb, f"{model}: internal error ({type(error).__name__}; details in the server log)", "INTERNAL")


class ComponentModel:
    def __init__(self, args: Mapping[str, str]):
        from runtime.backends.onnxruntime import OnnxRuntimeComponent

        self.pb = _pb_utils()
        self.name = args["model_name"]
        params = _parameters(args)
        preset = config_preset(params, _host(args))
        specs = get_pipeline(params[ConfigKey.PIPELINE]).specs(preset, Precision(params[ConfigKey.PRECISION]))
        self.spec = specs[params[ConfigKey.COMPONENT]]
        if self.spec.spec_hash() != params[ConfigKey.SPEC_HASH]:
            raise BackendError(
                f"{self.name}: config generated for spec hash {params[ConfigKey.SPEC_HASH]}, this runtime's spec is "
                f"{self.spec.spec_hash()}; regenerate the repository (python -m runtime.serving.repository)"
            )
        graphs = _host(args).get(HostKey.GRAPHS_DIR.value)
        if not graphs:
            raise BackendError(
                f"{self.name}: no {HostKey.GRAPHS_DIR} in {HOST_FILE} beside its config: name a folder from "
                "`adgen export` there, or use `adgen serve`"
            )
        folder = Path(graphs)
        path = check_component_graph(folder, read_manifest(folder), self.spec)
        threads = int(params.get(ConfigKey.THREADS) or 0) or None
        # Idle pool threads must not spin: other models' processes share the cores.
        self.session = OnnxRuntimeComponent(self.spec, path, (params[ConfigKey.PROVIDER],), threads, spin=False)
        self.batched = batch_dim(self.spec) is not None and params.get(ConfigKey.BATCH_CALLS, "1") == "1"
        bounds = ResidentBounds.parse(params.get(ConfigKey.RESIDENT, ""))
        self.store = ResidentStore(bounds) if bounds else None  # runtime/serving/resident.py
        self.invariant = [t.name for t in self.spec.inputs if t.invariant]

    def execute(self, requests: list) -> list:
        pb = self.pb
        responses: list = [None] * len(requests)
        try:
            self._execute(requests, responses)
        except Exception as e:  # our own bug: every request not yet answered learns of it, without internals
            failed = _internal(pb, self.name, e)
            responses = [r if r is not None else failed for r in responses]
        return responses

    def _execute(self, requests: list, responses: list) -> None:
        pb = self.pb
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
        ended: list[str] = []
        for i, request in enumerate(requests):
            feed = {}
            for name in self.spec.input_names:
                tensor = pb.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    feed[name] = tensor.as_numpy()
            crossed = set(feed)
            try:
                context, end = self._resident(request, feed)
                self.spec.validate_inputs(feed, check_values=False)
                self.spec.validate_values(feed, crossed)  # resident tensors were scanned when they crossed
            except SpecError as e:
                responses[i] = _error(pb, str(e), "INVALID_ARG")
                continue
            if context and self.store is not None:
                if end:
                    ended.append(context)
                elif crossed.issuperset(self.invariant):
                    self.store.put(context, {n: feed[n] for n in self.invariant})
            key = tuple(feed[n].shape[1:] for n in self.spec.input_names) if self.batched else (i,)
            groups.setdefault(key, []).append((i, feed))
        for members in groups.values():
            feeds = [feed for _, feed in members]
            try:
                outputs = self._run(feeds)
            except Exception as e:  # ONNX Runtime raises its own types; every request of the group gets the error
                failed = _internal(pb, self.name, e)
                for i, _ in members:
                    responses[i] = failed
                continue
            for (i, _), part in zip(members, outputs):
                responses[i] = pb.InferenceResponse(output_tensors=[pb.Tensor(n, a) for n, a in part.items()])
        for context in ended:
            self.store.drop(context)

    def _resident(self, request: Any, feed: dict[str, np.ndarray]) -> tuple[str, bool]:
        """The request's scope key and end flag (runtime/serving/resident.py); a feed without its
        invariant inputs gets the ones kept for the key, or a SpecError saying the key is unknown."""
        if self.store is None:
            return "", False
        try:
            parameters = json.loads(request.parameters() or "{}")
        except ValueError:
            parameters = {}
        context, end = parameters.get(CONTEXT_PARAMETER), parameters.get(END_PARAMETER) is True
        if not isinstance(context, str) or not context:
            return "", False
        absent = [n for n in self.invariant if n not in feed]
        if absent:
            held = self.store.get(context)
            if held is None:
                raise SpecError(self.spec.name, CONTEXT_PARAMETER,
                                f"the key of a request whose {', '.join(absent)} this model holds",
                                f"{UNKNOWN_CONTEXT} (send them again)")
            feed.update((n, held[n]) for n in absent)
        return context, end

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


class CancelScope:
    """The request a pipeline instance is running and whether its client has gone: the gRPC
    client cancelled or its deadline passed (Triton's own flag), or the front saw the HTTP client
    disconnect and created the file named by the request's CANCEL_HEADER token in `cancel_dir`."""

    def __init__(self, cancel_dir: str):
        self.cancel_dir = Path(cancel_dir) if cancel_dir else None
        self.request: Any = None
        self.marker: Path | None = None

    @contextmanager
    def running(self, request: Any) -> Iterator[None]:
        self.request, self.marker = request, self._marker(request)
        try:
            yield
        finally:
            self.request = self.marker = None

    def _marker(self, request: Any) -> Path | None:
        if self.cancel_dir is None:
            return None
        try:
            parameters = json.loads(request.parameters() or "{}")
        except ValueError:
            return None
        token = next((str(v) for k, v in parameters.items() if k.lower() == CANCEL_HEADER), "")
        return self.cancel_dir / token if CANCEL_TOKEN.fullmatch(token) else None

    def check(self) -> None:
        """Raise RequestCancelled if the running request's client has gone."""
        if self.request is None:
            return
        if self.request.is_cancelled() or (self.marker is not None and self.marker.exists()):
            raise RequestCancelled("the client cancelled the request (disconnected, or its deadline passed)")


class BlsComponent(Component):
    """A component called from inside the server: a BLS request to its component model, sent only
    while the request it serves is still wanted."""

    def __init__(self, spec: ComponentSpec, model: str, pb: Any, scope: CancelScope):
        super().__init__(spec)
        self.model = model
        self.pb = pb
        self.scope = scope
        self.resident = ResidentCaller(model, frozenset(t.name for t in spec.inputs if t.invariant))

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.scope.check()
        return self.resident.send(to_wire(self.spec, feed), self._infer)

    def _infer(self, wire: Mapping[str, np.ndarray], parameters: dict) -> dict[str, np.ndarray]:
        pb = self.pb
        request = pb.InferenceRequest(
            model_name=self.model,
            inputs=[pb.Tensor(name, np.ascontiguousarray(a)) for name, a in wire.items()],
            requested_output_names=list(self.spec.output_names),
            parameters=parameters,
        )
        response = request.exec()
        if response.has_error():
            raise _bls_error(self.model, response.error().message())
        outputs = {}
        for name in self.spec.output_names:
            tensor = pb.get_output_tensor_by_name(response, name)
            if tensor is not None:  # a missing one fails the spec check in Component.run
                outputs[name] = tensor.as_numpy()
        return from_wire(self.spec, outputs)


def _bls_error(model: str, message: str) -> BackendError:
    """A component model's error, typed: busy and unavailable ones are the pipeline's client's to retry."""
    lowered = message.lower()
    if any(fragment in lowered for fragment in QUEUE_MESSAGES):
        return ServerBusyError(f"{model}: {message}", "bls")
    if any(fragment in lowered for fragment in (*NOT_READY_MESSAGES, STUB_DEAD_MESSAGE)):
        return ServerUnavailableError(f"{model}: {message}", "bls")
    return BackendError(f"{model}: {message}")


class PipelineModel:
    def __init__(self, args: Mapping[str, str]):
        started = time.perf_counter()
        self.pb = _pb_utils()
        self.name = args["model_name"]
        self.instance = args.get("model_instance_name", "")
        params, host = _parameters(args), _host(args)
        self.definition = get_pipeline(params[ConfigKey.PIPELINE])
        weights = config_weights(params, host)
        preset = config_preset(params, host)
        precision = Precision(params[ConfigKey.PRECISION])
        specs = self.definition.specs(preset, precision)
        if specs_hash(specs) != params[ConfigKey.SPECS_HASH]:
            raise BackendError(
                f"{self.name}: config generated for specs hash {params[ConfigKey.SPECS_HASH]}, this runtime's is "
                f"{specs_hash(specs)}; regenerate the repository (python -m runtime.serving.repository)"
            )
        self.scope = CancelScope(host.get(HostKey.CANCEL_DIR.value, ""))
        self.components = {
            name: BlsComponent(spec, model_name(self.definition.name, name), self.pb, self.scope)
            for name, spec in specs.items()
        }
        runner = self.definition.create(self.components, preset, weights)
        source = ModelSource(pipeline=self.definition.name, preset=preset, weights=weights, precision=precision)
        self.loaded = LoadedPipeline(
            self.definition, "triton-bls", runner, source, specs_hash(specs), time.perf_counter() - started
        )
        self.tensors = request_tensors(self.definition)

    def execute(self, requests: list) -> list:
        return [self._one(request) for request in requests]

    def _one(self, request: Any) -> Any:
        pb = self.pb
        arrays = {}
        for t in self.tensors:
            tensor = pb.get_input_tensor_by_name(request, t.name)
            arrays[t.name] = None if tensor is None else tensor.as_numpy()
        files: dict[str, str] = {}  # this host's temporary paths -> what the client calls them
        before = {name: c.resident.counts() for name, c in self.components.items()}
        try:
            with self.scope.running(request):
                with tempfile.TemporaryDirectory(prefix="adgen-request-") as folder:
                    files[folder] = "request"
                    options = decode_request(self.definition, arrays, Path(folder))
                    files.update({str(v): f"request:{k}" for k, v in options.items() if isinstance(v, Path)})
                    prepared = prepare(self.loaded, **options)  # the weights folder's processing profile by default
                self.scope.check()
                result = run(self.loaded, prepared)
        except InputError as e:
            return _error(pb, _without(str(e), files), "INVALID_ARG")
        except RequestCancelled as e:
            return _error(pb, f"{self.name}: {e}", "CANCELLED")
        except ServerError as e:  # a component busy or being reloaded: the client may retry
            code = "UNAVAILABLE" if e.retriable else "INTERNAL"
            return _error(pb, f"{self.name}: {_without(str(e), files)}", code)
        except AdgenError as e:
            return _error(pb, f"{self.name}: {_without(str(e), files)}", "INTERNAL")
        except Exception as e:
            return _internal(pb, self.name, e)
        report = _replace_strings(result.report, files)
        report["weights"] = self.loaded.source.weights.describe(with_path=False)
        # what this request's component calls carried (resident.py: invariants once per request)
        sent = {name: {k: v - before[name][k] for k, v in c.resident.counts().items()}
                for name, c in self.components.items()}
        report["server"] = {"model": self.name, "instance": self.instance,
                            "inputs_sent": {name: counts for name, counts in sent.items() if counts["calls"]}}
        outputs = encode_response(result.image, report, request.requested_output_names() or RESPONSE_OUTPUTS)
        return pb.InferenceResponse(output_tensors=[pb.Tensor(n, a) for n, a in outputs.items()])

    def finalize(self) -> None:
        self.loaded = None


def _without(message: str, replacements: Mapping[str, str]) -> str:
    """`message` with this host's temporary paths replaced, longest first."""
    for path in sorted(replacements, key=len, reverse=True):
        message = message.replace(path, replacements[path])
    return message


def _replace_strings(value: Any, replacements: Mapping[str, str]) -> Any:
    """The report without the server's temporary file names."""
    if isinstance(value, dict):
        return {k: _replace_strings(v, replacements) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_strings(v, replacements) for v in value]
    if isinstance(value, str):
        return _without(value, replacements)
    return value
