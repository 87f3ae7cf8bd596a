"""Bounded load with faults against a real tritonserver (loopback only; stops by itself).

    python -m benchmarks.load_faults --preset tiny --minutes 5 --out results.jsonl

Starts `adgen serve`'s server (restricted control endpoints, random admin key, bounded queues)
and the model watchdog, then for `--minutes` runs `--clients` threads sending whole requests
through `PipelineClient` (retries with backoff for retriable errors): good requests and bad ones
(not an image, truncated, empty mask, size off the grid, steps out of range, control characters,
non-UTF-8 text). Meanwhile a fault thread, every `--fault-every` seconds in turn: kills the
Python stub of a component model, unloads and reloads the pipeline model (an operator's action),
sends a burst past the queue bound. Prints one table and writes one JSON line:

  sent, images (good requests that got their image), clear errors (bad requests refused with 400
  naming the field; requests answered 503 / unavailable after their retries), unexpected (any
  other outcome: a good request refused, a bad one accepted, a 500), hangs (no answer within
  `--hang-s`), retries the clients made (by error class), p50/p99 latency, server RSS
  (tritonserver + its stubs) at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Tally:
    sent: int = 0
    images: int = 0
    clear: int = 0
    busy: int = 0  # of `clear`: 503 / unavailable after retries
    unexpected: int = 0
    hangs: int = 0
    latencies_s: list[float] = field(default_factory=list)
    unexpected_samples: list[str] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)
    retries: Counter = field(default_factory=Counter)  # retries the clients made, by error class
    lock: threading.Lock = field(default_factory=threading.Lock)


def _rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue  # exited between listing and reading
    return total


def _inputs(folder: Path, preset) -> tuple[dict, list[tuple[str, dict, str]]]:
    from PIL import Image

    from runtime.inputs.examples import draw_product

    w, h = preset.default_width, preset.default_height
    good = folder / "product.png"
    draw_product(w, h).save(good)
    (folder / "text.png").write_text("not an image")
    (folder / "truncated.png").write_bytes(good.read_bytes()[:200])
    Image.new("RGBA", (w, h), (10, 10, 10, 0)).save(folder / "empty_mask.png")
    base = {"product": good, "prompt": "a sneaker on a wooden table"}
    bad = [
        ("not an image", {**base, "product": folder / "text.png"}, "product"),
        ("truncated", {**base, "product": folder / "truncated.png"}, "product"),
        ("empty mask", {**base, "product": folder / "empty_mask.png"}, "mask"),
        ("width off grid", {**base, "width": w + 3, "height": h}, "width"),
        ("steps out of range", {**base, "steps": 0}, "steps"),
        ("control character", {**base, "prompt": "shoe\x00"}, "prompt"),
        ("empty prompt", {**base, "prompt": " "}, "prompt"),
    ]
    return base, bad


def run(args: argparse.Namespace) -> dict:
    from runtime.errors import AdgenError, ServerBusyError, ServerError, ServerRequestError, ServerUnavailableError
    from runtime.pipelines import get_pipeline
    from runtime.presets import get_preset
    from runtime.serving.client import NO_RETRY, RetryPolicy
    from runtime.serving.remote import PipelineClient
    from runtime.serving.repository import RepositoryOptions
    from runtime.serving.serve import start_server
    from runtime.serving.watchdog import ModelWatchdog

    preset = get_preset(args.preset)
    definition = get_pipeline("refadgen")
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    server = start_server(
        ["refadgen"], args.preset, cache_dir=args.cache_dir, admin_key=secrets.token_hex(16), progress=log,
        options=RepositoryOptions(pipeline_instances=args.instances, pipeline_queue_size=args.queue_size),
    )
    tally = Tally()
    deadline = time.monotonic() + 60 * args.minutes
    stop = threading.Event()
    folder = Path(tempfile.mkdtemp(prefix="adgen-load-"))
    try:
        rss_start = _rss_kib([server.process.pid, *server.stub_pids()])
        good, bad = _inputs(folder, preset)
        watchdog = ModelWatchdog(server.http_url, server.admin_headers, progress=log)

        def watch() -> None:
            while not stop.wait(args.watchdog_interval):
                try:
                    watchdog.step()
                except AdgenError as e:  # the server not answering its index: next step
                    log(f"watchdog: {e}")

        def one(rng: random.Random, retry: RetryPolicy) -> None:
            is_bad = rng.random() < args.bad_fraction
            name, options, field_name = rng.choice(bad) if is_bad else ("good", dict(good), "")
            options = {**options, "seed": rng.randrange(1 << 30), "steps": options.get("steps", args.steps)}
            started = time.monotonic()
            outcome, detail = "unexpected", ""
            try:
                with PipelineClient(server.grpc_url, timeout_s=args.hang_s, retry=retry) as client:
                    try:
                        result = client.generate(definition, options)
                    finally:
                        with tally.lock:
                            tally.retries.update(client.connection.retries)
                ok = not is_bad and result.image.shape == (preset.default_height, preset.default_width, 3)
                outcome, detail = ("image" if ok else "unexpected"), f"{name}: accepted"
            except ServerRequestError as e:
                ok = is_bad and str(e).startswith(f"refadgen: {field_name}: ")
                outcome, detail = ("clear" if ok else "unexpected"), f"{name}: {e}"
            except (ServerBusyError, ServerUnavailableError) as e:
                outcome, detail = "busy", f"{name}: {e}"
            except ServerError as e:
                outcome = "hang" if e.status == "StatusCode.DEADLINE_EXCEEDED" else "unexpected"
                detail = f"{name}: {e}"
            elapsed = time.monotonic() - started
            with tally.lock:
                tally.sent += 1
                tally.latencies_s.append(elapsed)
                if outcome == "image":
                    tally.images += 1
                elif outcome in ("clear", "busy"):
                    tally.clear += 1
                    tally.busy += outcome == "busy"
                elif outcome == "hang":
                    tally.hangs += 1
                else:
                    tally.unexpected += 1
                    if len(tally.unexpected_samples) < 20:
                        tally.unexpected_samples.append(detail[:300])

        def client_loop(index: int) -> None:
            rng = random.Random(index)
            retry = RetryPolicy(attempts=4, base_s=0.5, cap_s=4.0)
            while time.monotonic() < deadline and not stop.is_set():
                one(rng, retry)

        def faults() -> None:
            import tritonclient.http as httpclient

            kinds = ("kill stub", "unload pipeline", "burst")
            k = 0
            while not stop.wait(args.fault_every) and time.monotonic() < deadline - 5:
                kind = kinds[k % len(kinds)]
                k += 1
                started = time.monotonic()
                if kind == "kill stub":
                    model = random.Random(k).choice(["refadgen_unet", "refadgen_vae_decoder", "refadgen_text_encoder"])
                    pids = server.stub_pids(model)
                    if pids:
                        os.kill(pids[0], signal.SIGKILL)
                    tally.faults.append({"fault": kind, "model": model, "pid": pids[0] if pids else None, "t": started})
                elif kind == "unload pipeline":
                    admin = httpclient.InferenceServerClient(server.http_url, network_timeout=300)
                    try:
                        admin.unload_model("refadgen", headers=server.admin_headers)
                        time.sleep(2.0)
                        admin.load_model("refadgen", headers=server.admin_headers)
                    finally:
                        admin.close()
                    tally.faults.append({"fault": kind, "seconds": round(time.monotonic() - started, 2), "t": started})
                else:
                    burst = [threading.Thread(target=one, args=(random.Random(k * 100 + i), NO_RETRY))
                             for i in range(2 * (args.instances + args.queue_size))]
                    for t in burst:
                        t.start()
                    for t in burst:
                        t.join(args.hang_s + 10)
                    tally.faults.append({"fault": kind, "requests": len(burst), "t": started})

        threads = [threading.Thread(target=watch), threading.Thread(target=faults)]
        threads += [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads[2:]:
            t.join(60 * args.minutes + args.hang_s + 60)
        stop.set()
        for t in threads[:2]:
            t.join(args.hang_s + 60)
        duration = time.monotonic() - started
        rss_end = _rss_kib([server.process.pid, *server.stub_pids()])
    finally:
        stop.set()
        code = server.stop()
    latencies = np.array(tally.latencies_s) if tally.latencies_s else np.zeros(1)
    result = {
        "benchmark": "load_faults", "preset": args.preset, "minutes": args.minutes, "duration_s": round(duration, 1),
        "clients": args.clients, "steps": args.steps, "bad_fraction": args.bad_fraction,
        "sent": tally.sent, "images": tally.images, "clear_errors": tally.clear, "of_which_busy_or_unavailable": tally.busy,
        "unexpected": tally.unexpected, "hangs": tally.hangs, "retries": dict(tally.retries),
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
        "latency_p99_s": round(float(np.percentile(latencies, 99)), 3),
        "server_rss_start_mib": round(rss_start / 1024, 1), "server_rss_end_mib": round(rss_end / 1024, 1),
        "faults": [{k: v for k, v in f.items() if k != "t"} for f in tally.faults],
        "recoveries": [{"model": r.model, "ok": r.ok, "seconds": round(r.seconds, 2), "detail": r.detail}
                       for r in watchdog.recoveries],
        "server_exit_code": code, "unexpected_samples": tally.unexpected_samples,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--bad-fraction", type=float, default=0.3)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--queue-size", type=int, default=2)
    parser.add_argument("--fault-every", type=float, default=20.0, help="seconds between injected faults")
    parser.add_argument("--watchdog-interval", type=float, default=2.0)
    parser.add_argument("--hang-s", type=float, default=120.0, help="a request unanswered this long is a hang")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="append the result as one JSON line")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 60:
        parser.error("--minutes: expected a number in (0, 60]")
    result = run(args)
    for key in ("sent", "images", "clear_errors", "of_which_busy_or_unavailable", "unexpected", "hangs",
                "latency_p50_s", "latency_p99_s", "server_rss_start_mib", "server_rss_end_mib", "server_exit_code"):
        print(f"{key:>30}  {result[key]}")
    print(f"{'faults':>30}  {len(result['faults'])}; recoveries {len(result['recoveries'])}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0 if result["unexpected"] == 0 and result["hangs"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
