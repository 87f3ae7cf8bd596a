"""The benchmark harness on tiny (fast; no assertions on how fast, only on how the record's
numbers relate), the JSON lines' schema, and the report from a small hand-made fixture (torch-free)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import harness, report

STEPS, ITERATIONS = 2, 3


@pytest.fixture(scope="module")
def records(tiny_graphs, cache_root, tmp_path_factory, torch):
    """Both backends, in-process; torch also counts the FLOPs (its networks on meta tensors)."""
    out = tmp_path_factory.mktemp("bench") / "results.jsonl"
    code = harness.main([
        "--pipeline", "refadgen", "--preset", "tiny", "--backend", "onnxruntime", "--backend", "torch",
        "--steps", str(STEPS), "--iterations", str(ITERATIONS), "--warmup", "1",
        "--cache-dir", str(cache_root), "--out", str(out), "--quiet",
    ])
    assert code == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_one_record_per_scenario_with_every_field(records, tiny_specs):
    from runtime.specs.core import specs_hash

    assert [r["scenario"]["backend"] for r in records] == ["onnxruntime", "torch"]
    for r in records:
        assert set(report.REQUIRED) <= set(r)
        assert r["scenario"]["placement"] == "in-process"
        assert r["machine"]["versions"]["numpy"] == np.__version__
        assert r["spec_hash"] == specs_hash(tiny_specs)  # the specs the pipeline ran


def _summary_of(samples) -> dict:
    """The summary a record must carry for its raw samples (numpy's linear-interpolation percentiles)."""
    a = np.asarray(samples, dtype=np.float64)
    return {"p50": np.percentile(a, 50), "p90": np.percentile(a, 90), "p99": np.percentile(a, 99),
            "mean": a.mean(), "std": a.std(), "min": a.min(), "max": a.max(), "n": a.size}


def test_raw_samples_match_the_counts_and_percentiles(records):
    for r in records:
        latencies = r["samples"]["latency_s"]
        assert len(latencies) == ITERATIONS
        assert len(r["samples"]["stages_s"]["denoise_step"]) == ITERATIONS * STEPS
        assert r["latency_s"] == pytest.approx(_summary_of(latencies), rel=1e-12)
        for stage, samples in r["samples"]["stages_s"].items():
            assert r["stages_s"][stage] == pytest.approx(_summary_of(samples), rel=1e-12), stage
        lat = r["latency_s"]
        assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


def test_throughput_and_cold_time_agree_with_the_requests(records):
    for r in records:
        latencies = r["samples"]["latency_s"]
        assert r["scenario"]["concurrency"] == 1 and r["scenario"]["batch"] == 1
        assert r["images_per_s"] == pytest.approx(ITERATIONS / r["wall_s"], rel=1e-12)
        # one request at a time: the timed wall clock holds every request's latency
        assert r["wall_s"] >= sum(latencies)
        # cold: loading, then the first request, both inside it
        assert r["cold_s"] >= r["load_s"] + r["first_request_s"]


def test_flops_follow_the_call_plan(records):
    flops = records[0]["flops"]
    per_call, per_stage = flops["per_call"], flops["per_stage"]
    assert per_stage["denoise_step"] == per_call["unet"] * STEPS
    assert per_stage["reference_unet"] == per_call["reference_unet"] + per_call["afm_kv"]
    assert flops["total"] == sum(per_stage.values())
    assert records[0]["flops"] == records[1]["flops"]  # the same networks whatever the backend
    for r in records:  # MFU: achieved FLOP/s at the median latency over the device's peak
        expected = r["flops"]["total"] / r["latency_s"]["p50"] / r["device_peak_flops"]
        assert r["mfu"]["end_to_end"] == pytest.approx(expected, rel=1e-12)
        assert 0 < r["mfu"]["end_to_end"] < 1


def _record(backend: str, p50: float, concurrency: int = 1) -> dict:
    scenario = harness.Scenario(preset="tiny", backend=backend, concurrency=concurrency, steps=2, iterations=2)
    samples = [p50 * 0.9, p50 * 1.1]
    return {
        "schema": harness.SCHEMA_VERSION, "benchmark": "harness", "label": scenario.label,
        "scenario": harness.asdict(scenario), "latency_s": harness.percentiles(samples) | {"p50": p50},
        "stages_s": {"denoise_step": harness.percentiles([p50 / 4] * 4), "vae_decode": harness.percentiles([0.01, 0.01])},
        "images_per_s": 1 / p50, "cold_s": 1.0, "peak_host_rss_mb": 100.0, "spec_hash": "0" * 16,
        "samples": {"latency_s": samples, "stages_s": {}}, "git_commit": "abc",
        "machine": {"device": "cpu", "platform": "test", "python": "3.11", "versions": {"numpy": "1.26"}},
    }


def test_report_states_speedup_over_the_torch_baseline(tmp_path):
    results = tmp_path / "r.jsonl"
    rows = [_record("onnxruntime", 0.5), _record("torch", 1.0), _record("onnxruntime", 0.8, 2), _record("torch", 2.0, 2)]
    results.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert report.main([str(results), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    onnx_c1 = next(line for line in md.splitlines() if line.startswith("| refadgen/tiny/onnxruntime/in-process/b1/c1 |"))
    onnx_c2 = next(line for line in md.splitlines() if line.startswith("| refadgen/tiny/onnxruntime/in-process/b1/c2 |"))
    assert onnx_c1.rstrip(" |").endswith("2.00x") and onnx_c2.rstrip(" |").endswith("2.50x")
    for name in ("stages.png", "concurrency.png", "backends.png"):
        png = (tmp_path / "rep" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_report_refuses_records_it_cannot_read(tmp_path, capsys):
    bad = _record("torch", 1.0)
    del bad["latency_s"]
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps(bad) + "\n")
    assert report.main([str(results), "--out", str(tmp_path / "rep")]) == 2
    assert "missing fields ['latency_s']" in capsys.readouterr().err


@pytest.mark.triton
def test_served_placements_run_against_the_real_server(tiny_graphs, cache_root, tmp_path):
    pytest.importorskip("tritonclient")
    out = tmp_path / "served.jsonl"
    regions_before = set(harness.Path("/dev/shm").glob("adgen_*"))
    code = harness.main([
        "--pipeline", "refadgen", "--preset", "tiny", "--backend", "onnxruntime",
        "--placement", "client-loop", "--placement", "in-server",
        "--steps", str(STEPS), "--iterations", "2", "--warmup", "1",
        "--cache-dir", str(cache_root), "--out", str(out), "--quiet",
    ])
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["scenario"]["placement"] for r in records] == ["client-loop", "in-server"]
    for r in records:
        assert len(r["samples"]["stages_s"]["denoise_step"]) == 2 * STEPS  # the server's own stage timings
        assert r["peak_server_rss_mb"] > 0 and r["scenario"]["server_url"]
    leftover = set(harness.Path("/dev/shm").glob("adgen_*")) - regions_before
    # the server stopped and its shared-memory regions went with it; regions of processes still
    # running (another test run on the same machine) are theirs, not leaks of this one
    assert not {r for r in leftover if not _owner_alive(r)}


def _owner_alive(region) -> bool:
    """Whether the process named in a region (adgen_client_<pid>_<n> of a client, adgen_<pid>_...
    of a server) is still running."""
    import os

    from runtime.serving.names import CLIENT_REGION_PREFIX, SERVER_REGION_PREFIX

    name = region.name
    rest = name[len(CLIENT_REGION_PREFIX):] if name.startswith(CLIENT_REGION_PREFIX) else name[len(SERVER_REGION_PREFIX):]
    pid = rest.split("_")[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
