"""perf_analyzer on these machines, and its figures side by side with adgen's own client.

    python -m benchmarks.perf_analyzer install .tools/perf_analyzer
    python -m benchmarks.perf_analyzer compare --preset tiny --model refadgen_unet --batch 2 --concurrency 1 2 4

`install`: no current wheel carries a working perf_analyzer (the `perf-analyzer` package is a stub,
genai-perf a wrapper); the manylinux wheel of tritonclient 2.41.0 does. This downloads that wheel
from PyPI (nothing else of it is installed), extracts the binary, links the two libraries it needs
(libb64, libcudart) from the nvidia-pytriton wheel's bundled libraries, and writes DIR/perf_analyzer,
a wrapper that finds them. `.ci/run` does this, so the tests can run it.

`compare`: for each `--setup` (a server configuration, started per round: `adgen serve` with its
fronts, or tritonserver alone with or without Triton's queue policy on the model), writes the model's
input data with `adgen perf-inputs` and measures, per concurrency, perf_analyzer (count windows) and
adgen's client (the same tensors over gRPC, N threads each sending one call at a time) on the same
model. Rounds alternate the order of setups and tools. Prints medians of p50/p90/p99 and throughput
and appends JSON lines to --out:

    python -m benchmarks.perf_analyzer compare --preset tiny --model refadgen_unet --batch 2 \
        --setup triton-policy --setup triton --setup front --concurrency 1 2 4 --rounds 2 --out results.jsonl
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

PERF_ANALYZER_WHEEL = "tritonclient==2.41.0"
WHEEL_PLATFORM = "manylinux1_x86_64"
BINARY = "perf_analyzer"
NEEDED = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pytriton_libs() -> Path:
    """The folder of libraries bundled in the nvidia-pytriton wheel."""
    import pytriton

    folder = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not found; install nvidia-pytriton (pip install 'adgen[triton]')")
    return folder


def install(target: Path) -> Path:
    """perf_analyzer from the tritonclient 2.41.0 wheel into `target`; returns the wrapper's path."""
    target = target.resolve()
    (target / "bin").mkdir(parents=True, exist_ok=True)
    (target / "lib").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--platform", WHEEL_PLATFORM, "-d", tmp, PERF_ANALYZER_WHEEL], check=True)
        (wheel,) = Path(tmp).glob("tritonclient-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(f"/bin/{BINARY}"))
            binary = target / "bin" / BINARY
            binary.write_bytes(archive.read(member))
    binary.chmod(0o755)
    libs = pytriton_libs()
    for soname, pattern in NEEDED.items():
        found = sorted(libs.glob(pattern))
        if not found:
            raise FileNotFoundError(f"{libs}: no {pattern} (needed by perf_analyzer as {soname})")
        link = target / "lib" / soname
        link.unlink(missing_ok=True)
        link.symlink_to(found[0])
    wrapper = target / BINARY
    wrapper.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH="{target / "lib"}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" '
                       f'exec "{binary}" "$@"\n')
    wrapper.chmod(0o755)
    subprocess.run([str(wrapper), "--version"], check=True, capture_output=True)
    return wrapper


def find_perf_analyzer(explicit: str | None = None) -> Path | None:
    """--perf-analyzer, $ADGEN_PERF_ANALYZER, .tools/perf_analyzer/perf_analyzer, or the PATH's."""
    for candidate in (explicit, os.environ.get("ADGEN_PERF_ANALYZER"),
                      str(Path(__file__).resolve().parent.parent / ".tools" / BINARY / BINARY), shutil.which(BINARY)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def run_perf_analyzer(binary: Path, model: str, url: str, data: Path, concurrency: int, batch: int | None,
                      requests: int, timeout_s: float = 600.0) -> dict:
    """One perf_analyzer measurement (count windows of `requests` calls): its CSV row as numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        command = [str(binary), "-m", model, "-u", url, "-i", "grpc", "--input-data", str(data),
                   "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-mode", "count_windows",
                   "--measurement-request-count", str(requests), "--stability-percentage", "100000",
                   "--max-trials", "3", "--percentile", "99", "-f", str(report)]
        if batch:
            command += ["-b", str(batch)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        # A setup that stalls (p99 jumping 20x between windows) is never "stable": exit 2 with the
        # report written is a measurement all the same.
        if done.returncode not in (0, 2) or not report.is_file():
            raise RuntimeError(f"perf_analyzer exited {done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        (row,) = list(csv.DictReader(io.StringIO(report.read_text())))
    return {
        "p50_ms": float(row["p50 latency"]) / 1000, "p90_ms": float(row["p90 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000, "per_s": float(row["Inferences/Second"]),
        "server_queue_ms": float(row["Server Queue"]) / 1000, "command": " ".join(command[1:]),
    }


def run_adgen_client(model: str, url: str, feed: dict, concurrency: int, requests: int) -> dict:
    """`requests` calls of `model` through tritonclient gRPC from `concurrency` threads, each one at a time."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    latencies: list[float] = []
    lock = threading.Lock()
    remaining = [requests]

    def worker() -> None:
        client = grpcclient.InferenceServerClient(url)
        inputs = []
        for name, array in feed.items():
            dtype = "BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype)
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            while True:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                started = time.perf_counter()
                client.infer(model, inputs)
                with lock:
                    latencies.append(time.perf_counter() - started)
        finally:
            client.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    batch = next(iter(feed.values())).shape[0] if feed else 1
    return {"p50_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "per_s": len(ms) * batch / wall}


def feed_from_data(entry: dict, model: str, preset, batch: int | None) -> dict[str, np.ndarray]:
    """perf-inputs' data entry as the arrays perf_analyzer sends (batched `batch` times)."""
    import base64

    from runtime.serving.perf_inputs import served_models
    from runtime.serving.protocol import request_tensors

    definition, spec = served_models(preset)[model]
    feed = {}
    if spec is None:
        from runtime.serving.perf_inputs import deserialize_bytes

        kinds = {t.name: t.kind.triton_dtype for t in request_tensors(definition)}
        for name, value in entry.items():
            raw = base64.b64decode(value["b64"])
            if kinds[name] == "BYTES":
                feed[name] = np.array(deserialize_bytes(raw), dtype=np.object_).reshape(value["shape"])
            else:
                feed[name] = np.frombuffer(raw, dtype=np.int64 if kinds[name] == "INT64" else np.float64).copy()
        return feed
    for t in spec.inputs:
        item = np.frombuffer(base64.b64decode(entry[t.name]["b64"]), dtype=t.dtype.numpy).reshape(entry[t.name]["shape"])
        feed[t.name] = np.stack([item] * batch) if batch else item.copy()
    return feed


# Triton's own bounded queue as the repository carried it before the fronts kept the bounds
# (runtime/serving/admission.py): what "triton-policy" puts back on the measured model.
OLD_POLICY = ("dynamic_batching {\n  default_queue_policy {\n    timeout_action: REJECT\n"
              "    default_timeout_microseconds: 60000000\n    max_queue_size: 64\n  }")
SETUPS = {
    "triton-policy": "tritonserver alone, the model with Triton's default_queue_policy (size 64, 60 s, REJECT)",
    "triton": "tritonserver alone, no queue policy (no bound at all)",
    "front": "adgen serve: its front keeps the bounds, no Triton queue policy (what ships)",
}


class Setup:
    """One server configuration for the measured model, started and stopped per round."""

    def __init__(self, name: str, pipeline: str, preset: str, model: str, options):
        self.name, self.pipeline, self.preset, self.model, self.options = name, pipeline, preset, model, options
        self.stop = lambda: None

    def start(self) -> str:
        """Start it; its gRPC host:port."""
        from runtime.serving.serve import Service, write_runtime_repository
        from runtime.serving.server import TritonServer

        if self.name == "front":
            service = Service([self.pipeline], self.preset, options=self.options, watchdog_interval_s=0, progress=say)
            service.start()
            self.stop = service.stop
            return service.grpc_url
        folder = Path(tempfile.mkdtemp(prefix="adgen-perf-"))
        repository = write_runtime_repository(folder / "repository", [self.pipeline], self.preset, options=self.options,
                                              progress=say)
        if self.name == "triton-policy":
            config = repository / self.model / "config.pbtxt"
            text = config.read_text()
            if "dynamic_batching {" not in text:
                raise SystemExit(f"{self.model} has no dynamic batcher to carry a queue policy")
            config.write_text(text.replace("dynamic_batching {", OLD_POLICY, 1))
        (folder / "run").mkdir()
        server = TritonServer(repository, workdir=folder / "run", remove_workdir=False).start(600.0, say)

        def stop() -> None:
            server.stop()
            shutil.rmtree(folder, ignore_errors=True)

        self.stop = stop
        return server.grpc_url


def compare(args: argparse.Namespace) -> int:
    from benchmarks.measure import append_jsonl, provenance
    from runtime.presets import get_preset
    from runtime.serving.perf_inputs import served_models, write_perf_input_data
    from runtime.serving.repository import RepositoryOptions

    binary = find_perf_analyzer(args.perf_analyzer)
    if binary is None:
        say("perf_analyzer not found: python -m benchmarks.perf_analyzer install .tools/perf_analyzer")
        return 2
    preset = get_preset(args.preset)
    definition, spec = served_models(preset)[args.model]
    batch = args.batch if spec is not None else None
    options = RepositoryOptions(step_batching=not args.no_step_batching, threads=args.threads)
    setups = [Setup(name, definition.name, args.preset, args.model, options) for name in args.setup or ["front"]]
    if args.url and len(setups) > 1:
        say("--url measures one running server: give at most one --setup")
        return 2
    records, samples = [], {}
    tools = ["perf_analyzer"] + ([] if args.no_adgen_client else ["adgen client"])
    with tempfile.TemporaryDirectory() as tmp:
        data = write_perf_input_data(args.model, preset, Path(tmp) / "data.json", steps=args.steps)
        feed = feed_from_data(json.loads(data.read_text())["data"][0], args.model, preset, batch)
        for r in range(args.rounds):
            for setup in setups if r % 2 == 0 else setups[::-1]:
                url = args.url or setup.start()
                try:
                    run_adgen_client(args.model, url, feed, 1, 5)  # warm-up
                    for concurrency in args.concurrency:
                        for tool in tools if r % 2 == 0 else tools[::-1]:
                            if tool == "perf_analyzer":
                                run = run_perf_analyzer(binary, args.model, url, data, concurrency, batch, args.requests)
                            else:
                                run = run_adgen_client(args.model, url, feed, concurrency, args.requests)
                            samples.setdefault((setup.name, concurrency, tool), []).append(run)
                            say(f"round {r + 1} {setup.name} c={concurrency} {tool}: p50 {run['p50_ms']:.1f} ms, "
                                f"p99 {run['p99_ms']:.1f} ms")
                finally:
                    if not args.url:
                        setup.stop()
    print(f"{args.model} at {args.preset}, batch {batch or '-'}, {args.requests} calls per measurement, medians of "
          f"{args.rounds} rounds, setups alternating")
    for name in (s.name for s in setups):
        print(f"  {name}: {SETUPS[name]}")
    print("| setup | concurrency | tool | p50 ms | p90 ms | p99 ms | calls/s x batch | p99 / p50 |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for (name, concurrency, tool), runs in samples.items():
        figures = {k: float(np.median([run[k] for run in runs])) for k in ("p50_ms", "p90_ms", "p99_ms", "per_s")}
        print(f"| {name} | {concurrency} | {tool} | {figures['p50_ms']:.1f} | {figures['p90_ms']:.1f} | "
              f"{figures['p99_ms']:.1f} | {figures['per_s']:.1f} | {figures['p99_ms'] / figures['p50_ms']:.2f} |")
        records.append({"benchmark": "perf_analyzer_compare", "model": args.model, "preset": args.preset, "batch": batch,
                        "setup": name, "concurrency": concurrency, "tool": tool, **figures, "runs": runs,
                        "step_batching": not args.no_step_batching, **provenance()})
    append_jsonl(args.out, records)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="perf_analyzer from the tritonclient 2.41.0 wheel into DIR")
    inst.add_argument("dir", type=Path)
    cmp_ = sub.add_parser("compare", help="perf_analyzer and adgen's client on one served model, side by side")
    cmp_.add_argument("--model", default="refadgen_unet")
    cmp_.add_argument("--preset", default="tiny")
    cmp_.add_argument("--batch", type=int, default=2, help="component models: rows per call (-b)")
    cmp_.add_argument("--steps", type=int, default=None, help="pipeline models: denoising steps per request")
    cmp_.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    cmp_.add_argument("--requests", type=int, default=200, help="calls per measurement")
    cmp_.add_argument("--rounds", type=int, default=2)
    cmp_.add_argument("--setup", action="append", choices=tuple(SETUPS),
                      help="server configuration (repeat to compare; default: front). " +
                      "; ".join(f"{k}: {v}" for k, v in SETUPS.items()))
    cmp_.add_argument("--url", default=None, help="a running server's gRPC host:port (default: start one per setup)")
    cmp_.add_argument("--perf-analyzer", default=None, help="the binary (default: $ADGEN_PERF_ANALYZER, .tools/, PATH)")
    cmp_.add_argument("--no-step-batching", action="store_true", help="the started server without step batching")
    cmp_.add_argument("--no-adgen-client", action="store_true", help="perf_analyzer only")
    cmp_.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per component model (0: its default)")
    cmp_.add_argument("--out", type=Path, help="append JSON lines here")
    args = parser.parse_args(argv)
    if args.command == "install":
        print(install(args.dir))
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
