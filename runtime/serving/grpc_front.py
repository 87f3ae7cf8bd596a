"""The gRPC front `adgen serve` exposes, forwarding to tritonserver's private gRPC port.

tritonserver 2.51 takes gRPC messages up to 2 GiB and has no option to lower that; protobuf's own
recursion limit already bounds nesting. The front (grpcio's asyncio server, bytes in and out,
never deserialized) refuses a message over `max_body_bytes` as gRPC itself does, before the
message is buffered (RESOURCE_EXHAUSTED), a request message that does not arrive within
`body_timeout_s` (DEADLINE_EXCEEDED: slow or half-open uploads), and more than `max_connections`
calls at once (RESOURCE_EXHAUSTED). Each call is forwarded with its metadata (the admin key
included) and its remaining deadline; a client that cancels, or whose deadline passes, cancels
the forwarded call, which Triton turns into `request.is_cancelled()` for the model.

Statuses Triton 2.51 gives where the meaning is "retry later" become UNAVAILABLE (a model not
ready or gone for a reload: NOT_FOUND / INVALID_ARGUMENT; a crashed stub: INTERNAL); a restricted
endpoint without the key, which 2.51 answers UNAVAILABLE, becomes PERMISSION_DENIED; a
tritonserver that is not answering (restarting) is UNAVAILABLE. Streaming inference
(ModelStreamInfer, for decoupled models, which adgen has none of) is not forwarded.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, AsyncIterator

import grpc
from grpc import aio

from runtime.serving.admission import Admission, QueueFull, model_of_infer_request
from runtime.serving.front import FrontLimits
from runtime.serving.names import (
    NOT_ANSWERING_MESSAGE,
    NOT_READY_MESSAGES,
    RESTRICTED_MESSAGE,
    STUB_DEAD_MESSAGE,
)

SERVICE = "/inference.GRPCInferenceService/"
INFER = SERVICE + "ModelInfer"
STREAMING = SERVICE + "ModelStreamInfer"
UNLIMITED = -1
# what grpc says when it cannot reach tritonserver (restarting), as opposed to Triton's own UNAVAILABLE
UNREACHABLE = ("failed to connect", "connection refused", "socket closed", "connections to all backends failing")
# metadata gRPC sets itself on the forwarded call
RESERVED = ("grpc-", ":")
RESERVED_KEYS = frozenset({"user-agent", "te", "content-type"})


def _status(code: grpc.StatusCode, details: str) -> grpc.StatusCode:
    """2.51's status, or the one a generic client can act on (module docstring)."""
    lowered = details.lower()
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL) and any(
        f in lowered for f in NOT_READY_MESSAGES
    ):
        return grpc.StatusCode.UNAVAILABLE
    if code == grpc.StatusCode.INTERNAL and STUB_DEAD_MESSAGE in lowered:
        return grpc.StatusCode.UNAVAILABLE
    if code == grpc.StatusCode.UNAVAILABLE and RESTRICTED_MESSAGE in lowered:
        return grpc.StatusCode.PERMISSION_DENIED
    return code


class GrpcFront(grpc.GenericRpcHandler):
    """Every method of Triton's gRPC service, forwarded as bytes to `upstream` (host:port)."""

    def __init__(self, upstream: str, limits: FrontLimits = FrontLimits(), admission: Admission | None = None):
        self.limits = limits
        self.admission = admission  # per-model overload bounds on ModelInfer (admission.py)
        self.upstream = upstream
        self.channel: aio.Channel | None = None
        self.calls = 0

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        if not method.startswith(SERVICE):
            return None
        if method == STREAMING:
            return grpc.stream_stream_rpc_method_handler(self._refuse_streaming)
        # Read as a stream (the wire is the same as unary): the handler starts when the call does,
        # so the request message can be timed.
        return grpc.stream_unary_rpc_method_handler(functools.partial(self._forward, method))

    async def _refuse_streaming(self, requests: AsyncIterator[bytes], context: aio.ServicerContext) -> AsyncIterator[bytes]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "streaming inference is not served here: use ModelInfer")
        yield b""  # pragma: no cover (abort raises)

    async def _forward(self, method: str, requests: AsyncIterator[bytes], context: aio.ServicerContext) -> bytes:
        limits = self.limits
        try:
            request = await asyncio.wait_for(requests.__anext__(), limits.body_timeout_s)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"request message not received within {limits.body_timeout_s:.0f} s")
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
        if self.channel is None:
            self.channel = aio.insecure_channel(self.upstream, options=[
                ("grpc.max_send_message_length", UNLIMITED), ("grpc.max_receive_message_length", UNLIMITED)])
        metadata = tuple((k, v) for k, v in context.invocation_metadata() or ()
                         if not k.startswith(RESERVED) and k not in RESERVED_KEYS)
        model = model_of_infer_request(request) if method == INFER and self.admission is not None else None
        if model is None:
            return await self._call(method, request, metadata, context)
        try:
            async with self.admission.slot(model):
                return await self._call(method, request, metadata, context)
        except QueueFull as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        raise AssertionError("unreachable")  # abort raises

    async def _call(self, method: str, request: bytes, metadata: tuple, context: aio.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        call = self.channel.unary_unary(method)(request, metadata=metadata, timeout=remaining)
        try:
            return await call
        except aio.AioRpcError as e:
            code, details = e.code(), e.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE and any(f in details.lower() for f in UNREACHABLE):
                details = f"{NOT_ANSWERING_MESSAGE} (restarting?); retry later ({details})"
            await context.abort(_status(code, details), details)
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed: so does Triton's request
            call.cancel()
            raise
        raise AssertionError("unreachable")  # abort raises

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


async def start_grpc_front(front: GrpcFront, host: str, port: int) -> tuple[aio.Server, int]:
    """Listen for `front` on (host, port); returns the server and its port (a free one for 0)."""
    limits = front.limits
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", limits.max_body_bytes),
            ("grpc.max_send_message_length", UNLIMITED),
            ("grpc.max_connection_idle_ms", int(limits.keepalive_s * 1000)),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=limits.max_connections,
    )
    server.add_generic_rpc_handlers((front,))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    return server, bound
