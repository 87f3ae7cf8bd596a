"""`adgen serve`: export (or find) each pipeline's graphs, write the run-time repository, start the
server behind its fronts, and keep it up.

The run-time repository is the committed one (same generator, same specs) with this host's
folders in each model's host.json: the graph folder of each pipeline, the folder `runtime` is
imported from (this process's, so the server runs the code the client runs), the weights, and the
folder where the HTTP front marks cancelled requests.

`Service` is what `adgen serve` runs: tritonserver on private loopback ports, the HTTP, gRPC and
metrics fronts (runtime/serving/front.py, grpc_front.py) on the public ones, the watchdog
(watchdog.py), and a supervisor that restarts tritonserver on the same ports when it dies, saying
why. The fronts keep the public ports open meanwhile and answer 503 / UNAVAILABLE, so a retrying
client gets through.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from runtime.artifacts.architecture import resolve_preset
from runtime.artifacts.graphs import GraphSource, ensure_graphs
from runtime.artifacts.weights import WeightsSource, parts_of
from runtime.errors import BackendError
from runtime.pipelines import get_pipeline
from runtime.presets import get_preset
from runtime.serving.admission import Admission
from runtime.serving.front import FrontLimits, FrontThread, HttpFront
from runtime.serving.grpc_front import GrpcFront, start_grpc_front
from runtime.serving.repository import RepositoryOptions, admission_bounds, write_repository
from runtime.serving.server import (
    OWNER_FILE,
    WORKDIR_PREFIX,
    Addressed,
    Installation,
    Ports,
    TritonServer,
    bundled_installation,
    free_ports,
    given_installation,
)
from runtime.serving.watchdog import ModelWatchdog

RUNTIME_ROOT = Path(__file__).resolve().parents[2]
CANCEL_FOLDER = "cancelled"
LOG_LINES = 20  # of a dead server's log, in the restart message


def write_runtime_repository(
    out: Path,
    pipelines: Sequence[str],
    preset: str,
    weights: Path | None = None,
    init_seed: int = 0,
    allow_random: Sequence[str] = (),
    cache_dir: Path | None = None,
    graphs_dir: Path | None = None,
    options: RepositoryOptions = RepositoryOptions(),
    progress: Callable[[str], None] | None = None,
) -> Path:

    source_weights = WeightsSource(seed=init_seed, path=weights, allow_random=frozenset(allow_random))
    size = resolve_preset(preset, source_weights)
    for name in pipelines:
        definition = get_pipeline(name)
        source_weights.check(name, parts_of(definition.specs(size)))
        source = GraphSource(
            pipeline=name, preset=size, weights=source_weights, precision=options.precision,
            cache_root=cache_dir, graphs_dir=graphs_dir,
        )
        folder = ensure_graphs(definition.specs(size, options.precision), source, progress)
        filled = replace(
            options,
            graphs_dir=str(Path(folder).resolve()),
            runtime_root=str(RUNTIME_ROOT),
            weights=str(weights.resolve()) if weights else "",
            init_seed=init_seed,
        )
        write_repository(out, size, [name], filled)
    return out


def start_server(
    pipelines: Sequence[str],
    preset: str,
    tritonserver: Path | None = None,
    host: str = "127.0.0.1",
    ports: Ports | None = None,
    timeout_s: float = 600.0,
    progress: Callable[[str], None] | None = None,
    admin_key: str | None = None,
    **repository: Any,
) -> TritonServer:
    """A started, ready tritonserver (no front) for `pipelines` at `preset`; stop it with `.stop()`.
    `repository` takes what `write_runtime_repository` does (weights, init_seed, allow_random,
    cache_dir, graphs_dir, options)."""
    installation: Installation = given_installation(tritonserver) if tritonserver else bundled_installation()
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    try:
        folder = write_runtime_repository(workdir / "repository", pipelines, preset, progress=progress, **repository)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server = TritonServer(
        folder, installation, host=host, ports=ports, workdir=workdir, remove_workdir=True, admin_key=admin_key
    )
    return server.start(timeout_s, progress)  # stops the server and removes workdir if it fails


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with code {code}"


class Service(Addressed):
    """tritonserver behind the fronts, restarted when it dies (module docstring).

        service = Service(["refadgen"], "tiny", progress=print).start()
        service.http_url, service.grpc_url, service.metrics_url      # the public addresses
        while ...: service.check()                                    # restart if dead, watchdog
        service.stop()
    """

    def __init__(
        self,
        pipelines: Sequence[str],
        preset: str,
        host: str = "127.0.0.1",
        ports: Ports | None = None,
        limits: FrontLimits = FrontLimits(),
        tritonserver: Path | None = None,
        admin_key: str | None = None,
        timeout_s: float = 600.0,
        watchdog_interval_s: float = 5.0,
        max_restarts: int = 5,
        restart_window_s: float = 300.0,
        progress: Callable[[str], None] | None = None,
        **repository: Any,
    ):
        self.pipelines, self.preset, self.host = list(pipelines), preset, host
        self.requested_ports = ports or Ports(0, 0, 0)
        self.limits = limits
        self.installation = given_installation(tritonserver) if tritonserver else bundled_installation()
        self.admin_key = admin_key
        self.timeout_s = timeout_s
        self.watchdog_interval_s = watchdog_interval_s
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        self.progress = progress or (lambda message: None)
        self.options: RepositoryOptions = repository.pop("options", RepositoryOptions())
        self.repository_options = repository
        self.workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        self.cancel_dir = self.workdir / CANCEL_FOLDER
        self.server: TritonServer | None = None
        self.watchdog: ModelWatchdog | None = None
        self.fronts: FrontThread | None = None
        self.http_front: HttpFront | None = None
        self.grpc_front: GrpcFront | None = None
        self.admission: Admission | None = None
        self.ports: Ports = Ports(0, 0, 0)  # public, once started
        self.restarts: list[tuple[float, str, float]] = []  # (when, why, seconds until ready again)
        self._runs = 0
        self._next_probe = 0.0

    def start(self) -> "Service":
        try:
            (self.workdir / OWNER_FILE).write_text(str(os.getpid()))  # swept if this process is killed
            self.cancel_dir.mkdir()
            options = replace(self.options, cancel_dir=str(self.cancel_dir))
            self.repository = write_runtime_repository(
                self.workdir / "repository", self.pipelines, self.preset, options=options, progress=self.progress,
                **self.repository_options,
            )
            # the fronts keep the overload bounds (no Triton queue policy: admission.py); the
            # component names, all the bounds need, do not depend on the weights' architecture
            self.admission = Admission(admission_bounds(get_preset(self.preset), self.pipelines, options))
            self.private = Ports(*free_ports("127.0.0.1"))
            self._start_server()
            self._start_fronts()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_server(self) -> None:
        self._runs += 1
        workdir = self.workdir / f"run{self._runs}"
        workdir.mkdir()
        self.server = TritonServer(self.repository, self.installation, host="127.0.0.1", ports=self.private,
                                   workdir=workdir, remove_workdir=False, admin_key=self.admin_key)
        self.admin_key = self.server.admin_key  # one key for every run of this service
        self.server.start(self.timeout_s, self.progress)
        if self.watchdog_interval_s > 0:
            self.watchdog = ModelWatchdog(self.server, progress=self.progress)
            self._next_probe = time.monotonic()

    def _start_fronts(self) -> None:
        try:
            self._listen()
        except OSError as e:  # a port taken, an address not ours
            raise BackendError(f"cannot listen on {self.host} ports {self.requested_ports}: {e}") from e

    def _listen(self) -> None:
        self.fronts = FrontThread()
        self.http_front = HttpFront(("127.0.0.1", self.private.http), self.limits, self.cancel_dir,
                                    admission=self.admission)
        http = self.fronts.serve_http(self.http_front, self.host, self.requested_ports.http)
        metrics = self.fronts.serve_http(HttpFront(("127.0.0.1", self.private.metrics), self.limits, read_only=True),
                                         self.host, self.requested_ports.metrics)
        grpc_front = GrpcFront(f"127.0.0.1:{self.private.grpc}", self.limits, admission=self.admission)
        self.grpc_front = grpc_front
        server, grpc = self.fronts.run(start_grpc_front(grpc_front, self.host, self.requested_ports.grpc))
        self.fronts.add(server)
        self.ports = Ports(http=http, grpc=grpc, metrics=metrics)

    def check(self) -> None:
        """Restart tritonserver if it died; run the watchdog when its interval has passed."""
        if not self.server.alive():
            self._restart()
            return
        if self.watchdog is not None and time.monotonic() >= self._next_probe:
            try:
                self.watchdog.step()
            except BackendError as e:  # the server may be going down; the next check decides
                self.progress(f"watchdog: {e}")
            self._next_probe = time.monotonic() + self.watchdog_interval_s

    def _restart(self) -> None:
        died = time.monotonic()
        code = self.server.process.returncode if self.server.process is not None else None
        why = _exit_reason(code)
        recent = [r for r in self.restarts if died - r[0] < self.restart_window_s]
        if len(recent) >= self.max_restarts:
            raise BackendError(f"tritonserver {why}, its {len(recent) + 1}th stop within {self.restart_window_s:.0f} s; "
                               f"not restarting. Last log lines:\n{self.server.log_tail(LOG_LINES)}")
        self.progress(f"tritonserver {why}; restarting on the same ports. Last log lines:\n{self.server.log_tail(LOG_LINES)}")
        self.server.stop(stubs_grace_s=0.0)  # its stubs are of no use: end them and their regions now
        try:
            self._start_server()
        except BackendError as e:  # counted; the next check tries again, up to max_restarts
            self.restarts.append((died, why, float("nan")))
            self.progress(f"tritonserver did not come back: {e}")
            return
        seconds = time.monotonic() - died
        self.restarts.append((died, why, seconds))
        self.progress(f"tritonserver ready again after {seconds:.1f} s (restart {len(self.restarts)})")

    def stop(self) -> int | None:
        """Close the fronts (no new requests, no idle keep-alive holding Triton's shutdown), stop
        tritonserver, remove the work folder. Returns tritonserver's exit code."""
        if self.fronts is not None:
            self.fronts.stop()
            if self.grpc_front is not None:
                self.fronts.run(self.grpc_front.close())
            self.fronts.close()
            self.fronts = None
        code = self.server.stop() if self.server is not None else None
        shutil.rmtree(self.workdir, ignore_errors=True)
        return code
