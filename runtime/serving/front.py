"""The HTTP front `adgen serve` exposes: what reaches tritonserver's HTTP port is what its parser
can take. tritonserver itself listens on a private loopback port.

Triton 2.51 parses a request's JSON recursively (200,000 nested `[` kill it with SIGSEGV),
receives and buffers any body whole before a model sees it (no input cap before 2.59), and keeps
a connection whose client sends slowly or never finishes. The front, stdlib asyncio only, refuses
before forwarding anything:

- a request line and headers not complete within `header_timeout_s`, or larger than
  `max_header_bytes` (408 / 431);
- a body without Content-Length (chunked: 411) or compressed (Content-Encoding: 415), larger
  than `max_body_bytes` (413, without reading it), or one whose bytes pause for more than
  `body_idle_s` or take more than `body_timeout_s` in all (408);
- a JSON part (the first Inference-Header-Content-Length bytes of a KServe binary-data request,
  else the whole body) over `max_json_bytes` (413; Triton parses it into a DOM), nested deeper than
  `max_json_depth` (400, found by an iterative scan, never by a recursive parser), or not JSON (400);
- more than `max_connections` connections, or bodies past `max_buffered_bytes` held at once (503).

A request that passes is forwarded whole, so Triton never waits on a slow client. Answers keep
Triton's status except where 2.51 says "retry later" with a client-error or server-fault code: a
model unloading, loading or gone for a reload (400/404 "not ready", "has no available versions")
and a crashed Python stub (500 "is not healthy") become 503, as does a tritonserver that is not
answering (restarting); a JSON body Triton could not parse is 400. Every 503 carries Retry-After.

Cancellation: tritonserver 2.51 does not cancel an HTTP request whose client disconnects. The
front gives each inference request a random token (header CANCEL_HEADER, which Triton forwards to
the model as a request parameter); when the client disconnects before the answer, the front creates
`cancel_dir/<token>` and the pipeline model stops at its next component call.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import unquote

from runtime.errors import BackendError
from runtime.serving.admission import Admission, QueueFull
from runtime.serving.names import (
    CANCEL_HEADER,
    NOT_ANSWERING_MESSAGE,
    NOT_READY_MESSAGES,
    STUB_DEAD_MESSAGE,
)

MIB = 1024 * 1024
CHUNK = 256 * 1024
INFER_PATH = re.compile(r"/v2/models/([^/?]+)(?:/versions/[^/?]+)?/infer")
# A JSON string (escapes included, possessive: no backtracking) or one bracket: everything else
# in a JSON text is irrelevant to nesting.
JSON_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')
OPEN, CLOSE = frozenset(b"[{"), frozenset(b"]}")
# Headers about this hop, not the request: the front sets its own towards Triton.
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                         "upgrade", "expect", "content-length", CANCEL_HEADER})
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class FrontLimits:
    """What one request may be and take, and how many the front holds at once."""

    max_body_bytes: int = 64 * MIB
    max_json_bytes: int = 4 * MIB
    max_json_depth: int = 32
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_idle_s: float = 10.0
    body_timeout_s: float = 120.0
    keepalive_s: float = 60.0  # an idle connection between requests
    response_timeout_s: float = 3600.0  # Triton's answer (its own queue timeouts come first)
    write_idle_s: float = 60.0  # a client that stops reading its answer
    max_connections: int = 256
    max_buffered_bytes: int = 512 * MIB

    def __post_init__(self) -> None:
        if min(self.max_body_bytes, self.max_json_bytes, self.max_json_depth, self.max_connections) < 1:
            raise BackendError(f"FrontLimits: sizes, depth and connections must be >= 1, got {self}")


def json_depth(data: bytes, limit: int) -> int:
    """How deep `data` nests arrays and objects, counted iteratively; stops at `limit` + 1."""
    depth = deepest = 0
    for token in JSON_TOKENS.finditer(data):
        first = token.group()[0]
        if first in OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif first in CLOSE:
            depth -= 1
    return deepest


class Refused(Exception):
    """A request the front answers itself; `close`: the connection cannot carry another request."""

    def __init__(self, status: HTTPStatus, message: str, close: bool = True):
        super().__init__(message)
        self.status = status
        self.close = close


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    keep_alive: bool = True

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name]
        if len(values) > 1:
            raise Refused(HTTPStatus.BAD_REQUEST, f"header {name} given {len(values)} times")
        return values[0] if values else None


@dataclass
class FrontStats:
    """What the front refused and why, for logs and tests."""

    forwarded: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    cancelled: int = 0

    def refuse(self, status: int) -> None:
        self.refused[status] = self.refused.get(status, 0) + 1


class HttpFront:
    """The front of one HTTP port: `listen` on (host, port), forward to `upstream` (host, port).
    With `read_only`, only GET is forwarded (the metrics port). Runs on the event loop of a
    `FrontThread`."""

    def __init__(self, upstream: tuple[str, int], limits: FrontLimits = FrontLimits(), cancel_dir: Path | None = None,
                 read_only: bool = False, admission: Admission | None = None):
        self.upstream = upstream
        self.limits = limits
        self.admission = admission  # per-model overload bounds on inference calls (admission.py)
        self.cancel_dir = cancel_dir
        self.read_only = read_only
        self.stats = FrontStats()
        self.connections = 0
        self.buffered = 0
        self._open: set[asyncio.StreamWriter] = set()  # client and upstream connections, closed on stop

    def close_connections(self) -> None:
        """Close every connection this front holds (on stop: an idle keep-alive towards Triton
        would make its shutdown wait out --exit-timeout-secs)."""
        for writer in list(self._open):
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.add(writer)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            if self.connections > self.limits.max_connections:
                raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; retry later")
            first, carried = True, b""
            while True:
                try:
                    request = await self._read_request(reader, writer, first, carried)
                except Refused as e:
                    if e.close:
                        raise
                    self.stats.refuse(int(e.status))
                    await self._answer(writer, e.status, str(e), close=False)
                    continue
                if request is None:
                    return
                first = False
                upstream, keep, carried = await self._admitted(request, reader, writer, upstream)
                if not (keep and request.keep_alive):
                    return
        except Refused as e:
            self.stats.refuse(int(e.status))
            await self._answer(writer, e.status, str(e), close=True)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass  # the client went away or stalled: nothing to answer
        finally:
            self.connections -= 1
            for w in (writer, upstream[1] if upstream else None):
                if w is not None:
                    w.close()
                    self._open.discard(w)

    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            first: bool, carried: bytes = b"") -> Request | None:
        """The next request; `carried`: its first byte, read while the previous answer was awaited."""
        limits = self.limits
        try:
            # waiting for the first byte of a next request is keep-alive; the rest must come promptly
            start = carried or await asyncio.wait_for(reader.read(1), limits.header_timeout_s if first else limits.keepalive_s)
        except asyncio.TimeoutError:
            if first:
                raise Refused(HTTPStatus.REQUEST_TIMEOUT, f"no request within {limits.header_timeout_s:.0f} s") from None
            return None
        if not start:
            return None
        try:
            head = start + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), limits.header_timeout_s)
        except asyncio.TimeoutError:
            raise Refused(HTTPStatus.REQUEST_TIMEOUT, f"request headers not complete within {limits.header_timeout_s:.0f} s") from None
        except asyncio.LimitOverrunError:
            raise Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request headers over {limits.max_header_bytes} bytes") from None
        if len(head) > limits.max_header_bytes:
            raise Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request headers over {limits.max_header_bytes} bytes")
        request = _parse_head(head, limits.max_headers)
        length = self._check_head(request)
        if length:
            if (request.header("expect") or "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.body = await self._read_body(reader, length)
            self._check_json(request)
        return request

    def _check_head(self, request: Request) -> int:
        """The body's length, once the head allows a body of it."""
        limits = self.limits
        if self.read_only and request.method not in ("GET", "HEAD"):
            raise Refused(HTTPStatus.METHOD_NOT_ALLOWED, "this port only answers GET")
        if request.header("transfer-encoding") is not None:
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "chunked request bodies are not accepted: send Content-Length")
        if (request.header("content-encoding") or "identity").lower() != "identity":
            raise Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "compressed request bodies are not accepted")
        length = _number(request.header("content-length") or "0", "Content-Length")
        if length > (0 if self.read_only else limits.max_body_bytes):
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"request body of {length} bytes: at most {limits.max_body_bytes} accepted")
        json_part = request.header("inference-header-content-length")
        json_length = length if json_part is None else _number(json_part, "Inference-Header-Content-Length")
        if json_length > length:
            raise Refused(HTTPStatus.BAD_REQUEST, f"Inference-Header-Content-Length {json_length} exceeds Content-Length {length}")
        if json_length > limits.max_json_bytes:
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"JSON part of {json_length} bytes: at most {limits.max_json_bytes} accepted "
                          "(send tensors in the binary-data extension)")
        return length

    async def _read_body(self, reader: asyncio.StreamReader, length: int) -> bytes:
        limits = self.limits
        if self.buffered + length > limits.max_buffered_bytes:
            raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, "too many request bodies in flight; retry later")
        self.buffered += length
        try:
            parts, received = [], 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + limits.body_timeout_s
            while received < length:
                wait = min(limits.body_idle_s, deadline - loop.time())
                try:
                    part = await asyncio.wait_for(reader.read(min(CHUNK, length - received)), max(wait, 0.0))
                except asyncio.TimeoutError:
                    raise Refused(HTTPStatus.REQUEST_TIMEOUT,
                                  f"request body not received in time ({received} of {length} bytes; pauses of at most "
                                  f"{limits.body_idle_s:.0f} s, {limits.body_timeout_s:.0f} s in all)") from None
                if not part:
                    raise ConnectionError("client closed the connection mid-body")
                parts.append(part)
                received += len(part)
            return b"".join(parts)
        finally:
            self.buffered -= length

    def _check_json(self, request: Request) -> None:
        json_part = request.header("inference-header-content-length")
        data = request.body if json_part is None else request.body[: int(json_part)]
        depth = json_depth(data, self.limits.max_json_depth)
        if depth > self.limits.max_json_depth:
            raise Refused(HTTPStatus.BAD_REQUEST, f"JSON nested deeper than {self.limits.max_json_depth} levels", close=False)
        try:
            json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise Refused(HTTPStatus.BAD_REQUEST, f"the request's JSON is not valid: {e}", close=False) from None

    async def _admitted(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None):
        """`_forward` within the model's admission bound; past it the front answers 503 itself."""
        model = INFER_PATH.fullmatch(request.target.split("?")[0])
        if self.admission is None or model is None:
            return await self._forward(request, reader, writer, upstream)
        try:
            async with self.admission.slot(unquote(model.group(1))):
                return await self._forward(request, reader, writer, upstream)
        except QueueFull as e:
            self.stats.refuse(503)
            await self._answer(writer, HTTPStatus.SERVICE_UNAVAILABLE, str(e), close=False)
            return upstream, True, b""

    async def _forward(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None):
        """Send `request` to Triton and its answer to the client. Returns the upstream connection
        (None once closed), whether the client connection can carry another request, and the first
        byte of that request if the client sent it early."""
        token = secrets.token_hex(16) if self.cancel_dir is not None and INFER_PATH.fullmatch(request.target.split("?")[0]) else None
        for attempt in (1, 2):
            # a kept connection may be one Triton has closed (it restarted): the request is sent
            # again, once, on a new one; it had not been answered (adgen's requests are seeded)
            reused = upstream is not None
            try:
                if upstream is None:
                    upstream = await asyncio.open_connection(*self.upstream)
                    self._open.add(upstream[1])
                up_reader, up_writer = upstream
                up_writer.write(_upstream_head(request, token) + request.body)
                await up_writer.drain()
                response = asyncio.ensure_future(_read_response_head(up_reader, self.limits.response_timeout_s))
                gone, carried = await _until_answered_or_gone(response, reader)
            except (ConnectionError, OSError):
                upstream = self._close(upstream)
                if reused and attempt == 1:
                    continue
                self.stats.refuse(503)
                await self._answer(writer, HTTPStatus.SERVICE_UNAVAILABLE,
                                   f"{NOT_ANSWERING_MESSAGE} (restarting?); retry later", close=False)
                return None, True, b""
            if gone:
                self._cancelled(token, response, up_writer)
                return None, False, b""
            try:
                status, headers = response.result()
                break
            except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                upstream = self._close(upstream)
                unanswered = isinstance(e, (ConnectionError, asyncio.IncompleteReadError)) and not getattr(e, "partial", b"")
                if reused and attempt == 1 and unanswered:
                    continue
                self.stats.refuse(503)
                await self._answer(writer, HTTPStatus.SERVICE_UNAVAILABLE,
                                   "the inference server dropped the request; retry later", close=False)
                return None, True, carried
        self.stats.forwarded += 1
        keep_upstream = await self._relay(request, status, headers, up_reader, writer)
        return (upstream if keep_upstream else self._close(upstream)), True, carried

    def _close(self, upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
        """Close an upstream connection (Triton ended it, or its answer ran to EOF): no reuse."""
        if upstream is not None:
            upstream[1].close()
            self._open.discard(upstream[1])

    def _cancelled(self, token: str | None, response: asyncio.Future, up_writer: asyncio.StreamWriter) -> None:
        """The client left before its answer: mark the request cancelled; drop the answer when it comes."""
        self.stats.cancelled += 1
        if token is None:
            response.cancel()
            up_writer.close()
            self._open.discard(up_writer)
            return
        marker = self.cancel_dir / token
        marker.touch()

        def done(_: asyncio.Future) -> None:
            marker.unlink(missing_ok=True)
            up_writer.close()
            self._open.discard(up_writer)

        response.add_done_callback(done)

    async def _relay(self, request: Request, status: int, headers: list[tuple[str, str]],
                     up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Send Triton's answer on; returns whether the upstream connection is still usable."""
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), None)
        chunked = any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers)
        no_body = request.method == "HEAD" or status in (204, 304)
        if status >= 400 and not no_body and length is not None and length <= MIB:
            body = await asyncio.wait_for(up_reader.readexactly(length), self.limits.response_timeout_s)
            status, body = _retriable_status(status, body)
            extra = [("Retry-After", str(RETRY_AFTER_S))] if status == 503 else []
            kept = [(k, v) for k, v in headers if k.lower() not in ("content-length", "connection", "retry-after")]
            await self._write(writer, _head(status, kept + extra + [("Content-Length", str(len(body)))]) + body)
            return True
        kept = [(k, v) for k, v in headers if k.lower() not in ("connection", "keep-alive")]
        await self._write(writer, _head(status, kept))
        if no_body:
            return True
        if chunked:
            await self._relay_chunked(up_reader, writer)
            return True
        if length is None:  # until Triton closes
            while part := await asyncio.wait_for(up_reader.read(CHUNK), self.limits.response_timeout_s):
                await self._write(writer, part)
            return False
        remaining = length
        while remaining:
            part = await asyncio.wait_for(up_reader.read(min(CHUNK, remaining)), self.limits.response_timeout_s)
            if not part:
                raise ConnectionError("the inference server closed mid-answer")
            remaining -= len(part)
            await self._write(writer, part)
        return True

    async def _relay_chunked(self, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            size_line = await asyncio.wait_for(up_reader.readuntil(b"\r\n"), self.limits.response_timeout_s)
            size = int(size_line.split(b";")[0], 16)
            data = await up_reader.readexactly(size + 2)
            await self._write(writer, size_line + data)
            if size == 0:
                return

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.limits.write_idle_s)

    async def _answer(self, writer: asyncio.StreamWriter, status: HTTPStatus, message: str, close: bool) -> None:
        body = json.dumps({"error": message}).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            headers.append(("Retry-After", str(RETRY_AFTER_S)))
        if close:
            headers.append(("Connection", "close"))
        try:
            await self._write(writer, _head(int(status), headers) + body)
        except (ConnectionError, asyncio.TimeoutError):
            pass


def _number(text: str, name: str) -> int:
    if not text.strip().isdigit():
        raise Refused(HTTPStatus.BAD_REQUEST, f"{name}: expected a number of bytes, got {text!r}")
    return int(text)


def _parse_head(head: bytes, max_headers: int) -> Request:
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise Refused(HTTPStatus.BAD_REQUEST, "malformed request line") from None
    if version not in ("HTTP/1.1", "HTTP/1.0") or not target.startswith("/") or not method.isalpha():
        raise Refused(HTTPStatus.BAD_REQUEST, "malformed request line")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise Refused(HTTPStatus.BAD_REQUEST, "malformed header line")
        headers.append((name, value.strip()))
    if len(headers) > max_headers:
        raise Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {max_headers} headers")
    request = Request(method, target, version, headers)
    connection = (request.header("connection") or "").lower()
    request.keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
    return request


def _upstream_head(request: Request, token: str | None) -> bytes:
    headers = [(k, v) for k, v in request.headers if k.lower() not in HOP_HEADERS]
    headers.append(("Content-Length", str(len(request.body))))
    if token is not None:
        headers.append((CANCEL_HEADER, token))
    lines = [f"{request.method} {request.target} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _read_response_head(reader: asyncio.StreamReader, timeout_s: float) -> tuple[int, list[tuple[str, str]]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
    return status, headers


async def _until_answered_or_gone(answer: asyncio.Future, client: asyncio.StreamReader) -> tuple[bool, bytes]:
    """Wait for `answer` while reading one byte from the client: EOF or an error there means the
    client left (True). A byte that does arrive is the start of its next request (returned)."""
    peek = asyncio.ensure_future(client.read(1))
    try:
        done, _ = await asyncio.wait({answer, peek}, return_when=asyncio.FIRST_COMPLETED)
        if peek in done:
            if peek.exception() is not None or not peek.result():
                return True, b""
            await asyncio.wait({answer})
            return False, peek.result()
        return False, b""
    finally:
        if not peek.done():
            peek.cancel()


def _retriable_status(status: int, body: bytes) -> tuple[int, bytes]:
    """2.51's code for an error, or 503 where it means "retry later", 400 where Triton could not
    parse the request (the module docstring)."""
    try:
        message = str(json.loads(body).get("error", ""))
    except (ValueError, AttributeError):
        return status, body
    lowered = message.lower()
    if status in (400, 404, 500) and any(f in lowered for f in NOT_READY_MESSAGES):
        return 503, body
    if status == 500 and STUB_DEAD_MESSAGE in lowered:
        return 503, body
    if status == 500 and "failed to parse" in lowered:
        return 400, body
    return status, body


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class FrontThread:
    """An event loop in a daemon thread serving the HTTP fronts (and the gRPC front) of one
    `adgen serve`; `stop()` closes the listening sockets and every connection."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="adgen-front", daemon=True)
        self._servers: list = []
        self._fronts: list[HttpFront] = []
        self._thread.start()

    def run(self, coroutine):
        """Run `coroutine` on the front's loop and return its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def serve_http(self, front: HttpFront, host: str, port: int) -> int:
        """Listen for `front` on (host, port); returns the port (a free one for port 0)."""
        async def start():
            server = await asyncio.start_server(front.handle, host, port, limit=front.limits.max_header_bytes,
                                                reuse_address=True)
            self._servers.append(server)
            self._fronts.append(front)
            return server.sockets[0].getsockname()[1]

        return self.run(start())

    def add(self, server) -> None:
        """Keep another server (the gRPC front) to close on stop."""
        self._servers.append(server)

    def stop(self) -> None:
        """Stop listening and close every connection (the loop keeps running until `close`)."""
        async def close():
            for server in self._servers:
                if isinstance(server, asyncio.base_events.Server):
                    server.close()
                else:
                    await server.stop(grace=1.0)
            for front in self._fronts:
                front.close_connections()

        if self._thread.is_alive():
            self.run(close())

    def close(self) -> None:
        """End the loop and its thread (after `stop`)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
