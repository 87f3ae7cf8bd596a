"""Bounded load with faults against `adgen serve` as an operator runs it (loopback only; stops by itself).

    python -m benchmarks.load_faults --preset tiny --minutes 10 --out results.jsonl

Starts `adgen serve` (its fronts, watchdog and supervisor; an admin key of its own) in a child
process, then for `--minutes` runs `--clients` threads sending whole requests through
`PipelineClient` (gRPC and HTTP in turn; retries with backoff for retriable errors): good requests
and, with `--bad-fraction`, bad ones (not an image, EPS, a GIF, a header claiming more pixels than
its data, truncated, empty mask, size off the grid, steps out of range, control characters). Every
`--fault-every` seconds a fault thread injects, in turn: SIGKILL of a component model's stub, of a
pipeline instance's stub, of tritonserver itself; an operator's unload and load of the pipeline
model; a burst past the queue bound; and attacks that must not take the server down (a JSON body
nested 200,000 deep, a 300 MB body, slow uploads that stop halfway, a gRPC message over the cap).
Once a fault is injected (a kill at once; an unload after its load returned; a burst or the attacks
when their last request is answered) it sends a one-step probe every 0.25 s until one succeeds:
that is the fault's recovery time.

Prints one table and writes one JSON line: sent, images (good requests that got their image),
clear errors (bad requests refused with 400 naming the field; requests answered 503 / unavailable
after their retries), unexpected (any other outcome: a good request refused, a bad one accepted, a
500), hangs (no answer within `--hang-s`), retries (by error class), p50/p99 latency, RSS of
tritonserver + stubs and of the `adgen serve` process (start, peak, end), how long each restart
and each watchdog reload took (from `adgen serve`'s log), and each fault with its recovery time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.served import Served, serve


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


@dataclass
class Memory:
    """RSS samples (MiB) of tritonserver + its stubs, and of the `adgen serve` process (the fronts)."""

    server: list[float] = field(default_factory=list)
    front: list[float] = field(default_factory=list)

    def sample(self, served: Served) -> None:
        family = served.family()
        front = _rss_kib([served.proc.pid]) / 1024
        self.server.append(_rss_kib([p for p in family if p != served.proc.pid]) / 1024)
        self.front.append(front)

    def figures(self) -> dict:
        return {f"{name}_rss_mib": {"start": round(v[0], 1), "peak": round(max(v), 1), "end": round(v[-1], 1)}
                for name, v in (("server_and_stubs", self.server), ("adgen_serve", self.front)) if v}


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


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _inputs(folder: Path, preset) -> tuple[dict, list[tuple[str, dict, str]]]:
    from PIL import Image

    from runtime.inputs.examples import draw_product

    w, h = preset.default_width, preset.default_height
    good = folder / "product.png"
    draw_product(w, h).save(good)
    (folder / "text.png").write_text("not an image")
    (folder / "truncated.png").write_bytes(good.read_bytes()[:200])
    (folder / "product.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 16 16 rectfill\n%%EOF\n")
    (folder / "liar.png").write_bytes(_png_claiming(6000, 6000))
    Image.new("RGB", (w, h)).save(folder / "product.gif")
    Image.new("RGBA", (w, h), (10, 10, 10, 0)).save(folder / "empty_mask.png")
    base = {"product": good, "prompt": "a sneaker on a wooden table"}
    bad = [
        ("not an image", {**base, "product": folder / "text.png"}, "product"),
        ("EPS", {**base, "product": folder / "product.eps"}, "product"),
        ("GIF", {**base, "product": folder / "product.gif"}, "product"),
        ("header claims 6000x6000", {**base, "product": folder / "liar.png"}, "product"),
        ("truncated", {**base, "product": folder / "truncated.png"}, "product"),
        ("empty mask", {**base, "product": folder / "empty_mask.png"}, "mask"),
        ("width off grid", {**base, "width": w + 3, "height": h}, "width"),
        ("steps out of range", {**base, "steps": 0}, "steps"),
        ("control character", {**base, "prompt": "shoe\x00"}, "prompt"),
        ("empty prompt", {**base, "prompt": " "}, "prompt"),
    ]
    return base, bad


def _raw_http(url: str, data: bytes, wait_s: float = 30.0, pause_s: float = 0.0) -> int | None:
    """The status the HTTP front answers `data` with (sent, then `pause_s` of silence)."""
    host, port = url.split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=wait_s) as s:
            s.sendall(data)
            time.sleep(pause_s)
            answer = s.recv(256)
        return int(answer.split(b" ", 2)[1]) if answer else None
    except (OSError, IndexError, ValueError):
        return None


def _grpc_oversized(url: str, size: int) -> str:
    """The status of a plain tritonclient gRPC request carrying `size` bytes of product."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        product = grpcclient.InferInput("product", [1], "BYTES")
        product.set_data_from_numpy(np.array([b"\0" * size], dtype=np.object_))
        prompt = grpcclient.InferInput("prompt", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
        client.infer("refadgen", [product, prompt])
        return "accepted"
    except InferenceServerException as e:
        return str(e.status())
    finally:
        client.close()


def _attacks(served: Served) -> dict:
    """Requests that took 2.51 down or swelled it; each must be refused, the server up."""
    url = served.http_url
    head = "POST /v2/models/refadgen/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n"
    deep = b"[" * 200_000
    outcome = {"deep_json": _raw_http(url, head.format(len(deep)).encode() + deep),
               "body_300mb": _raw_http(url, head.format(300 << 20).encode() + b"0" * 65536)}
    slow = [threading.Thread(target=lambda: outcome.setdefault("slow_upload", _raw_http(
        url, head.format(1000).encode() + b'{"inputs": [', wait_s=60)), daemon=True) for _ in range(8)]
    for t in slow:
        t.start()
    outcome["grpc_65mib"] = _grpc_oversized(served.grpc_url, 65 << 20)
    for t in slow:
        t.join(60)
    return outcome


def run(args: argparse.Namespace) -> dict:
    from runtime.errors import ServerBusyError, ServerError, ServerRequestError, ServerUnavailableError
    from runtime.pipelines import get_pipeline
    from runtime.presets import get_preset
    from runtime.serving.client import NO_RETRY, RetryPolicy
    from runtime.serving.names import ADMIN_HEADER, ADMIN_KEY_ENV
    from runtime.serving.remote import PipelineClient

    preset = get_preset(args.preset)
    definition = get_pipeline("refadgen")
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    key = secrets.token_hex(16)  # the operator's: this benchmark unloads and loads a model
    served = serve(args.cache_dir, extra=(
        "--instances", str(args.instances), "--queue-size", str(args.queue_size),
        "--watchdog-interval", str(args.watchdog_interval)), env={ADMIN_KEY_ENV: key}, preset=args.preset)
    if not served.ready:
        served.stop()
        raise SystemExit(f"adgen serve did not start:\n{served.log()}")
    tally, memory = Tally(), Memory()
    deadline = time.monotonic() + 60 * args.minutes
    stop = threading.Event()
    folder = Path(tempfile.mkdtemp(prefix="adgen-load-"))
    good, bad = _inputs(folder, preset)
    urls = (served.grpc_url, f"http://{served.http_url}")
    memory.sample(served)

    def one(rng: random.Random, url: str, retry: RetryPolicy) -> None:
        is_bad = rng.random() < args.bad_fraction
        name, options, field_name = rng.choice(bad) if is_bad else ("good", dict(good), "")
        options = {**options, "seed": rng.randrange(1 << 30), "steps": options.get("steps", args.steps)}
        started = time.monotonic()
        outcome, detail = "unexpected", ""
        try:
            with PipelineClient(url, timeout_s=args.hang_s, retry=retry) as client:
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
            outcome = "hang" if e.status in ("StatusCode.DEADLINE_EXCEEDED", "timeout") else "unexpected"
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
        retry = RetryPolicy(attempts=6, base_s=0.5, cap_s=4.0)
        while time.monotonic() < deadline and not stop.is_set():
            one(rng, urls[index % 2], retry)

    def recovered_after(started: float) -> float | None:
        """Seconds from `started` until a one-step request succeeds (probes every 0.25 s, 120 s at most)."""
        while time.monotonic() - started < 120 and not stop.is_set():
            try:
                with PipelineClient(served.grpc_url, timeout_s=60, retry=NO_RETRY) as client:
                    client.generate(definition, {**good, "steps": 1})
                return round(time.monotonic() - started, 2)
            except ServerError:
                time.sleep(0.25)
        return None

    def admin(path: str) -> int | None:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(f"http://{served.http_url}{path}", data=b"{}", headers={ADMIN_HEADER: key})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    def stub_of(model: str) -> int | None:
        server = served.server_pid()
        for pid in served.family():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == server and len(argv) > 1 and argv[1].endswith(f"/{model}/1/model.py".encode()):
                return pid
        return None

    def faults() -> None:
        kinds = ("kill component stub", "attacks", "kill pipeline stub", "burst", "kill tritonserver", "unload pipeline")
        k = 0
        while not stop.wait(args.fault_every) and time.monotonic() < deadline - 10:
            kind = kinds[k % len(kinds)]
            k += 1
            record: dict = {"fault": kind}
            started = time.monotonic()
            try:
                inject(kind, k, record)
            except Exception as e:  # a benchmark that stops injecting would report a calm run
                record["error"] = f"{type(e).__name__}: {e}"
            record["inject_s"] = round(time.monotonic() - started, 2)
            record["recovery_s"] = recovered_after(time.monotonic())
            tally.faults.append(record)
            log(f"fault {kind}: recovered in {record['recovery_s']} s")

    def inject(kind: str, k: int, record: dict) -> None:
        if kind == "kill component stub":
            record["model"] = random.Random(k).choice(["refadgen_unet", "refadgen_vae_decoder", "refadgen_text_encoder"])
            pid = stub_of(record["model"])
            if pid:
                os.kill(pid, signal.SIGKILL)
        elif kind == "kill pipeline stub":
            pid = stub_of("refadgen")
            if pid:
                os.kill(pid, signal.SIGKILL)
        elif kind == "kill tritonserver":
            pid = served.server_pid()
            if pid:
                os.kill(pid, signal.SIGKILL)
        elif kind == "unload pipeline":
            record["unload"] = admin("/v2/repository/models/refadgen/unload")
            time.sleep(2.0)
            record["load"] = admin("/v2/repository/models/refadgen/load")
        elif kind == "burst":
            burst = [threading.Thread(target=one, args=(random.Random(k * 100 + i), urls[i % 2], NO_RETRY))
                     for i in range(2 * (args.instances + args.queue_size))]
            for t in burst:
                t.start()
            for t in burst:
                t.join(args.hang_s + 10)
            record["requests"] = len(burst)
        else:
            record["refused"] = _attacks(served)

    def sample_memory() -> None:
        while not stop.wait(2.0):
            memory.sample(served)

    threads = [threading.Thread(target=faults), threading.Thread(target=sample_memory)]
    threads += [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
    started = time.monotonic()
    try:
        for t in threads:
            t.start()
        for t in threads[2:]:
            t.join(60 * args.minutes + args.hang_s + 60)
    finally:
        stop.set()
        for t in threads[:2]:
            t.join(args.hang_s + 120)
        duration = time.monotonic() - started
        memory.sample(served)
        code = served.stop()
    log_text = served.log()
    latencies = np.array(tally.latencies_s) if tally.latencies_s else np.zeros(1)
    return {
        "benchmark": "load_faults", "preset": args.preset, "minutes": args.minutes, "duration_s": round(duration, 1),
        "clients": args.clients, "steps": args.steps, "bad_fraction": args.bad_fraction, "fault_every_s": args.fault_every,
        "sent": tally.sent, "images": tally.images, "clear_errors": tally.clear, "of_which_busy_or_unavailable": tally.busy,
        "unexpected": tally.unexpected, "hangs": tally.hangs, "retries": dict(tally.retries),
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
        "latency_p99_s": round(float(np.percentile(latencies, 99)), 3),
        **memory.figures(),
        "restarts_ready_after_s": _seconds_after(log_text, "tritonserver ready again after "),
        "watchdog_reloads_s": _seconds_after(log_text, ": reloaded in "),
        "old_stubs_ended": log_text.count("ended stub"),
        "faults": tally.faults,
        "adgen_serve_exit_code": code, "unexpected_samples": tally.unexpected_samples,
    }


def _seconds_after(log: str, marker: str) -> list[float]:
    """The durations `adgen serve` logged after `marker` ("... ready again after 5.6 s")."""
    return [float(part.split(" s", 1)[0]) for part in log.split(marker)[1:]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--bad-fraction", type=float, default=0.3)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--queue-size", type=int, default=2)
    parser.add_argument("--fault-every", type=float, default=20.0, help="seconds between injected faults")
    parser.add_argument("--watchdog-interval", type=float, default=5.0, help="adgen serve's (its default)")
    parser.add_argument("--hang-s", type=float, default=120.0, help="a request unanswered this long is a hang")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="append the result as one JSON line")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 60:
        parser.error("--minutes: expected a number in (0, 60]")
    result = run(args)
    for key in ("sent", "images", "clear_errors", "of_which_busy_or_unavailable", "unexpected", "hangs",
                "latency_p50_s", "latency_p99_s", "server_and_stubs_rss_mib", "adgen_serve_rss_mib",
                "restarts_ready_after_s", "watchdog_reloads_s", "old_stubs_ended", "adgen_serve_exit_code"):
        print(f"{key:>30}  {result.get(key)}")
    for fault in result["faults"]:
        print(f"{fault['fault']:>30}  recovered in {fault['recovery_s']} s")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0 if result["unexpected"] == 0 and result["hangs"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
