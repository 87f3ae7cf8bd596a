"""`adgen serve` as an operator exposes it, tried from outside the way issue 14's findings were:
plain tritonclient, raw sockets and urllib against the public ports (the fronts), never the
private tritonserver behind them. Tiny preset, loopback only, one `adgen serve` for the module
(refadgen and layout, 2 pipeline instances, small component queues, a 2 s client timeout, the
watchdog every second), stopped at the end. The restart test runs last: it kills tritonserver.

Bounds are generous upper bounds for "at once" and "within one step" on a loaded 2-core machine,
not performance targets; a state a test relies on is observed (statistics, process lists), never
waited for with a bare sleep, and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")

import fixtures  # noqa: E402
from triton_checks import model_stats, wait_until  # noqa: E402

from benchmarks.served import serve  # noqa: E402
from runtime.pipelines import get_pipeline  # noqa: E402
from runtime.presets import get_preset  # noqa: E402
from runtime.serving import names, protocol  # noqa: E402
from runtime.serving.client import NO_RETRY, RetryPolicy, http_inputs  # noqa: E402
from runtime.serving.remote import PipelineClient  # noqa: E402

ADMIN_HEADER = names.ADMIN_HEADER
model_name = protocol.model_name

pytestmark = pytest.mark.triton

CLIENT_TIMEOUT_S = 2
COMPONENT_QUEUE = 2
INSTANCES = 2
PIPELINE_QUEUE = 2
LONG_STEPS = 40  # a request that keeps an instance busy for a while on tiny
MAX_REQUEST_MIB = 16
RSS_BOUND_MIB = 200  # server + stubs may grow by at most this over the oversized requests


@pytest.fixture(scope="module")
def served(tiny_export, cache_root):
    for pipeline in ("refadgen", "layout"):
        tiny_export(pipeline)
    started = serve(cache_root, pipelines=("refadgen", "layout"), extra=(
        "--instances", str(INSTANCES), "--queue-size", str(PIPELINE_QUEUE), "--component-queue-size", str(COMPONENT_QUEUE),
        "--client-timeout", str(CLIENT_TIMEOUT_S),
        "--max-request-mib", str(MAX_REQUEST_MIB), "--watchdog-interval", "1"))
    try:
        assert started.ready, started.log()
        yield started
    finally:
        started.stop()


product = fixtures.served_product()


def _request(url: str, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{url}{path}", data=data, headers=headers or {},
                                     method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _raw(url: str, data: bytes, wait_s: float = 30) -> bytes:
    """What the server answers `data` sent on a fresh socket (until it closes or `wait_s`)."""
    host, port = url.split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        s.sendall(data)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return answer


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _infer_http(served, model, feed, client_timeout=60.0):
    """(status, message) of one request through the HTTP front with plain tritonclient."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(served.http_url, network_timeout=client_timeout)
    try:
        client.infer(model, http_inputs(feed))
        return "200", ""
    except InferenceServerException as e:
        return str(e.status()), e.message()
    finally:
        client.close()


def _pipeline_feed(product, pipeline="refadgen", **options):
    options = {"product": product, "prompt": "a sneaker", "steps": 2, **options} if pipeline == "refadgen" else \
        {"product": product, "text": ["40% off"], **options}
    return protocol.encode_request(get_pipeline(pipeline), options)


def _family_rss_mib(pid: int) -> float:
    """RSS of `pid` and its children (tritonserver and its stubs), MiB."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if int(proc.name) == pid or ppid == pid:
                status = (proc / "status").read_text()
                total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return total / 1024


def _admin_key(served) -> str:
    """The random key `adgen serve` made: never printed; root reads it off tritonserver's command line."""
    argv = Path(f"/proc/{served.server_pid()}/cmdline").read_bytes().decode().split("\0")
    restricted = next(a for a in argv if a.startswith("--http-restricted-api="))
    return restricted.rsplit("=", 1)[1]


def test_the_200000_deep_json_is_refused_and_the_server_lives(served, product):
    pid = served.server_pid()
    deep = b"[" * 200_000
    for path in ("/v2/models/refadgen/infer", "/v2/repository/index", "/v2/systemsharedmemory/region/x/register"):
        code, body = _request(served.http_url, path, deep)
        assert code == 400 and "nested deeper than" in body, (path, code, body)
    code, body = _request(served.http_url, "/v2/models/refadgen/infer", b'{"inputs": [}')
    assert code == 400 and "not valid" in body, body  # 2.51 answers malformed JSON 500
    assert served.server_pid() == pid and _infer_http(served, "refadgen", _pipeline_feed(product))[0] == "200"


def test_bodies_over_the_cap_are_refused_before_they_are_sent(served):
    declared = 300 * 1024 * 1024
    for expect in ("", "Expect: 100-continue\r\n"):
        started = time.monotonic()
        answer = _raw(served.http_url, (f"POST /v2/models/refadgen/infer HTTP/1.1\r\nHost: x\r\n{expect}"
                                        f"Content-Length: {declared}\r\n\r\n").encode() + b"0" * 65536)
        assert _status(answer) == 413 and b"at most" in answer, answer[:200]
        assert time.monotonic() - started < 10
    json_part = (4 << 20) + 1  # a JSON part Triton would parse into a DOM
    answer = _raw(served.http_url, (f"POST /v2/models/refadgen/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {json_part + 8}\r\n"
                                    f"Inference-Header-Content-Length: {json_part}\r\n\r\n").encode())
    assert _status(answer) == 413 and b"JSON part" in answer
    for header, status in (("Transfer-Encoding: chunked", 411), ("Content-Encoding: gzip\r\nContent-Length: 10", 415)):
        answer = _raw(served.http_url, f"POST /v2/models/refadgen/infer HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode())
        assert _status(answer) == status, answer[:200]


def test_a_body_within_the_cap_is_taken_after_100_continue(served, product):
    """What curl does for bodies over 1 MB: headers first, the body once the front says so."""
    import tritonclient.http as httpclient

    feed = _pipeline_feed(product)
    feed["product"] = np.array([product.read_bytes() + b"\0" * (2 << 20)], dtype=object)  # PNG readers stop at IEND
    body, json_size = httpclient.InferenceServerClient.generate_request_body(http_inputs(feed))
    host, port = served.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"POST /v2/models/refadgen/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: {json_size}\r\n\r\n".encode())
        assert s.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        assert s.recv(64).startswith(b"HTTP/1.1 200 ")


def test_a_grpc_message_over_the_cap_is_refused(served, product):
    from runtime.errors import ServerError

    big = product.parent / "big.png"
    big.write_bytes(product.read_bytes() + b"\0" * (MAX_REQUEST_MIB << 20))
    with PipelineClient(served.grpc_url, retry=NO_RETRY) as client:
        with pytest.raises(ServerError, match="RESOURCE_EXHAUSTED"):
            client.generate(get_pipeline("refadgen"), {"product": big, "prompt": "x", "steps": 1})


def test_slow_and_half_open_uploads_are_refused(served):
    before = model_stats(served.http_url, "refadgen")
    for label, data in (("half-open headers", b"POST /v2/models/refadgen/infer HTTP/1.1\r\nHost: x\r\n"),
                        ("a body that stops", b"POST /v2/models/refadgen/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000"
                                              b"\r\n\r\n{\"inputs\": ["),
                        ("a silent connection", b"")):
        started = time.monotonic()
        answer = _raw(served.http_url, data, wait_s=CLIENT_TIMEOUT_S * 10)
        waited = time.monotonic() - started
        assert _status(answer) == 408 and CLIENT_TIMEOUT_S * 0.9 <= waited < CLIENT_TIMEOUT_S * 5, (label, waited, answer[:200])
    after = model_stats(served.http_url, "refadgen")
    assert after == before, "a refused upload reached the model"


def test_control_endpoints_never_open_without_the_key(served):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    for path in ("/v2/repository/index", "/v2/repository/models/refadgen_unet/unload", "/v2/repository/models/x/load",
                 "/v2/systemsharedmemory/status", "/v2/systemsharedmemory/region/r/register", "/v2/logging",
                 "/v2/trace/setting"):
        code, body = _request(served.http_url, path, b"{}")
        assert code == 403 and ADMIN_HEADER in body, (path, code, body)
        code, _ = _request(served.http_url, path, b"{}", {ADMIN_HEADER: "guess"})
        assert code == 403
    for path in ("/v2/models/refadgen/stats", "/v2/models/refadgen/config", "/v2/health/ready"):
        assert _request(served.http_url, path)[0] == 200, path  # statistics and config stay readable
    for model in ("refadgen", model_name("refadgen", "unet")):
        config = _request(served.http_url, f"/v2/models/{model}/config")[1]
        assert str(Path(__file__).resolve().parents[1]) not in config and "/tmp" not in config and "/.cache" not in config
    client = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        for call in (lambda: client.unload_model("refadgen_unet"), lambda: client.get_model_repository_index(),
                     lambda: client.get_system_shared_memory_status(), lambda: client.get_log_settings()):
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert refused.value.status() == "StatusCode.PERMISSION_DENIED", refused.value
        assert client.is_model_ready("refadgen_unet")
    finally:
        client.close()
    key = _admin_key(served)
    assert len(key) >= 32 and key not in served.log(), "the random key was printed"
    code, _ = _request(served.http_url, "/v2/repository/index", b"{}", {ADMIN_HEADER: key})
    assert code == 200
    client = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        assert client.get_model_repository_index(headers={names.GRPC_HEADER_PREFIX + ADMIN_HEADER: key})
    finally:
        client.close()


def test_status_codes_a_generic_client_can_act_on(served, product, tiny_specs):
    """400: fix the request; 503: retry later; 404: no such model (2.51's own)."""
    refadgen = _pipeline_feed(product)
    assert _infer_http(served, "refadgen", {**refadgen, "steps": np.array([0], np.int64)})[0] == "400"
    assert _infer_http(served, "no_such_model", refadgen)[0] == "404"
    ids = tiny_specs["text_encoder"].sample_inputs(np.random.default_rng(0), tiny_specs["text_encoder"].env_at("min"))
    ids["input_ids"][0, 0] = 10**9
    status, message = _infer_http(served, model_name("refadgen", "text_encoder"), ids)
    assert status == "400" and message.startswith("text_encoder.input_ids: expected values in [0, 49407]"), message
    unet = tiny_specs["unet"]
    feed = unet.sample_inputs(np.random.default_rng(0), unet.env_at("min"))
    feed["timestep"][:] = -5
    status, message = _infer_http(served, model_name("refadgen", "unet"), protocol.to_wire(unet, feed))
    assert status == "400" and message.startswith("unet.timestep: expected values in [0, 999]"), message

    key = {ADMIN_HEADER: _admin_key(served)}
    once = model_name("refadgen", "afm_kv")
    assert _request(served.http_url, f"/v2/repository/models/{once}/unload", b"{}", key)[0] == 200
    try:
        wait_until(lambda: _request(served.http_url, f"/v2/models/{once}/ready")[0] != 200, 60, f"{once} unloaded")
        status, message = _infer_http(served, "refadgen", refadgen)  # the pipeline's component is gone
        assert status == "503" and "not ready" in message, (status, message)
    finally:
        assert _request(served.http_url, f"/v2/repository/models/{once}/load", b"{}", key)[0] == 200
    assert _request(served.http_url, "/v2/repository/models/layout/unload", b"{}", key)[0] == 200
    try:
        wait_until(lambda: _request(served.http_url, "/v2/models/layout/ready")[0] != 200, 60, "layout unloaded")
        status, _ = _infer_http(served, "layout", _pipeline_feed(product, "layout"))  # 2.51: 404 / 400 "not ready"
        assert status == "503", status
    finally:
        assert _request(served.http_url, "/v2/repository/models/layout/load", b"{}", key)[0] == 200
    assert _infer_http(served, "refadgen", refadgen)[0] == "200"


def test_an_eps_product_is_refused_by_the_server(served):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 16 16 rectfill showpage\n%%EOF\n"
    feed = {"product": np.array([eps], dtype=object), "prompt": np.array([b"x"], dtype=object)}
    status, message = _infer_http(served, "refadgen", feed)
    assert status == "400" and message.startswith("product: is not a recognized image file: expected PNG, JPEG or WebP")
    assert "/tmp" not in message and "request:product" in message, message


def test_queue_full_on_a_component_model_answers_503_at_once(served, tiny_specs):
    decoder = tiny_specs["vae_decoder"]
    feed = decoder.sample_inputs(np.random.default_rng(0), decoder.env_at("max", B=2))  # the slowest call there is
    burst = 8 * (1 + COMPONENT_QUEUE)
    with ThreadPoolExecutor(burst) as pool:
        answers = list(pool.map(lambda _: (time.monotonic(), _infer_http(served, model_name("refadgen", "vae_decoder"), feed),
                                           time.monotonic()), range(burst)))
    busy = [end - start for start, (status, _), end in answers if status == "503"]
    served_ok = [end - start for start, (status, _), end in answers if status == "200"]
    assert busy and served_ok and len(busy) + len(served_ok) == burst, [a[1] for a in answers]
    assert all("queue" in message.lower() for _, (status, message), _ in answers if status == "503")
    assert min(busy) < max(served_ok), "refusals must not wait for the queue"


def test_full_pipeline_queue_answers_503_at_once_and_triton_never_holds_more(served, product):
    """The fronts keep the pipeline's bound (Triton carries no queue policy: it stalls on 2.51):
    INSTANCES run, PIPELINE_QUEUE wait, the rest are refused at once, and Triton's statistics
    show the refused ones never reached it."""
    from runtime.errors import ServerBusyError

    burst = 4 * (INSTANCES + PIPELINE_QUEUE)
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()
    before = model_stats(served.http_url, "refadgen")

    def one(seed):
        started = time.monotonic()
        try:
            with PipelineClient(served.grpc_url, retry=NO_RETRY) as client:
                client.generate(get_pipeline("refadgen"), {"product": product, "prompt": "x", "steps": LONG_STEPS,
                                                           "seed": seed})
            outcome = "image"
        except ServerBusyError:
            outcome = "busy"
        with lock:
            outcomes.append((outcome, time.monotonic() - started))

    with ThreadPoolExecutor(burst) as pool:
        list(pool.map(one, range(burst)))
    busy = [s for o, s in outcomes if o == "busy"]
    images = [s for o, s in outcomes if o == "image"]
    assert len(busy) + len(images) == burst
    assert busy and len(images) >= INSTANCES, outcomes
    assert max(busy) < min(images), "refusals came before the accepted requests finished"
    after = model_stats(served.http_url, "refadgen")
    assert after["success"] - before["success"] == len(images) and after["fail"] == before["fail"]  # refused ones never reached Triton


def _unet(served) -> int:
    return model_stats(served.http_url, model_name("refadgen", "unet"))["executions"]


def _settled(count, quiet_s: float = 1.0, timeout_s: float = 30) -> int:
    """`count()` once it has not changed for `quiet_s` (a cancelled request's model calls have ended)."""
    last, since = count(), time.monotonic()
    deadline = since + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise AssertionError(f"still counting after {timeout_s:.0f} s")


def test_a_cancelled_request_stops_within_one_step(served, product):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    long_request = _pipeline_feed(product, steps=500)
    # gRPC: the client's deadline passes
    client = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        inputs = []
        for name, array in long_request.items():
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        before = _unet(served)
        with pytest.raises(InferenceServerException, match="Deadline"):
            client.infer("refadgen", inputs, client_timeout=2.0)
        at_deadline = _unet(served)
    finally:
        client.close()
    after = _settled(lambda: _unet(served))
    assert at_deadline > before + 2, "the request never got going"
    assert after - at_deadline <= 1, f"{after - at_deadline} U-Net executions after the deadline"

    # HTTP: the client disconnects (2.51 alone would run all 500 steps)
    import tritonclient.http as httpclient

    body, json_size = httpclient.InferenceServerClient.generate_request_body(http_inputs(long_request))
    host, port = served.http_url.split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST /v2/models/refadgen/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                  f"Inference-Header-Content-Length: {json_size}\r\n\r\n".encode() + body)
        start = _unet(served)
        wait_until(lambda: _unet(served) > start + 2, 60, "the HTTP request running")
        at_close = _unet(served)
    ran = _settled(lambda: _unet(served))
    assert ran - at_close <= 2, f"{ran - at_close} U-Net executions after the disconnect"


def test_a_cancelled_layout_stops_its_box_loop(served, product):
    from runtime.errors import ServerError

    head = model_name("layout", "layout_head")
    def executions():
        return model_stats(served.http_url, head)["executions"]

    before = executions()
    with PipelineClient(served.grpc_url, timeout_s=0.5, retry=NO_RETRY) as client:
        with pytest.raises(ServerError, match="DEADLINE_EXCEEDED|no answer"):
            client.generate(get_pipeline("layout"), {"product": product, "text": ["40% off"], "layout_steps": 100})
    at_deadline = executions()
    ran = _settled(executions)
    assert ran - at_deadline <= 1 and ran - before < 100, (before, at_deadline, ran)


@pytest.mark.parametrize("placement", [("--server", "grpc"), ("--backend", "triton", "--url", "grpc")])
def test_ctrl_c_stops_the_request_it_sent(served, product, placement):
    """`adgen generate` interrupted: its gRPC call is cancelled (--server) or its loop stops between
    component calls (--backend triton); either way the U-Net stops within a step or two."""
    import subprocess
    import sys

    arguments = [served.grpc_url if a == "grpc" else a for a in placement]
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "generate", "--pipeline", "refadgen", "--product",
                             str(product), "--prompt", "x", "--steps", "500", "--quiet", "--out", str(product.parent / "x.png"),
                             *arguments], cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True)
    try:
        start = _unet(served)
        wait_until(lambda: _unet(served) > start + 5, 120, "the request running")
        at_interrupt = _unet(served)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130 and "interrupted" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ran = _settled(lambda: _unet(served))
    assert ran - at_interrupt <= 3, f"{ran - at_interrupt} U-Net executions after Ctrl-C"


def _png(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A greyscale PNG of random pixels, or a header claiming width x height over `idat` alone."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if idat is None:
        rows = np.random.default_rng(0).integers(0, 256, (height, width + 1), dtype=np.uint8)
        rows[:, 0] = 0  # filter byte: none
        idat = zlib.compress(rows.tobytes(), 1)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_memory_stays_bounded_over_oversized_requests(served):
    """Issue 14 took the server from 0.8 to 5.5 GB with these; the bound is RSS_BOUND_MIB over all."""
    pid = served.server_pid()
    budget_side = 4 * get_preset("tiny").max_side
    liar = _png(6000, 6000, zlib.compress(b"\0" * 64))  # ~100 bytes claiming 36 Mpx
    too_big = _png(2 * budget_side + 64, budget_side // 2 + 8)  # real data, more pixels than the canvas can use
    start = _family_rss_mib(pid)
    for _ in range(3):
        for product, rule in ((liar, "holds less data"), (too_big, "more pixels than this preset's canvas")):
            status, message = _infer_http(served, "refadgen", {"product": np.array([product], dtype=object),
                                                               "prompt": np.array([b"x"], dtype=object)})
            assert status == "400" and rule in message, message
        answer = _raw(served.http_url, b"POST /v2/models/refadgen/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
                      b"314572800\r\n\r\n" + b"0" * (1 << 20))
        assert _status(answer) == 413
    end = _family_rss_mib(pid)
    print(f"server + stubs RSS: {start:.0f} MiB before, {end:.0f} MiB after 9 oversized requests")
    assert end - start < RSS_BOUND_MIB, (start, end)


def test_watchdog_sends_no_request_so_counts_mean_user_traffic(served):
    models = ("refadgen", *(model_name("refadgen", c) for c in get_pipeline("refadgen").specs(get_preset("tiny"))))
    before = {m: model_stats(served.http_url, m) for m in models}
    time.sleep(3)  # three watchdog intervals with no traffic
    assert {m: model_stats(served.http_url, m) for m in models} == before


def test_a_killed_tritonserver_is_restarted_on_the_same_ports(served, product):
    """Runs last: tritonserver gets SIGKILL; `adgen serve` says why and restarts it within 10 s
    on the same (public) ports, and a retrying client gets its image."""
    expected = None
    with PipelineClient(served.grpc_url, retry=NO_RETRY) as client:
        expected = client.generate(get_pipeline("refadgen"), {"product": product, "prompt": "x", "steps": 2, "seed": 5}).image
    pid = served.server_pid()
    results = []

    def retrying():
        with PipelineClient(served.grpc_url, retry=RetryPolicy(attempts=12, base_s=0.5, cap_s=2.0)) as client:
            results.append(client.generate(get_pipeline("refadgen"), {"product": product, "prompt": "x", "steps": 2, "seed": 5}))
            results.append(dict(client.connection.retries))

    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    thread = threading.Thread(target=retrying)
    thread.start()
    thread.join(120)
    assert not thread.is_alive() and results, served.log()[-3000:]
    assert np.array_equal(results[0].image, expected)
    assert results[1].get("ServerUnavailableError", 0) >= 1, results[1]
    new_pid = wait_until(served.server_pid, 30, "a new tritonserver")
    assert new_pid != pid
    assert time.monotonic() - killed < 60
    log = served.log()
    assert "tritonserver killed by SIGKILL; restarting on the same ports" in log, log[-2000:]
    ready = float(log.split("tritonserver ready again after ")[1].split(" s")[0])
    assert ready < 10, f"restart took {ready} s"
    assert _request(served.http_url, "/v2/health/ready")[0] == 200
    assert json.loads(_request(served.http_url, "/v2/models/refadgen/stats")[1])["model_stats"]
