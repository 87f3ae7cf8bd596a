"""`adgen serve` as an operator runs it: a child process on free loopback ports, the addresses it
printed, its stderr collected (so it never blocks on a full pipe), stopped by its caller (the
load benchmark, the tests of the exposed server)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.serving.server import interrupt

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Served:
    proc: subprocess.Popen
    lines: list[str]  # stdout up to "Ctrl-C stops it."
    errors: list[str] = field(default_factory=list)  # stderr so far

    @property
    def ready(self) -> bool:
        return bool(self.lines) and self.lines[-1].startswith("Ctrl-C")

    def _address(self, label: str) -> str:
        return next(line.split()[1] for line in self.lines if line.strip().startswith(label))

    @property
    def grpc_url(self) -> str:
        return self._address("gRPC")

    @property
    def http_url(self) -> str:
        return self._address("HTTP").removeprefix("http://")

    @property
    def metrics_url(self) -> str:
        return self._address("metrics")

    @property
    def first_server_pid(self) -> int:
        return int(self.lines[0].split("pid")[1])

    def server_pid(self) -> int | None:
        """The tritonserver `adgen serve` runs now (another one after a restart)."""
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    if ppid == self.proc.pid and b"tritonserver" in (proc / "cmdline").read_bytes().split(b"\0")[0]:
                        return int(proc.name)
                except (OSError, IndexError, ValueError):
                    continue
        return None

    def log(self) -> str:
        return "".join(self.lines) + "".join(self.errors)

    def stop(self, timeout_s: float = 60) -> int:
        return interrupt(self.proc, timeout_s)

    def family(self) -> list[int]:
        """`adgen serve`, its tritonserver and the stubs: every process of the service."""
        server = self.server_pid()
        pids = [self.proc.pid]
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid in (self.proc.pid, server):
                    pids.append(int(proc.name))
        return sorted(set(pids))


def serve(cache_root: Path | None, pipelines=("refadgen",), extra=(), env=None, timeout_s: float = 300,
          preset: str = "tiny") -> Served:
    """Start `adgen serve` (loopback, free ports; graphs from `cache_root`, else adgen's cache) and
    wait until it printed "Ctrl-C ..." (or exited, or `timeout_s` passed: then `ready` is False)."""
    environment = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    if cache_root is not None:
        environment["ADGEN_CACHE"] = str(cache_root)
    command = [sys.executable, "-m", "runtime.cli", "serve", "--preset", preset]
    for pipeline in pipelines:
        command += ["--pipeline", pipeline]
    proc = subprocess.Popen([*command, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment, cwd=REPO)
    served = Served(proc, [])
    printed: queue.Queue[str] = queue.Queue()

    def read_out():  # ends when the child's stdout closes
        for line in proc.stdout:
            printed.put(line)
        printed.put("")

    def read_err():
        for line in proc.stderr:
            served.errors.append(line)

    threading.Thread(target=read_out, daemon=True).start()
    threading.Thread(target=read_err, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    for _ in range(100):
        try:
            line = printed.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break  # nothing printed in time
        if not line:
            break
        served.lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    return served
