"""Serving overhead and step-level batching behind the real tritonserver.

    python -m benchmarks.triton_serving --preset small --steps 10 --rounds 5 --out results.jsonl

1. Per-step overhead, same run, interleaved: one request at a time through the in-process
   runtime, the client-side loop (each step a gRPC call, large tensors through shared memory)
   and the in-server BLS pipeline; the order rotates every round so machine noise hits all three
   alike. The per-step time is the same StageTimer stage ("denoise_step") of the same
   orchestrator in all three; overhead = median step / median in-process step - 1.
2. Throughput: images/s with 1, 2, 4, 8 concurrent clients, each sending whole requests to the
   in-server pipeline, against a server with step-level batching (dynamic batching on the U-Net)
   and one without (both running, rounds alternating between them); steps of concurrent
   requests can share a U-Net call only in the first. The U-Net's executions and requests are
   read from Triton's statistics for every measurement.

All ONNX Runtime sessions (in-process and in-server) run with their default thread count and
without spinning. Prints the tables and appends JSON lines (machine, versions, git commit,
specs hash, raw samples) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.measure import git_commit
from benchmarks.measure import machine_info as machine
from runtime.api import LoadedPipeline, generate, load_pipeline
from runtime.artifacts.weights import WeightsSource
from runtime.backends import load_components
from runtime.backends.base import ModelSource
from runtime.pipelines import PIPELINES, get_pipeline
from runtime.presets import PRESETS, get_preset
from runtime.serving.protocol import model_name
from runtime.serving.remote import PipelineClient
from runtime.serving.repository import RepositoryOptions
from runtime.serving.resident import ResidentBounds
from runtime.serving.serve import start_server
from runtime.specs.core import specs_hash

MODES = ("in-process", "client-side", "in-server")
PROMPTS = ("a sneaker on a wooden table", "studio, soft light", "beach at sunset", "forest floor, moss",
           "marble counter", "neon city at night", "snowy mountain", "kitchen table, morning")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def in_process(pipeline: str, preset: str, cache_dir: Path | None) -> LoadedPipeline:
    definition = get_pipeline(pipeline)
    size = get_preset(preset)
    source = ModelSource(pipeline, size, WeightsSource(), cache_root=cache_dir, spin=False)
    specs = definition.specs(size)
    components = load_components("onnxruntime", specs, source, say)
    runner = definition.create(components, size, source.weights)
    return LoadedPipeline(definition, "onnxruntime", runner, source, specs_hash(specs), 0.0, components)


def overhead(args: argparse.Namespace, records: list[dict]) -> None:
    """Per-step time of the five placements, interleaved: in-process, and client-side and in-server
    against two servers, one keeping per-request invariants (resident, what ships) and one not."""
    definition = get_pipeline(args.pipeline)
    servers, loaded, remotes = {}, {}, {}
    try:
        for resident in (True, False):
            options = RepositoryOptions(pipeline_instances=1, resident=ResidentBounds() if resident else None)
            servers[resident] = start_server([args.pipeline], args.preset, cache_dir=args.cache_dir, options=options,
                                             progress=say)
        loaded["in-process"] = in_process(args.pipeline, args.preset, args.cache_dir)
        options = dict(product=args.product, prompt=PROMPTS[0], steps=args.steps, seed=0)
        run = {"in-process": lambda: generate(loaded["in-process"], **options).report}
        where = {}
        for resident, server in servers.items():
            suffix = "" if resident else " (no resident)"
            client = loaded[f"client-side{suffix}"] = load_pipeline(
                args.pipeline, preset=args.preset, backend="triton", server_url=server.grpc_url)
            remote = remotes[resident] = PipelineClient(server.grpc_url)
            run[f"client-side{suffix}"] = _client_side(client, options)
            run[f"in-server{suffix}"] = _in_server(remote, definition, options)
            where[f"client-side{suffix}"] = where[f"in-server{suffix}"] = server
        modes = list(run)
        samples: dict[str, list[float]] = {m: [] for m in modes}
        totals: dict[str, list[float]] = {m: [] for m in modes}
        sent: dict[str, dict[str, int]] = {m: {} for m in modes[1:]}
        unet: dict[str, dict[str, int]] = {m: {} for m in modes[1:]}
        for r in range(args.warmup + args.rounds):
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                before = _unet_stats(where[mode], args.pipeline) if mode in where else None
                report = run[mode]()
                if r < args.warmup:
                    continue
                samples[mode] += report["timings_s"]["denoise_step"]["samples"]
                totals[mode].append(report["timings_s"]["total"])
                if mode in where:
                    for k, v in _unet_stats(where[mode], args.pipeline).items():
                        unet[mode][k] = unet[mode].get(k, 0) + v - before[k]
                    step = report["inputs_sent"][_step_component(args.pipeline)]
                    for k, v in step.items():
                        sent[mode][k] = sent[mode].get(k, 0) + v
    finally:
        for closable in (*loaded.values(), *remotes.values()):
            closable.close()
        for server in servers.values():
            server.stop()
    base = float(np.median(samples["in-process"]))
    print(f"\nper-step time, {args.pipeline} {args.preset}, {args.steps} steps x {args.rounds} rounds "
          f"(after {args.warmup} warm-up), interleaved")
    print(f"{'loop runs':<26} {'step p50 ms':>12} {'step p90 ms':>12} {'overhead':>14} {'request p50 s':>14} "
          f"{'step input bytes':>17}")
    for mode in modes:
        values = np.array(samples[mode])
        p50 = float(np.median(values))
        per_call = sent[mode]["input_bytes"] / sent[mode]["calls"] if mode in sent else 0
        print(f"{mode:<26} {1000 * p50:12.2f} {1000 * np.percentile(values, 90):12.2f} "
              f"{1000 * (p50 - base):+7.2f} {100 * (p50 / base - 1):+5.1f}% {np.median(totals[mode]):14.3f} "
              f"{per_call if mode in sent else float('nan'):17,.0f}")
        records.append({"benchmark": "triton_step_overhead", "mode": mode, "p50_s": p50, "overhead": p50 / base - 1,
                        "samples_s": values.tolist(), "request_totals_s": totals[mode], "unet_stats": unet.get(mode),
                        "step_inputs_sent": sent.get(mode)})
    # The U-Net model's own time per step (Triton statistics): what remains of a step is transport,
    # scheduling and the loop itself, independent of how fast ONNX Runtime runs in which process.
    print(f"\n{'loop runs':<26} {'step mean ms':>13} {'unet queue ms':>14} {'unet execute ms':>16} {'step - execute ms':>18}")
    for mode in modes[1:]:
        u = unet[mode]
        step = 1000 * float(np.mean(samples[mode]))
        queue, execute = u["queue_ns"] / u["requests"] / 1e6, u["compute_infer_ns"] / u["requests"] / 1e6
        print(f"{mode:<26} {step:13.2f} {queue:14.2f} {execute:16.2f} {step - execute:18.2f}")
    print("step input bytes: mean bytes of inputs one step call carried (the first of a request carries the "
          "invariants, the others only the latents and timestep when resident)")


def _in_server(remote: PipelineClient, definition, options: dict):
    def run() -> dict:
        report = remote.generate(definition, options).report
        return {**report, "inputs_sent": report["server"]["inputs_sent"]}
    return run


def _step_component(pipeline: str) -> str:
    return get_pipeline(pipeline).step_components[-1]


def _client_side(loaded: LoadedPipeline, options: dict):
    """A client-side run whose report says what its step component's calls carried, as in-server reports do."""
    def run() -> dict:
        component = loaded.runner.components[_step_component(loaded.definition.name)]
        before = component.resident.counts()
        report = generate(loaded, **options).report
        return {**report, "inputs_sent": {component.spec.name: {
            k: v - before[k] for k, v in component.resident.counts().items()}}}
    return run


def throughput(args: argparse.Namespace, records: list[dict]) -> None:
    definition = get_pipeline(args.pipeline)
    servers = {}
    clients_of = {}
    samples: dict[tuple[bool, int], list[float]] = {}
    try:
        for batching in (True, False):  # both up at once, so the rounds can alternate between them
            options = RepositoryOptions(pipeline_instances=max(args.clients), step_batching=batching)
            servers[batching] = start_server([args.pipeline], args.preset, cache_dir=args.cache_dir, options=options, progress=say)
            clients_of[batching] = PipelineClient(servers[batching].grpc_url)

        def request(batching: bool, i: int) -> None:
            options = dict(product=args.product, prompt=PROMPTS[i % len(PROMPTS)], steps=args.steps, seed=i)
            clients_of[batching].generate(definition, options)

        for batching in servers:
            request(batching, 0)  # warm-up
        for r in range(args.throughput_rounds):
            for clients in args.clients:
                for batching in ((True, False) if r % 2 == 0 else (False, True)):
                    count = args.requests_per_client * clients
                    before = _unet_stats(servers[batching], args.pipeline)
                    started = time.perf_counter()
                    with ThreadPoolExecutor(clients) as pool:
                        list(pool.map(lambda i: request(batching, i), range(count)))
                    wall = time.perf_counter() - started
                    stats = {k: v - before[k] for k, v in _unet_stats(servers[batching], args.pipeline).items()}
                    samples.setdefault((batching, clients), []).append(count / wall)
                    say(f"round {r}, step batching {'on ' if batching else 'off'}, {clients} clients: "
                        f"{count} images in {wall:.1f} s, unet {stats}")
                    records.append({"benchmark": "triton_throughput", "step_batching": batching, "clients": clients,
                                    "round": r, "images": count, "wall_s": wall, "images_per_s": count / wall,
                                    "unet_stats": stats})
    finally:
        for client in clients_of.values():
            client.close()
        for server in servers.values():
            server.stop()
    print(f"\nimages/s (median of {args.throughput_rounds} alternating rounds), in-server pipeline, {args.preset}, "
          f"{args.steps} steps, {args.requests_per_client} requests per client per round")
    print(f"{'clients':>8} {'batching on':>12} {'batching off':>13} {'ratio':>7}")
    for clients in args.clients:
        on, off = float(np.median(samples[(True, clients)])), float(np.median(samples[(False, clients)]))
        print(f"{clients:>8} {on:12.3f} {off:13.3f} {on / off:7.2f}")


def _unet_stats(server, pipeline: str) -> dict[str, int]:
    """Triton's statistics of the pipeline's (first) per-step model."""
    import urllib.request

    model = model_name(pipeline, get_pipeline(pipeline).step_components[0])
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats") as response:
        stats = json.load(response)["model_stats"][0]
    inference = stats["inference_stats"]
    return {"requests": int(inference["success"]["count"]), "executions": int(stats["execution_count"]),
            "queue_ns": int(inference["queue"]["ns"]), "compute_infer_ns": int(inference["compute_infer"]["ns"]),
            "success_ns": int(inference["success"]["ns"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="refadgen", choices=tuple(PIPELINES))
    parser.add_argument("--preset", default="small", choices=tuple(PRESETS))
    parser.add_argument("--product", type=Path, default=Path("examples/shoe.png"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="overhead: requests per mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--throughput-rounds", type=int, default=3)
    parser.add_argument("--skip", choices=("overhead", "throughput"), action="append", default=[])
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--out", type=Path, help="append JSON lines here")
    args = parser.parse_args(argv)
    records: list[dict] = []
    if "overhead" not in args.skip:
        overhead(args, records)
    if "throughput" not in args.skip:
        throughput(args, records)
    common = {"pipeline": args.pipeline, "preset": args.preset, "steps": args.steps, "git_commit": git_commit(),
              "specs_hash": specs_hash(get_pipeline(args.pipeline).specs(get_preset(args.preset))),
              "machine": machine(), "time": time.time()}
    if args.out:
        with open(args.out, "a") as f:
            for record in records:
                f.write(json.dumps({**record, **common}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
