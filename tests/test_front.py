"""The HTTP front without tritonserver: the JSON depth scan, and the front against a stand-in
upstream (an asyncio server answering what a test tells it), so what Triton 2.51 cannot be made
to do on demand (close a kept connection, answer a given error) is tested too. Loopback only."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from runtime.serving.front import FrontLimits, FrontThread, HttpFront, json_depth
from runtime.serving.names import CANCEL_HEADER


@pytest.mark.parametrize("text, depth", [
    (b"{}", 1), (b'{"a": [[1, 2], [3]]}', 3), (b"[" * 1000, 1000), (b'"[[[["', 0),
    (b'{"a": "\\"[[[", "b": [1]}', 2), (b'["]", "\\\\", ["x"]]', 2),
])
def test_json_depth_counts_brackets_outside_strings(text, depth):
    assert json_depth(text, limit=10_000) == depth


def test_json_depth_stops_past_the_limit_on_200000_brackets():
    started = time.monotonic()
    assert json_depth(b"[" * 200_000, limit=32) == 33
    assert time.monotonic() - started < 1.0


class Upstream:
    """A stand-in for tritonserver: answers each request with `answers.pop(0)` (status, JSON body),
    or closes the connection without a word when the answer is None."""

    def __init__(self, thread: FrontThread):
        self.answers: list[tuple[int, dict] | None] = []
        self.requests: list[bytes] = []
        self.server = thread.run(asyncio.start_server(self.handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]

    async def handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0)
                self.requests.append(head + await reader.readexactly(length))
                if not await self.respond(writer):
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def respond(self, writer) -> bool:
        """Answer one request; False: close the connection instead."""
        answer = self.answers.pop(0) if self.answers else (200, {"ok": True})
        if answer is None:
            return False
        body = json.dumps(answer[1]).encode()
        writer.write(f"HTTP/1.1 {answer[0]} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        return True


@pytest.fixture
def front(tmp_path):
    thread = FrontThread()
    upstream = Upstream(thread)
    http = HttpFront(("127.0.0.1", upstream.port), FrontLimits(max_body_bytes=1000, header_timeout_s=1, body_idle_s=1),
                     cancel_dir=tmp_path)
    port = thread.serve_http(http, "127.0.0.1", 0)
    try:
        yield port, upstream, http
    finally:
        thread.stop()
        thread.run(_close(upstream.server))
        thread.close()


async def _close(server):
    server.close()


def _exchange(port: int, data: bytes, keep: socket.socket | None = None) -> tuple[int, bytes]:
    s = keep or socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(data)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += s.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += s.recv(65536)
    if keep is None:
        s.close()
    return int(head.split(b" ")[1]), head + b"\r\n\r\n" + body


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_what_passes_is_forwarded_whole_with_a_fresh_cancel_token(front):
    port, upstream, _ = front
    status, _ = _exchange(port, _post("/v2/models/m/infer", b'{"inputs": []}', f"{CANCEL_HEADER}: forged\r\n"))
    assert status == 200
    (sent,) = upstream.requests
    assert sent.endswith(b'{"inputs": []}') and b"forged" not in sent
    token = next(line.split(b": ")[1] for line in sent.split(b"\r\n") if line.lower().startswith(CANCEL_HEADER.encode()))
    assert len(token) == 32
    _exchange(port, _post("/v2/repository/index", b"{}"))
    assert CANCEL_HEADER.encode() not in upstream.requests[1].lower()


@pytest.mark.parametrize("data, status", [
    (_post("/v2/models/m/infer", b"[" * 100), 400),
    (_post("/v2/models/m/infer", b'{"inputs": [}'), 400),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Encoding: gzip\r\n\r\n", 415),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n", 400),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nInference-Header-Content-Length: 20\r\n\r\n", 400),
    (b"BROKEN\r\n\r\n", 400),
    (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{", 408),
])
def test_what_fails_the_checks_never_reaches_the_upstream(front, data, status):
    port, upstream, _ = front
    assert _exchange(port, data)[0] == status
    assert upstream.requests == []


@pytest.mark.parametrize("upstream_status, message, status", [
    (400, "Request for unknown model: 'm' is not ready", 503),
    (404, "Request for unknown model: 'm' has no available versions", 503),
    (500, "Stub process 'm_0_0' is not healthy.", 503),
    (500, "failed to parse the request JSON buffer: Invalid value. at 12", 400),
    (500, "m: internal error (ValueError; details in the server log)", 500),
    (404, "Request for unknown model: 'x' is not found", 404),
])
def test_statuses_say_retry_or_fix(front, upstream_status, message, status):
    port, upstream, _ = front
    upstream.answers.append((upstream_status, {"error": message}))
    got, answer = _exchange(port, _post("/v2/models/m/infer", b"{}"))
    assert got == status and message.encode() in answer
    assert (b"Retry-After: 1" in answer) == (status == 503)


def test_a_kept_connection_the_upstream_closed_is_replaced_once(front):
    port, upstream, _ = front
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert _exchange(port, _post("/v2/models/m/infer", b"{}"), keep=s)[0] == 200
        upstream.answers.append(None)  # the kept upstream connection closes without answering
        assert _exchange(port, _post("/v2/models/m/infer", b"{}"), keep=s)[0] == 200
    assert len(upstream.requests) == 3


def test_an_upstream_that_is_down_is_503(front):
    port, upstream, http = front
    http.upstream = ("127.0.0.1", 1)
    status, answer = _exchange(port, _post("/v2/models/m/infer", b"{}"))
    assert status == 503 and b"not answering" in answer and b"Retry-After" in answer


def test_a_client_that_leaves_marks_its_request_cancelled(front, tmp_path):
    port, upstream, http = front
    gate = asyncio.Event()

    async def slow(reader, writer):  # answers only once the gate opens
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        upstream.requests.append(head + await reader.readexactly(length))
        await gate.wait()
        writer.write(b"HTTP/1.1 400 X\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    thread = FrontThread()
    server = thread.run(asyncio.start_server(slow, "127.0.0.1", 0))
    http.upstream = ("127.0.0.1", server.sockets[0].getsockname()[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(_post("/v2/models/m/infer", b"{}"))
    deadline = time.monotonic() + 10
    while not upstream.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    s.close()
    deadline = time.monotonic() + 10
    while not list(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    (marker,) = list(tmp_path.iterdir())
    assert marker.name.encode() in upstream.requests[0] and http.stats.cancelled == 1
    thread.loop.call_soon_threadsafe(gate.set)  # the answer comes: the marker goes
    deadline = time.monotonic() + 10
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not marker.exists()
    thread.stop()
    thread.run(_close(server))
    thread.close()
