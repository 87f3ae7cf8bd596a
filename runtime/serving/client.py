"""Triton backend: each component call is an inference request to the server (the loop runs here).

    load_pipeline("refadgen", preset="tiny", backend="triton", server_url="localhost:8001")

`url` is `host:port` (gRPC), `grpc://host:port` or `http://host:port`. Tensors of 64 KiB and
more travel through system shared memory when the server is on this machine (a loopback
address); smaller ones, and everything for a remote server, go in the request. Every call
waits up to `timeout_s` (default 10 minutes: a full-size U-Net step on CPU takes seconds, and
a step may queue behind other requests' steps).

Thread-safe: the gRPC client is shared (it is thread-safe); HTTP clients are not, so each
thread gets its own. Each thread owns its shared-memory regions, so concurrent calls never
write into each other's buffers. Inputs are checked against the spec before the call, and
every output's name, shape and dtype after it (Triton 2.51 does not check a Python model's
outputs). `close()` unregisters and removes the regions and closes the clients.

Failures are typed (`runtime.errors.ServerError` and subclasses). Every adgen request is seeded,
so running it twice gives the same answer: an inference that failed with a retriable error (queue
full or timed out in the queue: 503 / UNAVAILABLE; connection refused or reset while the server
restarts; a crashed stub the watchdog is replacing) is retried with capped exponential backoff
(`RetryPolicy`); a refused request (400) or a client timeout never is. `retries` counts the
retries made, by error class, and `on_retry` is called before each. The server restricts its
shared-memory and model-control endpoints (`adgen serve` always does): the connection sends the
key from `admin_key` or the ADGEN_ADMIN_KEY variable with those calls, and without the right key
sends its tensors in the request instead of shared memory (`shm_refused`).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

import numpy as np
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from runtime.backends.base import Component, ModelSource
from runtime.errors import (
    BackendError,
    ServerAccessError,
    ServerBusyError,
    ServerError,
    ServerRequestError,
    ServerUnavailableError,
)
from runtime.serving.names import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    CLIENT_REGION_PREFIX,
    GRPC_HEADER_PREFIX,
    NOT_ANSWERING_MESSAGE,
    NOT_READY_MESSAGES,
    QUEUE_MESSAGES,
    RESTRICTED_MESSAGE,
    STUB_DEAD_MESSAGE,
    ConfigKey,
    read_parameters,
)
from runtime.serving.protocol import from_wire, model_name, to_wire
from runtime.serving.resident import ResidentCaller
from runtime.specs.core import ComponentSpec
from runtime.timing import Progress

DEFAULT_TIMEOUT_S = 600.0
SHM_MIN_BYTES = 64 * 1024
_ALIGN = 64
_region_ids = itertools.count()


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of an idempotent request after a retriable error: `attempts` in all, sleeping
    min(cap_s, base_s * 2**k) * U(0.5, 1) before retry k (jitter spreads clients that failed together)."""

    attempts: int = 5
    base_s: float = 0.5
    cap_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_s < 0 or self.cap_s < self.base_s:
            raise ValueError(f"RetryPolicy: expected attempts >= 1 and 0 <= base_s <= cap_s, got {self}")

    def delay(self, retry: int) -> float:
        return min(self.cap_s, self.base_s * 2**retry) * random.uniform(0.5, 1.0)


NO_RETRY = RetryPolicy(attempts=1)

# Called before each retry's pause: (what was called, the retriable error, retry index from 0, pause in s).
RetryHook = Callable[[str, "ServerError", int, float], None]


@dataclass(frozen=True)
class StatusRule:
    """How an error with one status is typed: `default`, unless the message holds one of the
    `by_message` fragments (for statuses Triton 2.51 uses for more than one thing)."""

    default: type[ServerError]
    by_message: tuple[tuple[str, type[ServerError]], ...] = ()


# Where the status leaves the meaning open, the message decides (fragments in names.py).
NOT_READY = tuple((fragment, ServerUnavailableError) for fragment in NOT_READY_MESSAGES)
RESTRICTED = (RESTRICTED_MESSAGE, ServerAccessError)
STUB_DEAD = (STUB_DEAD_MESSAGE, ServerUnavailableError)  # until the watchdog reloads the model
RESTARTING = (NOT_ANSWERING_MESSAGE, ServerUnavailableError)  # adgen's front while tritonserver restarts
QUEUE = tuple((fragment, ServerBusyError) for fragment in QUEUE_MESSAGES)

STATUS_RULES: dict[str, StatusRule] = {
    # HTTP
    "400": StatusRule(ServerRequestError, NOT_READY),  # a refused request, or (2.51) a model not ready
    "403": StatusRule(ServerAccessError),  # a restricted endpoint without the key
    "404": StatusRule(ServerRequestError, NOT_READY),  # an unknown model, or one with no version loaded now
    "500": StatusRule(ServerError, (STUB_DEAD, *NOT_READY)),  # the model failed; via BLS also a component's state
    # queue full or waited past the queue timeout; behind adgen's front also a model not ready or a crashed stub
    "503": StatusRule(ServerBusyError, (STUB_DEAD, RESTARTING, *NOT_READY)),
    # gRPC
    "StatusCode.INVALID_ARGUMENT": StatusRule(ServerRequestError, NOT_READY),
    "StatusCode.NOT_FOUND": StatusRule(ServerRequestError, NOT_READY),
    "StatusCode.PERMISSION_DENIED": StatusRule(ServerAccessError),
    "StatusCode.UNAUTHENTICATED": StatusRule(ServerAccessError),
    "StatusCode.INTERNAL": StatusRule(ServerError, (STUB_DEAD, *NOT_READY)),
    # busy, a refused or reset connection (server restarting), and restricted endpoints all say UNAVAILABLE
    "StatusCode.UNAVAILABLE": StatusRule(ServerUnavailableError, (RESTRICTED, *QUEUE)),
    # too many calls at once; a message over the server's cap is the request's fault
    "StatusCode.RESOURCE_EXHAUSTED": StatusRule(ServerBusyError, (("larger than max", ServerRequestError),)),
    "StatusCode.DEADLINE_EXCEEDED": StatusRule(ServerError),  # the client timeout: the request may still run
}
# No status, or one not above: the message is all there is.
MESSAGE_ONLY = StatusRule(ServerError, (RESTRICTED, STUB_DEAD, *NOT_READY, *QUEUE))


def classify(what: str, error: BaseException) -> ServerError:
    """A client exception as a typed adgen error (retriable or not): by the HTTP code or gRPC
    status first, by the message only where the status is ambiguous (STATUS_RULES)."""
    if isinstance(error, InferenceServerException):
        status = str(error.status() or "")
        message = error.message() or str(error)
        rule = STATUS_RULES.get(status, MESSAGE_ONLY)
        lowered = message.lower()
        kind = next((k for fragment, k in rule.by_message if fragment.lower() in lowered), rule.default)
        return kind(f"{what}: {message} (status {status})", status)
    if isinstance(error, TimeoutError):  # the request may still run: retrying would add load
        return ServerError(f"{what}: no answer within the client timeout ({error})", "timeout")
    # HTTP client: refused / reset connections arrive as OSError
    return ServerUnavailableError(f"{what}: {type(error).__name__}: {error}", "connection")


@dataclass(frozen=True)
class Endpoint:
    protocol: str  # "grpc" or "http"
    address: str  # host:port

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        parsed = urlparse(url if "://" in url else f"grpc://{url}")
        if parsed.scheme not in ("grpc", "http") or not parsed.hostname or not parsed.port:
            raise BackendError(f"server url {url!r}: expected host:port, grpc://host:port or http://host:port")
        return cls(parsed.scheme, f"{parsed.hostname}:{parsed.port}")

    @property
    def local(self) -> bool:
        host = self.address.rsplit(":", 1)[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            pass
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False  # unresolvable here: send tensors in the request


class _Region:
    """One registered system shared-memory region, grown (re-created) on demand."""

    def __init__(self, connection: "TritonConnection", size: int):
        n = next(_region_ids)
        self.name = f"{CLIENT_REGION_PREFIX}{os.getpid()}_{n}"
        self.size = max(size, 1 << 20)
        self.handle = shm.create_shared_memory_region(self.name, f"/{self.name}", self.size, create_only=True)
        try:
            connection.client().register_system_shared_memory(
                self.name, f"/{self.name}", self.size, headers=connection.admin_headers
            )
        except (InferenceServerException, OSError) as e:
            shm.destroy_shared_memory_region(self.handle)
            raise classify(f"registering shared memory {self.name}", e) from e
        self.headers = connection.admin_headers

    def release(self, client: Any) -> None:
        try:
            client.unregister_system_shared_memory(self.name, headers=self.headers)
        finally:
            shm.destroy_shared_memory_region(self.handle)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def http_inputs(feed: Mapping[str, np.ndarray]) -> list:
    """The HTTP client's inputs for `feed`, each tensor in the binary-data extension."""
    import tritonclient.http as httpclient

    inputs = []
    for name, array in feed.items():
        tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    return inputs


class TritonConnection:
    """A client of one server, shared by the components of a pipeline."""

    def __init__(
        self,
        url: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        use_shm: bool | None = None,
        retry: RetryPolicy = RetryPolicy(),
        admin_key: str | None = None,
        on_retry: RetryHook | None = None,
    ):
        self.endpoint = Endpoint.parse(url)
        self.timeout_s = timeout_s
        self.retry = retry
        self.on_retry = on_retry
        self.retries: Counter[str] = Counter()  # retries made so far, by the error class that caused them
        key = admin_key if admin_key is not None else os.environ.get(ADMIN_KEY_ENV, "")
        header = (GRPC_HEADER_PREFIX + ADMIN_HEADER) if self.endpoint.protocol == "grpc" else ADMIN_HEADER
        self.admin_headers = {header: key} if key else None
        self.use_shm = self.endpoint.local if use_shm is None else use_shm
        self.shm_refused = False  # the server refused to register our regions (no key): tensors go inline
        self._local = threading.local()
        self._lock = threading.Lock()
        self._regions: list[_Region] = []
        self._http_clients: list[Any] = []
        self._grpc_client: Any = None
        if self.endpoint.protocol == "grpc":
            import tritonclient.grpc as grpcclient

            self._module = grpcclient
            self._grpc_client = grpcclient.InferenceServerClient(self.endpoint.address)
        else:
            import tritonclient.http as httpclient

            self._module = httpclient
        self.closed = False

    def client(self) -> Any:
        if self._grpc_client is not None:
            return self._grpc_client
        client = getattr(self._local, "http", None)
        if client is None:
            client = self._module.InferenceServerClient(
                self.endpoint.address, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
            )
            self._local.http = client
            with self._lock:
                self._http_clients.append(client)
        return client

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (InferenceServerException, OSError) as e:
            raise classify(what, e) from e

    def _call_with_retries(self, what: str, attempt: Any) -> Any:
        for retry in itertools.count():
            try:
                return attempt()
            except ServerError as e:
                if not e.retriable or retry + 1 >= self.retry.attempts:
                    raise
                pause = self.retry.delay(retry)
                with self._lock:
                    self.retries[type(e).__name__] += 1
                if self.on_retry is not None:
                    self.on_retry(what, e, retry, pause)
                time.sleep(pause)
                if isinstance(e, ServerUnavailableError):
                    self._reregister_regions()  # a restarted server has forgotten them

    def _reregister_regions(self) -> None:
        """Register this connection's regions again (after a server restart); already-registered
        ones and a server still down are left to the next attempt."""
        with self._lock:
            regions = list(self._regions)
        for region in regions:
            try:
                self.client().register_system_shared_memory(
                    region.name, f"/{region.name}", region.size, headers=self.admin_headers
                )
            except (InferenceServerException, OSError):
                continue  # registered already, or not back yet: the retry tells

    def model_parameters(self, model: str) -> dict[str, str]:
        """The parameters of `model`'s config on the server (ConfigKey -> value for ours); retried
        like an inference (a server restarting answers later)."""

        def attempt() -> dict:
            if self._grpc_client is not None:
                return self._call(model, self._grpc_client.get_model_config, model, as_json=True)["config"]
            return self._call(model, self.client().get_model_config, model)

        return read_parameters(self._call_with_retries(f"{model} config", attempt))

    def is_ready(self) -> bool:
        try:
            return bool(self.client().is_server_ready())
        except (InferenceServerException, OSError) as e:
            raise BackendError(f"triton server {self.endpoint.address} not reachable: {e}") from e

    def _region(self, kind: str, size: int) -> _Region:
        """This thread's input or output region, at least `size` bytes."""
        region = getattr(self._local, kind, None)
        if region is None or region.size < size:
            if region is not None:
                region.release(self.client())
                with self._lock:
                    self._regions.remove(region)
            region = _Region(self, max(size, 2 * (region.size if region else 0)))
            setattr(self._local, kind, region)
            with self._lock:
                self._regions.append(region)
        return region

    def infer(
        self, model: str, feed: Mapping[str, np.ndarray], outputs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
        parameters: Mapping[str, object] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run `model` on `feed`; `outputs` gives each requested output's expected shape and dtype
        (the size of its shared-memory slot); `parameters` are the request's parameters."""
        if self.closed:
            raise BackendError(f"{model}: connection to {self.endpoint.address} is closed")
        return self._call_with_retries(model, lambda: self._infer_once(model, feed, outputs, parameters or None))

    def _infer_once(
        self, model: str, feed: Mapping[str, np.ndarray], outputs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
        parameters: Mapping[str, object] | None,
    ) -> dict[str, np.ndarray]:
        try:
            return self._infer_with(model, feed, outputs, parameters)
        except ServerAccessError:
            if not self.use_shm:
                raise
            # The server restricts shared memory and this client has not its key (`adgen serve`
            # makes a random one by default): tensors go in the request instead.
            self.use_shm = False
            self.shm_refused = True
            return self._infer_with(model, feed, outputs, parameters)

    def _infer_with(
        self, model: str, feed: Mapping[str, np.ndarray], outputs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
        parameters: Mapping[str, object] | None,
    ) -> dict[str, np.ndarray]:
        m = self._module
        arrays = {n: np.ascontiguousarray(a) for n, a in feed.items()}
        big = {n for n, a in arrays.items() if self.use_shm and a.nbytes >= SHM_MIN_BYTES}
        out_bytes = {n: int(np.prod(shape)) * np.dtype(dtype).itemsize for n, (shape, dtype) in outputs.items()}
        big_out = {n for n, b in out_bytes.items() if self.use_shm and b >= SHM_MIN_BYTES}
        inputs, requested = [], []
        in_region = self._region("inputs", sum(_aligned(arrays[n].nbytes) for n in big)) if big else None
        offset = 0
        for name, array in arrays.items():
            tensor = m.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            if name in big:
                shm.set_shared_memory_region(in_region.handle, [array], offset=offset)
                tensor.set_shared_memory(in_region.name, array.nbytes, offset=offset)
                offset += _aligned(array.nbytes)
            else:
                tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        out_region = self._region("outputs", sum(_aligned(out_bytes[n]) for n in big_out)) if big_out else None
        out_offsets, offset = {}, 0
        for name in outputs:
            if self._grpc_client is not None:
                requested_output = m.InferRequestedOutput(name)
            else:
                requested_output = m.InferRequestedOutput(name, binary_data=True)
            if name in big_out:
                requested_output.set_shared_memory(out_region.name, out_bytes[name], offset=offset)
                out_offsets[name] = offset
                offset += _aligned(out_bytes[name])
            requested.append(requested_output)
        if self._grpc_client is not None:
            result = self._call(model, self._grpc_infer, model, inputs, requested, parameters)
        else:
            result = self._call(model, self.client().infer, model, inputs, outputs=requested, parameters=parameters)
        return {name: self._output(result, name, out_region, out_offsets.get(name)) for name in outputs}

    def _grpc_infer(self, model: str, inputs: list, outputs: list, parameters: Mapping[str, object] | None) -> Any:
        """One gRPC inference that a Ctrl-C (any exception while waiting) cancels on the server too."""
        done = threading.Event()
        answer: dict[str, Any] = {}

        def callback(result: Any, error: Any) -> None:
            answer["result"], answer["error"] = result, error
            done.set()

        call = self._grpc_client.async_infer(model, inputs, callback, outputs=outputs, client_timeout=self.timeout_s,
                                             parameters=parameters)
        try:
            done.wait()
        except BaseException:
            call.cancel()
            raise
        if answer["error"] is not None:
            raise answer["error"]
        return answer["result"]

    def _output(self, result: Any, name: str, region: _Region | None, offset: int | None) -> np.ndarray | None:
        if offset is None:
            return result.as_numpy(name)
        meta = result.get_output(name)
        if meta is None:
            return None
        if isinstance(meta, dict):  # HTTP returns JSON, gRPC a message
            shape, datatype = meta["shape"], meta["datatype"]
        else:
            shape, datatype = list(meta.shape), meta.datatype
        view = shm.get_contents_as_numpy(region.handle, triton_to_np_dtype(datatype), shape, offset=offset)
        return np.array(view, copy=True)  # the region is reused by this thread's next call

    def region_names(self) -> list[str]:
        """The shared-memory regions this connection holds now (each is /dev/shm/<name>)."""
        with self._lock:
            return [r.name for r in self._regions]

    def close(self) -> None:
        """Unregister and remove every region, close every client. Idempotent."""
        if self.closed:
            return
        self.closed = True
        with self._lock:
            regions, self._regions = self._regions, []
            http_clients, self._http_clients = self._http_clients, []
        errors = []
        for region in regions:
            client = self._grpc_client
            if client is None:
                client = self._module.InferenceServerClient(self.endpoint.address)
                http_clients.append(client)
            try:
                region.release(client)
            except (InferenceServerException, OSError) as e:
                errors.append(f"{region.name}: {e}")
        for client in http_clients:
            client.close()
        if self._grpc_client is not None:
            self._grpc_client.close()
        if errors:
            raise BackendError(f"closing {self.endpoint.address}: could not release {'; '.join(errors)}")


class TritonComponent(Component):
    """A component served by Triton, called from this process. Inside a request scope (a loop over
    a request), a model that keeps per-request invariants (its config's adgen_resident) gets them
    with the first call only (runtime/serving/resident.py)."""

    def __init__(self, spec: ComponentSpec, connection: TritonConnection, model: str, resident: bool = False):
        super().__init__(spec)
        self.connection = connection
        self.model = model
        self.resident = ResidentCaller(model, frozenset(t.name for t in spec.inputs if t.invariant), resident)

    def close(self) -> None:
        self.connection.close()

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = self.spec.validate_inputs(feed, check_values=False)  # the bound dims size the output slots
        outputs = {t.name: (self.spec.shape(t, env), t.dtype.numpy) for t in self.spec.outputs}

        def call(wire: Mapping[str, np.ndarray], parameters: dict) -> dict[str, np.ndarray]:
            return self.connection.infer(self.model, wire, outputs, parameters)

        got = self.resident.send(to_wire(self.spec, feed), call)
        return from_wire(self.spec, {name: array for name, array in got.items() if array is not None})


def load(specs: Mapping[str, ComponentSpec], source: ModelSource, progress: Progress | None = None) -> dict[str, Component]:
    if not source.server_url:
        raise BackendError("the triton backend needs a server url (--url host:port)")
    connection = TritonConnection(source.server_url)
    try:
        if not connection.is_ready():
            raise BackendError(f"triton server {source.server_url} is not ready")
        components = {}
        for name, spec in specs.items():
            model = model_name(source.pipeline, name)
            parameters = connection.model_parameters(model)
            served = parameters.get(ConfigKey.SPEC_HASH)
            if served != spec.spec_hash():
                raise BackendError(
                    f"{model} on {source.server_url} serves spec hash {served}, this pipeline needs {spec.spec_hash()} "
                    f"(same preset {source.preset.name} and precision on both sides?)"
                )
            components[name] = TritonComponent(spec, connection, model, bool(parameters.get(ConfigKey.RESIDENT)))
    except BaseException:
        connection.close()
        raise
    if progress:
        progress(f"{len(components)} components on triton {connection.endpoint.protocol}://{connection.endpoint.address}")
    return components
