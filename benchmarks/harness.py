"""One benchmark harness for every pipeline, backend and placement.

    adgen bench --pipeline refadgen --preset small --backend onnxruntime --backend torch --iterations 20 --out results.jsonl
    python -m benchmarks.report results.jsonl --out report/

A scenario is pipeline x preset x backend x placement x batch x concurrency. Placements:
`in-process` (the loop and the networks in the scenario's process), `client-loop` (the loop in
the scenario's process, every component call a Triton request), `in-server` (each request sent
whole to the pipeline's BLS model); the served placements run against one real tritonserver per
pipeline and preset that the harness starts and stops, whose components run ONNX Runtime. Each
scenario runs
in a fresh Python process, so its cold time (import + load + first request) and its peak
memory are its own. Warm-up requests are dropped; then `iterations` requests go out from
`concurrency` threads, each request a batch of `batch` ads. Per request the harness keeps the
end-to-end latency and every stage's time; per scenario images/s over the timed wall clock,
FLOPs per stage (torch's FLOP counter on meta tensors) and MFU against the device's peak.
Every scenario is one JSON line with the machine, library versions, git commit, spec hash and
raw samples. The `torch` backend is the baseline a user would otherwise pick (the same
diffusers/transformers networks, eager, no export): the report states every other scenario
as a ratio to it, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.measure import git_commit, machine_info

SCHEMA_VERSION = 1
PLACEMENTS = ("in-process", "client-loop", "in-server")
SERVED = ("client-loop", "in-server")  # placements that talk to a tritonserver the harness starts
BASELINE_BACKEND = "torch"


@dataclass(frozen=True)
class Scenario:
    pipeline: str = "refadgen"
    preset: str = "small"
    backend: str = "onnxruntime"
    placement: str = "in-process"
    batch: int = 1  # requests per pipeline call
    concurrency: int = 1  # callers in flight at once
    steps: int = 30
    iterations: int = 20
    warmup: int = 2
    threads: int | None = None  # intra-op threads for the backend
    server_url: str | None = None  # set by the harness for the served placements; not part of the label

    @property
    def label(self) -> str:
        return f"{self.pipeline}/{self.preset}/{self.backend}/{self.placement}/b{self.batch}/c{self.concurrency}"


def percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        return {}
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
    }


def run_scenario(scenario: Scenario, cache_dir: str | None = None) -> dict[str, Any]:
    """Run one scenario in this process and return its record (call in a fresh process)."""
    from runtime.pipelines import get_pipeline
    from runtime.presets import get_preset

    if scenario.placement not in PLACEMENTS:
        raise ValueError(f"placement {scenario.placement!r}: expected one of {PLACEMENTS}")
    if scenario.placement in SERVED and scenario.server_url is None:
        raise ValueError(f"placement {scenario.placement} needs a server_url")
    if scenario.placement == "in-server" and scenario.batch != 1:
        raise ValueError("in-server requests carry one ad each: use --concurrency, not --batch")
    preset = get_preset(scenario.preset)
    definition = get_pipeline(scenario.pipeline)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        options = {**definition.example_options(Path(tmp), preset), definition.steps_option: scenario.steps}
        request, spec_hash, close = _requester(scenario, definition, preset, options, cache_dir)
        load_s = time.perf_counter() - started
        try:
            first_s, _ = request()
            cold_s = time.perf_counter() - started
            for _ in range(max(0, scenario.warmup - 1)):
                request()
            latencies: list[float] = []
            stages: dict[str, list[float]] = {}
            lock = threading.Lock()

            def timed(_: int) -> None:
                latency, timings = request()
                with lock:
                    latencies.append(latency)
                    for stage, value in timings.items():
                        if isinstance(value, dict):
                            stages.setdefault(stage, []).extend(value["samples"])
                        else:
                            stages.setdefault(stage, []).append(value)

            wall_start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=scenario.concurrency) as pool:
                list(pool.map(timed, range(scenario.iterations)))
            wall_s = time.perf_counter() - wall_start
        finally:
            close()

    return {
        "schema": SCHEMA_VERSION,
        "benchmark": "harness",
        "label": scenario.label,
        "scenario": asdict(scenario),
        "latency_s": percentiles(latencies),
        "stages_s": {stage: percentiles(values) for stage, values in stages.items()},
        "images_per_s": scenario.iterations * scenario.batch / wall_s,
        "wall_s": wall_s,
        "load_s": load_s,
        "first_request_s": first_s,
        "cold_s": cold_s,
        "peak_host_rss_mb": own_peak_rss_mb(),
        "peak_device_mb": peak_device_mb(),
        "spec_hash": spec_hash,
        "samples": {"latency_s": latencies, "stages_s": stages},
    }


def _requester(scenario: Scenario, definition, preset, options: dict, cache_dir: str | None):
    """(request() -> (latency, stage timings), spec hash, close()) for the scenario's placement."""
    from runtime.specs.core import specs_hash

    if scenario.placement == "in-server":
        from runtime.serving.remote import PipelineClient

        local = threading.local()
        clients: list[PipelineClient] = []

        def request() -> tuple[float, dict]:
            if not hasattr(local, "client"):  # one connection per caller thread
                local.client = PipelineClient(scenario.server_url)
                clients.append(local.client)
            t0 = time.perf_counter()
            result = local.client.generate(definition, {**options, "seed": 0})
            return time.perf_counter() - t0, result.report["timings_s"]

        def close() -> None:
            for client in clients:
                client.close()

        return request, specs_hash(definition.specs(preset)), close

    from runtime.api import load_pipeline

    backend = "triton" if scenario.placement == "client-loop" else scenario.backend
    loaded = load_pipeline(scenario.pipeline, scenario.preset, backend, cache_dir=cache_dir, threads=scenario.threads,
                           server_url=scenario.server_url)
    prepared = [definition.prepare(preset, **options, seed=seed) for seed in range(scenario.batch)]

    def request() -> tuple[float, dict]:
        t0 = time.perf_counter()
        results = definition.run_batch(loaded.runner, prepared)
        return time.perf_counter() - t0, results[0].report["timings_s"]

    return request, loaded.specs_hash, loaded.close


def own_peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space, which exec replaces;
    getrusage's ru_maxrss would carry the parent's peak over from fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_mb() -> float | None:
    if "torch" not in sys.modules:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


@dataclass
class FlopReport:
    per_call: dict[str, int]
    per_stage: dict[str, int] = field(default_factory=dict)  # one request-batch's FLOPs per report stage


def flops_for(scenario: Scenario) -> FlopReport | None:
    """FLOPs per stage of one pipeline call of the scenario; None when torch is not installed."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    from benchmarks.flops import component_flops
    from runtime.pipelines import get_pipeline
    from runtime.presets import get_preset

    definition = get_pipeline(scenario.pipeline)
    preset = get_preset(scenario.preset)
    specs = definition.specs(preset)
    plan = definition.call_plan(scenario.batch, scenario.steps)
    envs = {name: specs[name].env_at("opt", B=plan[name].batch) for name in specs}
    per_call = component_flops(scenario.pipeline, preset, specs, envs)
    per_stage: dict[str, int] = {}
    for name, call in plan.items():
        per_stage[call.stage] = per_stage.get(call.stage, 0) + per_call[name] * call.calls
    return FlopReport(per_call, per_stage)


def add_mfu(record: dict[str, Any], flops: FlopReport | None, peak: float) -> None:
    """Stage and end-to-end FLOPs and MFU (achieved FLOP/s over the device peak) from p50 times."""
    if flops is None:
        return
    record["flops"] = {"per_call": flops.per_call, "per_stage": flops.per_stage, "total": sum(flops.per_stage.values())}
    mfu = {}
    steps = record["scenario"]["steps"]
    from runtime.pipelines import get_pipeline

    step_stage = get_pipeline(record["scenario"]["pipeline"]).step_stage
    for stage, total in flops.per_stage.items():
        p50 = record["stages_s"].get(stage, {}).get("p50")
        if p50:
            per_sample = total / steps if stage == step_stage else total
            mfu[stage] = per_sample / p50 / peak
    mfu["end_to_end"] = record["flops"]["total"] / record["latency_s"]["p50"] / peak
    record["mfu"] = mfu
    record["device_peak_flops"] = peak


def ensure_graphs(scenario: Scenario, cache_dir: str | None) -> None:
    """Export ONNX graphs before timing, so no scenario's cold time includes an export."""
    if scenario.backend != "onnxruntime":
        return
    from runtime.artifacts.graphs import ensure_graphs as ensure
    from runtime.backends.base import ModelSource
    from runtime.pipelines import get_pipeline
    from runtime.presets import get_preset

    preset = get_preset(scenario.preset)
    specs = get_pipeline(scenario.pipeline).specs(preset)
    ensure(specs, ModelSource(scenario.pipeline, preset, cache_root=Path(cache_dir) if cache_dir else None))


def server_peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory (VmHWM) of a server and its Python-backend stubs, from /proc."""
    total, pending, seen = 0, [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024 if total else None


def run_in_subprocess(scenario: Scenario, cache_dir: str | None, timeout_s: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.harness", "--run-scenario", json.dumps(asdict(scenario))]
    if cache_dir:
        command += ["--cache-dir", cache_dir]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"scenario {scenario.label} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scenarios_from(args: argparse.Namespace) -> list[Scenario]:
    """Every combination; served placements only with onnxruntime (what the server's models run)."""
    return [
        Scenario(args.pipeline, args.preset, backend, placement, batch, concurrency, args.steps, args.iterations,
                 args.warmup, args.threads)
        for placement in args.placement or ["in-process"]
        for backend in args.backend or ["onnxruntime", BASELINE_BACKEND]
        for batch in args.batch or [1]
        for concurrency in args.concurrency or [1]
        if placement == "in-process" or (backend == "onnxruntime" and (placement != "in-server" or batch == 1))
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="refadgen")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--backend", action="append", help="repeat to compare (default: onnxruntime and torch)")
    parser.add_argument("--placement", action="append", choices=PLACEMENTS, help="repeat to compare (default in-process)")
    parser.add_argument("--batch", action="append", type=int, help="requests per call; repeat for a sweep (default 1)")
    parser.add_argument("--concurrency", action="append", type=int, help="callers at once; repeat for a sweep (default 1)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--iterations", type=int, default=20, help="timed requests per scenario")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests first (the first one is the cold one)")
    parser.add_argument("--threads", type=int, help="intra-op threads for every backend")
    parser.add_argument("--cache-dir", help="exported-graph cache (default $ADGEN_CACHE or ~/.cache/adgen)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per scenario before it is abandoned")
    parser.add_argument("--out", type=Path, required=True, help="append one JSON line per scenario here")
    parser.add_argument("--quiet", action="store_true")


def bench(args: argparse.Namespace) -> int:
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    from benchmarks.flops import device_peak

    scenarios = scenarios_from(args)
    if not scenarios:
        raise SystemExit("no scenario: served placements run the onnxruntime backend, in-server at batch 1")
    machine = machine_info()
    peak, peak_source = device_peak(machine["device"])
    commit = git_commit()
    flop_cache: dict[tuple, FlopReport | None] = {}
    records = []
    for scenario in scenarios:
        ensure_graphs(scenario, args.cache_dir)
    server = None
    try:
        if any(s.placement in SERVED for s in scenarios):
            from runtime.serving.serve import start_server

            say(f"starting tritonserver for {args.pipeline} ({args.preset})")
            server = start_server([args.pipeline], args.preset, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                                  progress=None if args.quiet else say)
        for i, scenario in enumerate(scenarios, 1):
            if scenario.placement in SERVED:
                scenario = replace(scenario, server_url=server.grpc_url)
            say(f"[{i}/{len(scenarios)}] {scenario.label}: running")
            record = run_in_subprocess(scenario, args.cache_dir, args.timeout)
            key = (scenario.pipeline, scenario.preset, scenario.batch, scenario.steps)
            if key not in flop_cache:
                flop_cache[key] = flops_for(scenario)
            add_mfu(record, flop_cache[key], peak)
            if scenario.placement in SERVED:
                record["peak_server_rss_mb"] = server_peak_rss_mb(server.process.pid)  # since the server started
            record.update(machine=machine, git_commit=commit, device_peak_source=peak_source, time=time.time())
            records.append(record)
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
            lat = record["latency_s"]
            say(f"[{i}/{len(scenarios)}] {scenario.label}: p50 {lat['p50']:.3f} s, p90 {lat['p90']:.3f} s, "
                f"{record['images_per_s']:.2f} images/s, cold {record['cold_s']:.1f} s, "
                f"peak RSS {record['peak_host_rss_mb']:.0f} MB")
    finally:
        if server is not None:
            server.stop()
    print_summary(records)
    return 0


def peer_key(record: dict[str, Any]) -> tuple:
    """The axes a scenario shares with its baseline: all but backend and placement."""
    s = record["scenario"]
    return (s["pipeline"], s["preset"], s["batch"], s["concurrency"], s["steps"])


def is_baseline(record: dict[str, Any]) -> bool:
    return record["scenario"]["backend"] == BASELINE_BACKEND and record["scenario"]["placement"] == "in-process"


def speedups(records: list[dict[str, Any]]) -> dict[str, float]:
    """p50 of the in-process torch-eager baseline over p50 of each scenario with the same other axes."""
    base = {peer_key(r): r["latency_s"]["p50"] for r in records if is_baseline(r)}
    return {r["label"]: base[peer_key(r)] / r["latency_s"]["p50"] for r in records if peer_key(r) in base}


def print_summary(records: list[dict[str, Any]]) -> None:
    ratio = speedups(records)
    print(f"{'scenario':<52} {'p50 s':>8} {'p90 s':>8} {'step p50 ms':>12} {'img/s':>7} {'vs torch':>9}")
    for r in records:
        step = r["stages_s"].get("denoise_step", {}).get("p50")
        step_ms = f"{1000 * step:.1f}" if step else "-"
        speedup = f"{ratio[r['label']]:.2f}x" if r["label"] in ratio else "-"
        print(f"{r['label']:<52} {r['latency_s']['p50']:8.3f} {r['latency_s']['p90']:8.3f} {step_ms:>12} "
              f"{r['images_per_s']:7.2f} {speedup:>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-scenario", help=argparse.SUPPRESS)
    if argv is None:
        argv = sys.argv[1:]
    if "--run-scenario" in argv:
        inner = argparse.ArgumentParser()
        inner.add_argument("--run-scenario", required=True)
        inner.add_argument("--cache-dir")
        a = inner.parse_args(argv)
        record = run_scenario(Scenario(**json.loads(a.run_scenario)), a.cache_dir)
        print(json.dumps(record))
        return 0
    add_arguments(parser)
    return bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
