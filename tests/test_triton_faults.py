"""Overload, faults and locked-down control against the real tritonserver (tiny preset, loopback).

One server for the module, started with an admin key (restricted endpoints), 2 pipeline instances
and a pipeline queue of 2, so a burst of 8 overflows it. Every server is stopped, also on failure.
Time bounds are generous upper bounds for "at once" / "recovers by itself", not performance targets.
A state a test relies on ("both requests are running", "the model is unloaded") is observed (the
server's statistics, its model index), never waited for with a sleep; a retry a test claims is
counted by the client (`TritonConnection.retries`).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")

import fixtures  # noqa: E402
from triton_checks import delta, model_stats, wait_until  # noqa: E402

from runtime.errors import (  # noqa: E402
    ServerBusyError,
    ServerError,
    ServerUnavailableError,
)
from runtime.pipelines import get_pipeline  # noqa: E402
from runtime.presets import get_preset  # noqa: E402
from runtime.serving.client import NO_RETRY, RetryPolicy  # noqa: E402
from runtime.serving.names import ADMIN_HEADER, ADMIN_KEY_ENV  # noqa: E402
from runtime.serving.protocol import model_name  # noqa: E402
from runtime.serving.remote import PipelineClient  # noqa: E402
from runtime.serving.repository import RepositoryOptions  # noqa: E402
from runtime.serving.serve import start_server, write_runtime_repository  # noqa: E402
from runtime.serving.server import TritonServer  # noqa: E402
from runtime.serving.watchdog import ModelWatchdog  # noqa: E402

pytestmark = pytest.mark.triton

KEY = "test-admin-key-7f3a"
INSTANCES = 2
QUEUE = 2
KILLED: list[int] = []  # stub processes this module killed
LONG_STEPS = 40  # a request that keeps an instance busy for a while on tiny


@pytest.fixture(scope="module")
def server(tiny_graphs, cache_root):
    started = start_server(
        ["refadgen"], "tiny", cache_dir=cache_root, timeout_s=300, admin_key=KEY,
        options=RepositoryOptions(pipeline_instances=INSTANCES, pipeline_queue_size=QUEUE),
    )
    started._remove_workdir = False  # keep the log until the exit code is checked
    try:
        yield started
    finally:
        code = started.stop()
        log = started.log_tail(15)
        shutil.rmtree(started.workdir, ignore_errors=True)
    if KILLED:
        # 2.51 keeps a version whose stub died after serving a request UNLOADING until exit, so
        # shutdown waits out --exit-timeout-secs and exits 1 (see runtime.serving.watchdog)
        assert code == 1 and "live models" in log and "Exit timeout expired" in log, f"exit {code}:\n{log}"
    else:
        assert code == 0, f"tritonserver exit code {code}:\n{log}"
    assert not started.leftover_regions()


product = fixtures.served_product()


def _request(product, seed=0, steps=2):
    return {"product": product, "prompt": "a sneaker on a table", "seed": seed, "steps": steps}


def _generate(url, product, retry=NO_RETRY, **kwargs):
    with PipelineClient(url, retry=retry) as client:
        return client.generate(get_pipeline("refadgen"), _request(product, **kwargs))


def _http(server, path, data=None, headers=None):
    request = urllib.request.Request(
        f"http://{server.http_url}{path}", data=data, headers=headers or {}, method="POST" if data is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_restricted_endpoints_refuse_without_the_key(server, product, monkeypatch):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    for path in ("/v2/repository/index", "/v2/repository/models/refadgen_unet/unload", "/v2/systemsharedmemory/status",
                 "/v2/logging", "/v2/trace/setting"):
        code, body = _http(server, path, b"{}")
        assert code == 403 and ADMIN_HEADER in body, (path, code, body)
    code, _ = _http(server, "/v2/repository/index", b"{}", {ADMIN_HEADER: "wrong"})
    assert code == 403
    code, _ = _http(server, "/v2/repository/index", b"{}", {ADMIN_HEADER: KEY})
    assert code == 200
    code, _ = _http(server, "/v2/models/refadgen/stats")  # statistics and inference stay open
    assert code == 200
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("refadgen_unet")
        assert client.is_model_ready("refadgen_unet")
    finally:
        client.close()

    from runtime.api import generate, load_pipeline

    # the client-side loop registers shared memory: refused without the key (the tensors then go in
    # the requests), used with it
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    loaded = load_pipeline("refadgen", preset="tiny", backend="triton", server_url=server.grpc_url)
    try:
        inline = generate(loaded, **_request(product)).image
        connection = loaded.components["unet"].connection
        assert connection.shm_refused and not connection.region_names()
    finally:
        loaded.close()
    monkeypatch.setenv(ADMIN_KEY_ENV, KEY)
    loaded = load_pipeline("refadgen", preset="tiny", backend="triton", server_url=server.grpc_url)
    try:
        image = generate(loaded, **_request(product)).image
        assert loaded.components["unet"].connection.region_names(), "large tensors went through shared memory"
    finally:
        loaded.close()
    assert image.shape == (160, 128, 3) and np.array_equal(image, inline)
    assert KEY not in server.log_path.read_text(), "the key must not appear in the server log"


def test_a_server_started_without_a_key_is_locked_with_a_random_one(tmp_path):
    """No key given: the restricted endpoints still refuse (a random key, known to its owner)."""
    first, second = TritonServer(tmp_path, workdir=tmp_path / "a"), TritonServer(tmp_path, workdir=tmp_path / "b")
    assert first.admin_key and second.admin_key and first.admin_key != second.admin_key
    assert len(first.admin_key) >= 32
    assert any(a.startswith("--http-restricted-api=model-repository,shared-memory,logging,trace:") for a in first.command())


def _all_stats(server):
    components = get_pipeline("refadgen").specs(get_preset("tiny"))
    return {m: model_stats(server.http_url, m) for m in ("refadgen", *(model_name("refadgen", c) for c in components))}


def test_killed_stub_is_detected_and_reloaded_without_a_request(server, product):
    watchdog = ModelWatchdog(server)
    before_stats = _all_stats(server)
    assert watchdog.step() == [] and watchdog.step() == [], "a healthy server needs no recovery"
    assert _all_stats(server) == before_stats, "the watchdog sent requests: statistics must count user traffic only"
    before = _generate(server.grpc_url, product, seed=3).image
    (pid,) = server.stub_pids("refadgen_unet")
    os.kill(pid, signal.SIGKILL)
    KILLED.append(pid)
    wait_until(lambda: pid not in server.stub_pids(), 30, "the killed stub gone")
    with pytest.raises(ServerUnavailableError, match="not healthy"):
        _generate(server.grpc_url, product, seed=3)
    started = time.monotonic()
    recovered = watchdog.step()
    assert [r.model for r in recovered] == ["refadgen_unet"] and recovered[0].ok, recovered
    assert f"stub process {pid} exited" in recovered[0].reason
    assert time.monotonic() - started < 120
    assert server.stub_pids("refadgen_unet") and pid not in server.stub_pids("refadgen_unet")
    assert np.array_equal(_generate(server.grpc_url, product, seed=3).image, before)
    assert watchdog.step() == []


def test_old_stubs_of_a_reloaded_model_are_ended_once_idle(server, product):
    """A pipeline instance's stub dies: the model is reloaded beside the old version (which 2.51
    never unloads), and the old version's surviving stub is ended once idle, not kept until exit."""
    watchdog = ModelWatchdog(server, idle_s=1.0)
    assert watchdog.step() == []
    first, survivor = server.stub_pids("refadgen")
    os.kill(first, signal.SIGKILL)
    KILLED.append(first)
    wait_until(lambda: first not in server.stub_pids(), 30, "the killed stub gone")
    recovered = watchdog.step()
    assert [r.model for r in recovered] == ["refadgen"] and recovered[0].ok, recovered
    assert watchdog.retiring == [survivor]
    wait_until(lambda: (watchdog.step(), survivor in watchdog.ended)[1], 60, "the old version's stub ended")
    assert survivor not in server.stub_pids() and len(server.stub_pids("refadgen")) == INSTANCES
    assert _generate(server.grpc_url, product, seed=4).image.shape == (160, 128, 3)


def test_a_model_whose_shared_memory_grew_is_reloaded_and_shrinks(server, product, tmp_path):
    """A stub's region grows to the largest tensor it carried and never shrinks: past the bound the
    model is reloaded, its old stubs exit with their regions, and it serves on at the default size."""
    from runtime.serving.server import SHM_DIR

    def regions_mib(model):
        stubs = [s for s in server.stubs() if s.model == model]
        return sorted((SHM_DIR / s.region).stat().st_blocks * 512 / 2**20 for s in stubs)

    watchdog = ModelWatchdog(server, shm_limit_bytes=16 << 20, idle_s=1.0)
    assert watchdog.step() == []
    big = tmp_path / "big.png"
    big.write_bytes(product.read_bytes() + b"\0" * (24 << 20))  # PNG readers stop at IEND
    assert _generate(server.grpc_url, big).image.shape == (160, 128, 3)
    assert max(regions_mib("refadgen")) > 24
    recovered = watchdog.step()
    assert [r.model for r in recovered] == ["refadgen"] and "shared memory grew" in recovered[0].reason, recovered
    # every old stub ends once idle, each at its own pace: wait until all of them (not only the one
    # whose region grew) are gone
    def settled() -> bool:
        watchdog.step()
        regions = regions_mib("refadgen")
        return max(regions) <= 16 and len(regions) == INSTANCES

    wait_until(settled, 60, "the old stubs and regions gone")
    assert len(regions_mib("refadgen")) == INSTANCES and max(regions_mib("refadgen")) <= 16
    assert _generate(server.grpc_url, product).image.shape == (160, 128, 3)


def test_client_retries_through_a_stub_crash(server, product):
    """A retrying client sees no error when the watchdog repairs the model between its attempts:
    the watchdog starts only once the client's first attempt has failed, so a retry must happen."""
    expected = _generate(server.grpc_url, product, seed=9).image
    watchdog = ModelWatchdog(server)
    watchdog.step()
    (pid,) = server.stub_pids("refadgen_vae_decoder")
    os.kill(pid, signal.SIGKILL)
    KILLED.append(pid)
    failed = threading.Event()
    stop = threading.Event()

    def watch():
        if not failed.wait(120):
            return
        for _ in range(240):  # bounded: the client gives up long before
            if stop.is_set():
                return
            watchdog.step()
            stop.wait(0.5)

    thread = threading.Thread(target=watch)
    thread.start()
    retry = RetryPolicy(attempts=8, base_s=0.5, cap_s=4.0)
    try:
        with PipelineClient(server.grpc_url, retry=retry, on_retry=lambda *_: failed.set()) as client:
            result = client.generate(get_pipeline("refadgen"), _request(product, seed=9))
            retries = dict(client.connection.retries)
    finally:
        failed.set()
        stop.set()
        thread.join(60)
    assert retries.get("ServerUnavailableError", 0) >= 1 and set(retries) == {"ServerUnavailableError"}, retries
    assert np.array_equal(result.image, expected), "the retried request gave another image"
    assert [r.model for r in watchdog.recoveries] == ["refadgen_vae_decoder"]


def test_unload_during_traffic_finishes_in_flight_and_refuses_new(server, product):
    import tritonclient.http as httpclient

    # afm_kv runs once per request, just before its denoising loop: +INSTANCES there and none of
    # the pipeline's requests answered means both requests are inside their loops
    once_per_request = "refadgen_afm_kv"
    assert get_pipeline("refadgen").call_plan(1, LONG_STEPS)["afm_kv"].calls == 1
    started, answered = model_stats(server.http_url, once_per_request), model_stats(server.http_url, "refadgen")
    with ThreadPoolExecutor(INSTANCES) as pool:
        in_flight = [pool.submit(_generate, server.grpc_url, product, seed=s, steps=LONG_STEPS) for s in range(INSTANCES)]
        wait_until(lambda: delta(model_stats(server.http_url, once_per_request), started)["success"] >= INSTANCES,
                   120, f"{INSTANCES} requests reaching their denoising loops")
        assert delta(model_stats(server.http_url, "refadgen"), answered)["success"] == 0, "a request finished already"
        admin = httpclient.InferenceServerClient(server.http_url)
        try:
            admin.unload_model("refadgen", headers=server.admin_headers)
            wait_until(lambda: not admin.is_model_ready("refadgen"), 120, "refadgen unloaded")
            images = [f.result(timeout=300).image for f in in_flight]
            with pytest.raises(ServerUnavailableError, match="'refadgen' has no available versions") as refused:
                _generate(server.grpc_url, product, seed=1)
            assert ModelWatchdog(server).step() == [], "an operator's unload stays"
            admin.load_model("refadgen", headers=server.admin_headers)
        finally:
            admin.close()
    assert all(image.shape == (160, 128, 3) for image in images)
    assert _generate(server.grpc_url, product, seed=1).image.shape == (160, 128, 3)
    print(f"unloaded model refused a new request with: {refused.value}")


def test_client_reconnects_after_a_server_restart(tiny_graphs, cache_root, product, tmp_path):
    """A request sent while the server is down is retried until the restarted server (same ports)
    answers it: the first request is served by the first server, the second is sent only once the
    first server has stopped, and the rest by the second server."""
    repository = write_runtime_repository(tmp_path / "repository", ["refadgen"], "tiny", cache_dir=cache_root,
                                          options=RepositoryOptions(pipeline_instances=1))
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first = TritonServer(repository, workdir=tmp_path / "first").start(300)
    ports = first.ports
    second = None
    results, errors = [], []
    stopped = threading.Event()
    # enough attempts to outlast a restart on a loaded 2-core machine (sum of pauses >= 60 s)
    client = PipelineClient(first.grpc_url, retry=RetryPolicy(attempts=20, base_s=0.5, cap_s=8.0))

    def traffic():
        try:
            for seed in range(4):
                if seed == 1 and not stopped.wait(120):
                    return
                results.append(client.generate(get_pipeline("refadgen"), _request(product, seed=seed)).image)
        except ServerError as e:
            errors.append(e)

    thread = threading.Thread(target=traffic)
    try:
        thread.start()
        wait_until(lambda: results or not thread.is_alive(), 120, "the first request answered")
        assert first.stop() is not None
        stopped.set()
        wait_until(lambda: sum(client.connection.retries.values()) or not thread.is_alive(), 60,
                   "a request retried against the stopped server")
        second = TritonServer(repository, ports=ports, workdir=tmp_path / "second").start(300)
        thread.join(300)
        assert not thread.is_alive(), "traffic did not finish"
    finally:
        stopped.set()
        thread.join(300)
        client.close()
        first.stop()
        if second is not None:
            assert second.stop() == 0
    assert not errors, errors
    assert len(results) == 4
    assert client.connection.retries["ServerUnavailableError"] >= 1, dict(client.connection.retries)
