"""Run a whole request inside the server: one call to a pipeline's (BLS) model.

    client = PipelineClient("localhost:8001")
    result = client.generate(get_pipeline("refadgen"), {"product": "shoe.png", "prompt": "..."})
    client.close()
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np

from runtime.errors import BackendError
from runtime.pipelines.base import GenerateResult, PipelineDefinition
from runtime.presets import Preset, get_preset
from runtime.serving.client import DEFAULT_TIMEOUT_S, RetryHook, RetryPolicy, TritonConnection
from runtime.serving.names import ConfigKey
from runtime.serving.protocol import IMAGE_OUTPUT, REPORT_OUTPUT, decode_response, encode_request


class PipelineClient:
    """Thread-safe over gRPC (one connection); over HTTP each thread gets its own client."""

    def __init__(
        self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy = RetryPolicy(),
        on_retry: RetryHook | None = None,
    ):
        # The request is a few small tensors and the file bytes; the image comes back inline.
        # Requests are seeded, so a retried one gives the same image (see RetryPolicy).
        self.connection = TritonConnection(url, timeout_s=timeout_s, use_shm=False, retry=retry, on_retry=on_retry)

    def served_preset(self, definition: PipelineDefinition) -> Preset:
        """The preset the server's `definition` model was generated for (its config parameter):
        the sizes a request must fit there."""
        name = self.connection.model_parameters(definition.name).get(ConfigKey.PRESET)
        if not name:
            raise BackendError(
                f"{definition.name} on {self.connection.endpoint.address}: its config has no {ConfigKey.PRESET} "
                "parameter (not a model `adgen serve` generated?)"
            )
        return get_preset(name)

    def generate(self, definition: PipelineDefinition, options: Mapping[str, Any]) -> GenerateResult:
        feed = encode_request(definition, options)
        started = time.perf_counter()
        outputs = self.connection.infer(
            definition.name, feed, {IMAGE_OUTPUT: ((0, 0, 3), np.dtype(np.uint8)), REPORT_OUTPUT: ((1,), np.dtype(object))}
        )
        image, report = decode_response(outputs)
        report["server_url"] = f"{self.connection.endpoint.protocol}://{self.connection.endpoint.address}"
        report["round_trip_s"] = round(time.perf_counter() - started, 6)
        return GenerateResult(image, report)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "PipelineClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
