"""Against the real tritonserver (the one bundled in nvidia-pytriton), tiny preset, loopback,
free ports; every server a test starts is stopped, also when the test fails.

Tolerance of the three placements: none. In-process, client-side and in-server runs use the same
exported graphs on the same ONNX Runtime CPU kernels with the same batch per call and the same
numpy orchestrator, so the images are bit-identical; any difference is a bug in transport.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")

import fixtures  # noqa: E402
from triton_checks import delta, model_stats, wait_until  # noqa: E402

from benchmarks.served import serve  # noqa: E402
from runtime.api import load_pipeline  # noqa: E402
from runtime.inputs.images import load_product  # noqa: E402
from runtime.pipelines import get_pipeline  # noqa: E402
from runtime.pipelines.refadgen import RefAdGenRequest  # noqa: E402
from runtime.serving.names import ADMIN_KEY_ENV, HOST_FILE, HostKey  # noqa: E402
from runtime.serving.remote import PipelineClient  # noqa: E402
from runtime.serving.repository import RepositoryOptions  # noqa: E402
from runtime.serving.serve import start_server  # noqa: E402
from runtime.serving.server import SHM_DIR, remove_stale_workdirs  # noqa: E402

pytestmark = pytest.mark.triton

STEPS = 3
CONCURRENT = 3
# Wide enough that concurrent requests' steps meet in the queue however loaded the CI machine is:
# the tests check that steps CAN share an execution, not how often they do at the 1 ms default.
STEP_QUEUE_DELAY_US = 50_000


@pytest.fixture(scope="module")
def server(tiny_graphs, cache_root):
    options = RepositoryOptions(pipeline_instances=CONCURRENT, step_queue_delay_us=STEP_QUEUE_DELAY_US)
    started = start_server(["refadgen"], "tiny", cache_dir=cache_root, options=options, timeout_s=300)
    try:
        yield started
    finally:
        code = started.stop()
    # 0 only if every client closed its connections: an idle HTTP keep-alive makes 2.51 wait out
    # --exit-timeout-secs and exit 1.
    assert code == 0, f"tritonserver exit code {code}"
    assert not started.leftover_regions()


product = fixtures.served_product()


@pytest.fixture(scope="module")
def client_side(server):
    # the server's random admin key lets the client-side loop register its shared memory
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ADMIN_KEY_ENV, server.admin_key)
        loaded = load_pipeline("refadgen", preset="tiny", backend="triton", server_url=server.grpc_url)
    try:
        yield loaded
    finally:
        loaded.close()


def _generate_in_server(url, product, prompt="a sneaker on a wooden table", seed=0):
    with PipelineClient(url) as client:
        return client.generate(get_pipeline("refadgen"), {"product": product, "prompt": prompt, "seed": seed, "steps": STEPS})


def test_three_loop_placements_give_the_same_image(server, client_side, ort_pipeline, product):
    from runtime.api import generate

    options = dict(product=product, prompt="a sneaker on a wooden table", steps=STEPS, seed=4)
    in_process = generate(ort_pipeline, **options).image
    client_grpc = generate(client_side, **options).image
    http = load_pipeline("refadgen", preset="tiny", backend="triton", server_url=f"http://{server.http_url}")
    try:
        client_http = generate(http, **options).image
    finally:
        http.close()
    in_server = _generate_in_server(server.grpc_url, product, seed=4)
    in_server_http = _generate_in_server(f"http://{server.http_url}", product, seed=4)
    for name, image in [("client gRPC", client_grpc), ("client HTTP", client_http),
                        ("in-server", in_server.image), ("in-server HTTP", in_server_http.image)]:
        assert np.array_equal(image, in_process), name
    report = in_server.report
    assert report["backend"] == "triton-bls" and len(report["timings_s"]["denoise_step"]["samples"]) == STEPS
    # the server's Python models import the runtime this test imports, not another checkout; the
    # folder is in the models' host.json, never in what the server answers
    root = str(Path(__file__).resolve().parents[1])
    assert json.loads((server.repository / "refadgen" / HOST_FILE).read_text())[HostKey.ROOT.value] == root
    assert report["server"]["model"] == "refadgen" and set(report["server"]) == {"model", "instance", "inputs_sent"}
    assert root not in json.dumps(report) and "machine" not in report
    assert report["product"]["path"] == "request:product"


@pytest.mark.parametrize("where", ["--server", "--url"])
def test_cli_generates_through_the_server(server, ort_pipeline, product, tmp_path, where):
    from PIL import Image

    from runtime.api import generate
    from runtime.cli import main

    out = tmp_path / "ad.png"
    placement = ["--server", server.grpc_url] if where == "--server" else ["--backend", "triton", "--url", f"http://{server.http_url}"]
    code = main(["generate", "--pipeline", "refadgen", "--preset", "tiny", "--product", str(product), "--prompt", "studio",
                 "--steps", str(STEPS), "--seed", "5", "--quiet", "--out", str(out), *placement])
    assert code == 0
    expected = generate(ort_pipeline, product=product, prompt="studio", steps=STEPS, seed=5).image
    assert np.array_equal(np.asarray(Image.open(out)), expected)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["backend"] == ("triton-bls" if where == "--server" else "triton")


def test_cli_refuses_a_url_without_the_triton_backend(product, tmp_path, capsys):
    from runtime.cli import main

    code = main(["generate", "--product", str(product), "--prompt", "x", "--out", str(tmp_path / "a.png"), "--url", "127.0.0.1:1"])
    assert code == 2 and "url: --backend triton needs --url" in capsys.readouterr().err


def _unet_stats(server):
    stats = model_stats(server.http_url, "refadgen_unet")
    return {"requests": stats["success"], "inferences": stats["inferences"], "executions": stats["executions"]}


def test_steps_of_concurrent_in_server_requests_share_unet_executions(server, product):
    prompts = [("studio", 1), ("beach", 2), ("forest", 3)][:CONCURRENT]
    alone = [_generate_in_server(server.grpc_url, product, p, s).image for p, s in prompts]
    before = _unet_stats(server)
    with ThreadPoolExecutor(CONCURRENT) as pool:
        together = list(pool.map(lambda ps: _generate_in_server(server.grpc_url, product, *ps).image, prompts))
    d = delta(_unet_stats(server), before)
    assert d["requests"] == CONCURRENT * STEPS and d["inferences"] == 2 * d["requests"]  # batch 2: guidance
    assert d["executions"] < d["requests"], d  # some executions ran steps of several requests
    for a, b in zip(alone, together):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_client_side_loops_batch_in_the_server_too(server, client_side, product, protocol):
    requests = [RefAdGenRequest(load_product(product), p, seed=s) for p, s in [("studio", 1), ("beach", 2), ("forest", 3)]]
    loaded = client_side if protocol == "grpc" else load_pipeline(
        "refadgen", preset="tiny", backend="triton", server_url=f"http://{server.http_url}"
    )
    try:
        runner = loaded.runner
        alone = [runner([r], steps=STEPS).generated[0] for r in requests]
        before = _unet_stats(server)
        # After each step the loops wait for one another, so their next U-Net calls reach the queue
        # together: what is checked is that they CAN share an execution, not the threads' timing on CI.
        aligned = threading.Barrier(len(requests), timeout=120)
        with ThreadPoolExecutor(len(requests)) as pool:  # HTTP: one client and one set of regions per thread
            together = list(pool.map(
                lambda r: runner([r], steps=STEPS, on_step=lambda i, n: aligned.wait()).generated[0], requests
            ))
        d = delta(_unet_stats(server), before)
    finally:
        if loaded is not client_side:
            loaded.close()
    assert d["requests"] == len(requests) * STEPS
    assert d["executions"] < d["requests"], d
    for a, b in zip(alone, together):
        assert np.array_equal(a, b)


def _post(server, model, body):
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{model}/infer", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _json_inputs(feed, spec, overrides=None):
    from runtime.serving.protocol import to_wire

    datatypes = {"float32": "FP32", "float64": "FP64", "int64": "INT64"}
    feed = {**to_wire(spec, feed), **(overrides or {})}
    return {"inputs": [
        {"name": n, "datatype": datatypes[str(a.dtype)], "shape": list(a.shape), "data": a.ravel().tolist()}
        for n, a in feed.items()
    ]}


def test_malformed_requests_get_400_naming_the_tensor(server, tiny_specs, product):
    unet = tiny_specs["unet"]
    rng = np.random.default_rng(0)
    good = unet.sample_inputs(rng, unet.env_at("min"))
    code, body = _post(server, "refadgen_unet", _json_inputs(good, unet))
    assert code == 200 and {o["name"] for o in body["outputs"]} == {"noise_pred"}

    too_small = unet.sample_inputs(rng, unet.env_at("min", latent_h=4))
    code, body = _post(server, "refadgen_unet", _json_inputs(too_small, unet))
    assert code == 400 and "unet.sample" in body["error"] and "latent_h in [8, 64]" in body["error"], body

    nan = dict(good, sample=np.full_like(good["sample"], np.nan))
    code, body = _post(server, "refadgen_unet", _json_inputs(nan, unet))
    assert code == 400 and "unet.sample: expected finite values" in body["error"], body

    code, body = _post(server, "refadgen_unet", _json_inputs(good, unet, {"sample": good["sample"].astype(np.float64)}))
    assert code == 400 and "sample" in body["error"], body

    def pipeline_request(**values):
        inputs = []
        for name, value in values.items():
            if isinstance(value, str):
                inputs.append({"name": name, "datatype": "BYTES", "shape": [1], "data": [value]})
            else:
                inputs.append({"name": name, "datatype": "INT64", "shape": [1], "data": [value]})
        return {"inputs": inputs}

    code, body = _post(server, "refadgen", pipeline_request(product="not an image", prompt="x"))
    assert code == 400 and body["error"].startswith("product: is not a recognized image file"), body
    code, body = _post(server, "refadgen", pipeline_request(product="not an image"))
    assert code == 400 and "prompt" in body["error"], body
    with PipelineClient(server.grpc_url) as client:
        from runtime.errors import BackendError

        with pytest.raises(BackendError, match=r"steps: expected an integer in \[1, 500\].*INVALID_ARGUMENT"):
            client.generate(get_pipeline("refadgen"), {"product": product, "prompt": "x", "steps": 0})

    code, body = _post(server, "no_such_model", {"inputs": []})
    assert code == 404, body


def _regions(prefix):
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _wait_gone(pids, timeout_s=30):
    """The pids still alive after waiting up to `timeout_s` for all of them to exit."""
    try:
        wait_until(lambda: not any(_alive(p) for p in pids), timeout_s, f"processes {pids} gone", interval_s=0.2)
    except AssertionError:
        pass
    return [p for p in pids if _alive(p)]


KEY = "test-key-of-the-operator"


def _serve(cache_root):
    """`adgen serve` with the operator's admin key (the client-side loop sends it to register its
    shared memory); (process, printed lines)."""
    served = serve(cache_root, extra=("--instances", "1"), env={ADMIN_KEY_ENV: KEY})
    return served.proc, served.lines


def _stubs_of(server_pid):
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text().split()
            except OSError:
                continue
            if int(stat[3]) == server_pid:
                found.append(int(proc.name))
    return found


def test_serve_stops_cleanly_and_dies_with_its_parent(tiny_graphs, cache_root, product):
    proc, lines = _serve(cache_root)
    try:
        assert lines and lines[-1].startswith("Ctrl-C"), "".join(lines) + (proc.stderr.read() if proc.poll() is not None else "")
        server_pid = int(lines[0].split("pid")[1])
        grpc_url = next(line.split()[1] for line in lines if line.strip().startswith("gRPC"))
        stubs = _stubs_of(server_pid)
        assert stubs, "no Python backend stubs under the server"
        arguments = Path(f"/proc/{server_pid}/cmdline").read_bytes().decode().split("\0")
        prefix = next(a.split("shm-region-prefix-name=")[1] for a in arguments if "shm-region-prefix-name=" in a)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(ADMIN_KEY_ENV, KEY)
            client = load_pipeline("refadgen", preset="tiny", backend="triton", server_url=grpc_url)
        from runtime.api import generate

        generate(client, product=product, prompt="studio", steps=1)
        connection = client.components["unet"].connection
        client_regions = connection.region_names()
        assert client_regions and set(client_regions) <= {p.name for p in SHM_DIR.iterdir()}, "large tensors go through shm"
        client.close()
        assert not set(client_regions) & {p.name for p in SHM_DIR.iterdir()}
        assert _regions(prefix)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, proc.stderr.read()
        assert not _wait_gone([server_pid, *stubs]), "server or stubs outlived `adgen serve`"
        assert not _regions(prefix)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    proc, lines = _serve(cache_root)
    try:
        assert lines and lines[-1].startswith("Ctrl-C")
        server_pid = int(lines[0].split("pid")[1])
        stubs = _stubs_of(server_pid)
        arguments = Path(f"/proc/{server_pid}/cmdline").read_bytes().decode().split("\0")
        prefix = next(a.split("shm-region-prefix-name=")[1] for a in arguments if "shm-region-prefix-name=" in a)
        assert _regions(prefix)
        repository = Path(next(a.split("=", 1)[1] for a in arguments if a.startswith("--model-repository=")))
        proc.kill()  # SIGKILL: no chance to stop the server itself
        proc.wait()
        assert not _wait_gone([server_pid, *stubs]), "server outlived its killed parent"
        assert not _regions(prefix), "the server, stopped by SIGTERM from the kernel, left regions behind"
        assert repository.parent in remove_stale_workdirs(repository.parent.parent)  # what the next start sweeps
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("model, batch, calls", [("refadgen_unet", 2, 20), ("refadgen", None, 2)])
def test_perf_analyzer_sends_perf_inputs_data_the_server_accepts(server, tmp_path, model, batch, calls):
    """The real perf_analyzer binary (`.ci/run` installs it; ADGEN_REQUIRE_PERF_ANALYZER=1: fail, not
    skip, without it) sends `adgen perf-inputs` data; every call it makes is answered, none fails."""
    from benchmarks.perf_analyzer import find_perf_analyzer, run_perf_analyzer
    from runtime.presets import get_preset
    from runtime.serving.perf_inputs import write_perf_input_data

    binary = find_perf_analyzer()
    if binary is None:
        if os.environ.get("ADGEN_REQUIRE_PERF_ANALYZER") == "1":
            pytest.fail("perf_analyzer not installed: python -m benchmarks.perf_analyzer install .tools/perf_analyzer")
        pytest.skip("perf_analyzer not installed (python -m benchmarks.perf_analyzer install .tools/perf_analyzer)")
    data = write_perf_input_data(model, get_preset("tiny"), tmp_path / "data.json", steps=STEPS if batch is None else None)
    before = model_stats(server.http_url, model)
    figures = run_perf_analyzer(binary, model, server.grpc_url, data, concurrency=1, batch=batch, requests=calls)
    d = delta(model_stats(server.http_url, model), before)
    assert d["fail"] == 0 and d["success"] >= calls, d
    if batch:
        assert d["inferences"] == batch * d["success"], d  # -b rows reached the model as one batch
    assert 0 < figures["p50_ms"] <= figures["p99_ms"], figures


def _unet_feed(spec, seed=0):
    from runtime.serving.protocol import to_wire

    env = spec.env_at("opt", B=2)
    return to_wire(spec, spec.sample_inputs(np.random.default_rng(seed), env))


def test_in_server_steps_carry_the_invariants_once_per_request(server, product):
    """The pipeline model's report says what its component calls carried: the U-Net got the text
    embeddings and the AFM keys and values with the first step only."""
    from runtime.presets import get_preset

    report = _generate_in_server(server.grpc_url, product, seed=8).report
    sent = report["server"]["inputs_sent"]["unet"]
    spec = get_pipeline("refadgen").specs(get_preset("tiny"))["unet"]
    feed = _unet_feed(spec)
    per_step = sum(a.nbytes for n, a in feed.items() if n in ("sample", "timestep"))
    assert {t.name for t in spec.inputs if not t.invariant} == {"sample", "timestep"}
    assert sent["calls"] == STEPS and sent["without_invariants"] == STEPS - 1
    assert sent["input_bytes"] == sum(a.nbytes for a in feed.values()) + (STEPS - 1) * per_step
    assert all(counts["without_invariants"] == 0 for name, counts in report["server"]["inputs_sent"].items() if name != "unet")


def test_component_model_keeps_a_requests_invariants_checks_what_crosses_and_forgets_unknown_keys(server):
    """Straight to the U-Net model with tritonclient: a key-only call after a full one gives the
    full call's answer, a NaN in what crosses is refused, an unknown key is answered so the caller
    sends everything again, and the call marked last ends the key."""
    import secrets

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    from runtime.presets import get_preset
    from runtime.serving.resident import CONTEXT_PARAMETER, END_PARAMETER, UNKNOWN_CONTEXT

    spec = get_pipeline("refadgen").specs(get_preset("tiny"))["unet"]
    feed = _unet_feed(spec, seed=3)

    def infer(client, names, parameters, change=None):
        inputs = []
        for name in names:
            array = feed[name] if change is None or name not in change else change[name]
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            inputs.append(tensor)
        return client.infer("refadgen_unet", inputs, parameters=parameters).as_numpy("noise_pred")

    key, short = secrets.token_hex(16), ["sample", "timestep"]
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        full = infer(client, list(feed), {CONTEXT_PARAMETER: key})
        assert np.array_equal(infer(client, short, {CONTEXT_PARAMETER: key}), full)
        nan = feed["sample"].copy()
        nan.flat[0] = np.nan
        with pytest.raises(InferenceServerException, match="sample"):
            infer(client, short, {CONTEXT_PARAMETER: key}, change={"sample": nan})
        assert np.array_equal(infer(client, short, {CONTEXT_PARAMETER: key, END_PARAMETER: True}), full)
        for parameters in ({CONTEXT_PARAMETER: key}, {CONTEXT_PARAMETER: secrets.token_hex(16)}, {}):
            with pytest.raises(InferenceServerException) as refused:
                infer(client, short, parameters)
            assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert (UNKNOWN_CONTEXT in refused.value.message()) == bool(parameters), refused.value.message()


def test_client_side_caller_sends_everything_again_when_the_server_lost_the_key(client_side):
    from runtime.backends.base import request_scope

    unet = client_side.runner.components["unet"]
    feed = unet.spec.sample_inputs(np.random.default_rng(5), unet.spec.env_at("opt", B=2))
    expected = unet.run(feed)["noise_pred"]  # outside a scope: everything, no key
    before = unet.resident.counts()
    with request_scope() as scope:
        scope.holders.add(unet.resident.model)  # as if sent before, then evicted on the server
        got = unet.run(feed)["noise_pred"]
        again = unet.run(feed)["noise_pred"]
    counts = {k: v - before[k] for k, v in unet.resident.counts().items()}
    assert np.array_equal(got, expected) and np.array_equal(again, expected)
    assert counts["calls"] == 2 and counts["without_invariants"] == 1  # the refused short call is not counted


def test_a_caller_meeting_a_model_that_keeps_nothing_sends_full_feeds(tiny_graphs, cache_root):
    """A model whose config keeps no invariants (a native config, or `--no-resident`) refuses a short
    call for its missing required inputs: the caller sends the full feed and stops shortening."""
    from runtime.backends.base import request_scope
    from runtime.presets import get_preset
    from runtime.serving.client import TritonComponent, TritonConnection

    started = start_server(["refadgen"], "tiny", cache_dir=cache_root, options=RepositoryOptions(resident=None),
                           timeout_s=300)
    try:
        spec = get_pipeline("refadgen").specs(get_preset("tiny"))["unet"]
        unet = TritonComponent(spec, TritonConnection(started.grpc_url), "refadgen_unet", resident=True)
        feed = spec.sample_inputs(np.random.default_rng(2), spec.env_at("opt", B=2))
        try:
            expected = unet.run(feed)["noise_pred"]
            with request_scope():
                got = [unet.run(feed)["noise_pred"] for _ in range(3)]
        finally:
            unet.close()
    finally:
        assert started.stop() == 0
    assert all(np.array_equal(g, expected) for g in got)
    assert not unet.resident.enabled and unet.resident.counts()["without_invariants"] == 0
