"""The one backend interface: a component that runs a spec-keyed feed.

`Component.run(feed) -> dict` validates the feed against the spec (names, dtypes, shapes,
bounds), calls the backend, and validates every output's name, dtype and shape, so a backend
that returns the wrong thing fails loudly at the call instead of corrupting the loop.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from runtime.artifacts.graphs import GraphSource
from runtime.backends.devices import Device
from runtime.specs.core import ComponentSpec


@dataclass(frozen=True)
class ModelSource(GraphSource):
    """Everything a backend needs to open the components of one pipeline: where its graphs come
    from (GraphSource) and where and how they run."""

    device: Device = Device.CPU
    providers: tuple[str, ...] | None = None  # ONNX Runtime providers; None = the device's (Device.providers)
    engines_dir: Path | None = None  # TensorRT engines made by `adgen engines` (tensorrt backend)
    cuda_graphs: bool = False  # tensorrt and torch (cuda) backends: replay each shape set from a captured CUDA graph
    threads: int | None = None  # intra-op threads; None = the library's default
    spin: bool = True  # let idle ONNX Runtime pool threads busy-wait (lower latency when alone on the cores)
    server_url: str | None = None  # triton backend: host:port (gRPC), grpc://host:port or http://host:port

    @property
    def ort_providers(self) -> tuple[str, ...]:
        return self.providers if self.providers is not None else self.device.providers


@dataclass
class RequestScope:
    """One request's run of a loop (the latent loop or a box loop), for components served
    elsewhere: within it the inputs their specs mark `invariant` do not change, so a component
    model may keep them from the first call, keyed by `key`, and the calls after it carry only
    what changes per step (runtime/serving/resident.py). `final` is set before the loop's last
    step: that call tells the model to drop them. Local backends ignore it."""

    key: str = field(default_factory=lambda: secrets.token_hex(16))  # unguessable: it names this request's tensors
    final: bool = False
    holders: set[str] = field(default_factory=set)  # models that were sent this scope's invariant inputs


_SCOPE: ContextVar[RequestScope | None] = ContextVar("adgen_request_scope", default=None)


@contextmanager
def request_scope() -> Iterator[RequestScope]:
    """The scope of one loop over one request (or one batch of requests) in this thread."""
    scope = RequestScope()
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def current_scope() -> RequestScope | None:
    return _SCOPE.get()


class Component(ABC):
    """One exported component on one backend."""

    def __init__(self, spec: ComponentSpec, check_values: bool = False):
        self.spec = spec
        # NaN/Inf scans cost a pass over every input; servers turn them on at their boundary.
        self.check_values = check_values

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = self.spec.validate_inputs(feed, check_values=self.check_values)
        outputs = self._run(feed)
        self.spec.validate_outputs(outputs, env)
        return outputs

    def close(self) -> None:
        """Release what the backend holds for this component (connections, shared memory)."""

    @abstractmethod
    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the backend; outputs keyed by spec output name."""


def run_cast(component: Component, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run with float inputs in the dtypes the component's spec declares (float16 graphs take
    float16); what the spec does not declare is left for `Component.run` to refuse."""
    return component.run(component.spec.cast_inputs(feed))
