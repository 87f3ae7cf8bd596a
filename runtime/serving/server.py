"""Start and stop the real `tritonserver` on a model repository.

The binary is the one bundled in the `nvidia-pytriton` wheel (Triton 2.51 with the Python
backend) unless a path is given. Facts this module acts on (see the project's notes on 2.51):
the Python stub for the running Python's version must sit in `backends/python/`; the stub finds
numpy and our packages through the virtual environment's `bin` first on PATH and ignores
PYTHONPATH; the server must die with its parent; a clean stop leaves no
`/dev/shm/<prefix>*` region behind, so every server gets its own prefix and `stop` removes what
a killed server left.

Model control, shared memory, logging and trace are never open without a key: with none given, a
random one is made for this server (`admin_key`, for its owner's own calls; never printed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runtime.errors import BackendError
from runtime.serving.names import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    CANCEL_HEADER,
    SERVER_REGION_PREFIX,
)

PR_SET_PDEATHSIG = 1
SHM_DIR = Path("/dev/shm")
EXIT_TIMEOUT_S = 10
WORKDIR_PREFIX = "adgen-triton-"
OWNER_FILE = "owner.pid"
# Endpoints that change or expose the server answer only requests carrying ADMIN_HEADER with
# the operator's key (load/unload models, register shared memory, set log or trace files).
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int


class Addressed:
    """What a client connects to, for a service listening on `host` with `ports` (a wildcard
    address is reached on loopback)."""

    host: str
    ports: Ports

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.ports.metrics}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host


@dataclass(frozen=True)
class Stub:
    """One Python-backend stub process: the model it serves and its shared-memory region."""

    pid: int
    model: str
    region: str


def free_ports(host: str = "127.0.0.1", count: int = 3) -> list[int]:
    """Ports nothing listens on right now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class Installation:
    """Where a tritonserver binary, its backends and the libraries it links live."""

    binary: Path
    backends: Path | None  # None: the binary's own default
    caches: Path | None
    library_path: Path | None
    stub: Path | None  # the Python backend stub for this Python, copied into backends/python


def bundled_installation() -> Installation:
    """The server inside the nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("the bundled tritonserver needs nvidia-pytriton: pip install 'adgen[triton]' (or pass --tritonserver)")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise BackendError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub} missing)")
    return Installation(
        binary=root / "bin" / "tritonserver",
        backends=root / "backends",
        caches=root / "caches",
        library_path=root.parent.parent / "nvidia_pytriton.libs",
        stub=stub,
    )


def given_installation(binary: Path) -> Installation:
    """A server installed the usual way (NGC image, /opt/tritonserver): its own backends."""
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise BackendError(f"--tritonserver {binary}: not an executable file")
    return Installation(binary=binary, backends=None, caches=None, library_path=None, stub=None)


def remove_stale_workdirs(root: Path | None = None) -> list[Path]:
    """Remove work folders of servers whose owning process is gone (killed before it could clean
    up; the server itself died with it). Returns what was removed."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        try:
            owner = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or still being written
        if not Path(f"/proc/{owner}").exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def interrupt(process: subprocess.Popen, timeout_s: float) -> int:
    """SIGINT, then SIGKILL if `process` has not exited `timeout_s` later; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class TritonServer(Addressed):
    """One tritonserver process on `repository`, bound to `host` (loopback by default).

        with TritonServer(repo) as server:      # started and ready
            server.grpc_url, server.http_url

    Models are loaded at start (`--model-control-mode explicit --load-model=*`), so they can
    be unloaded and loaded again through the repository API later. The server gets SIGTERM when
    the thread that started it ends (PR_SET_PDEATHSIG follows the thread): start it from one that
    lives as long as the server. Its restricted endpoints take `admin_key` (random if not given).
    """

    def __init__(
        self,
        repository: Path,
        installation: Installation | None = None,
        host: str = "127.0.0.1",
        ports: Ports | None = None,
        model_config_name: str | None = None,
        shm_default_bytes: int = 4 * 1024 * 1024,
        workdir: Path | None = None,
        remove_workdir: bool | None = None,
        admin_key: str | None = None,
    ):
        self.repository = Path(repository)
        self.installation = installation or bundled_installation()
        self.host = host
        self.ports = ports or Ports(*free_ports(host if host != "0.0.0.0" else "127.0.0.1"))
        self.model_config_name = model_config_name
        self.shm_default_bytes = shm_default_bytes
        self.shm_prefix = f"{SERVER_REGION_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._remove_workdir = workdir is None if remove_workdir is None else remove_workdir
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        self.log_path = self.workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        if admin_key is not None and (not admin_key or any(c in admin_key for c in ",:= \t\n")):
            raise BackendError(f"{ADMIN_KEY_ENV}: expected a non-empty key without ',', ':', '=' or whitespace")
        self.admin_key = admin_key or secrets.token_urlsafe(24)

    @property
    def admin_headers(self) -> dict[str, str]:
        """Headers the restricted endpoints need."""
        return {ADMIN_HEADER: self.admin_key}

    def command(self) -> list[str]:
        inst = self.installation
        args = [
            str(inst.binary),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            "--load-model=*",
            "--disable-auto-complete-config",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--backend-config=python,shm-default-byte-size={self.shm_default_bytes}",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            # the front's cancellation token reaches the model as a request parameter
            f"--http-header-forward-pattern={CANCEL_HEADER}",
        ]
        # The key is on the server's command line (readable in /proc by this user and root): it
        # guards the endpoints against other clients, not against local root.
        restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}"
        args += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
        if inst.backends is not None:
            args.append(f"--backend-directory={self.workdir / 'backends'}")
        if inst.caches is not None:
            args.append(f"--cache-directory={inst.caches}")
        if self.model_config_name:
            args.append(f"--model-config-name={self.model_config_name}")
        return args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.installation.library_path is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(self.installation.library_path), env.get("LD_LIBRARY_PATH", "")) if p
            )
        # The stub runs the first python3 on PATH's environment: ours, so it sees numpy and runtime.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def _prepare_backends(self) -> None:
        inst = self.installation
        if inst.backends is None:
            return
        target = self.workdir / "backends"
        for backend in inst.backends.iterdir():
            if backend.is_dir():
                (target / backend.name).mkdir(parents=True, exist_ok=True)
                for item in backend.iterdir():
                    if item.is_file():
                        os.symlink(item, target / backend.name / item.name)
        if inst.stub is not None:
            shutil.copy2(inst.stub, target / "python" / inst.stub.name)

    def start(self, timeout_s: float = 300.0, progress: Callable[[str], None] | None = None) -> "TritonServer":
        if self.process is not None:
            raise BackendError("server already started")
        remove_stale_workdirs()
        (self.workdir / OWNER_FILE).write_text(str(os.getpid()))
        self._prepare_backends()
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                cwd=self.workdir,  # the stub puts its cwd on sys.path: keep it a folder with no packages
                preexec_fn=_die_with_parent,
                start_new_session=True,  # Ctrl-C reaches us, and we stop the server in order
            )
        finally:
            log.close()
        if progress:
            progress(f"tritonserver pid {self.process.pid} starting; log {self.log_path}")
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self._client_host}:{self.ports.http}/v2/health/ready"
        while True:
            code = self.process.poll() if self.process else None
            if code is not None:
                raise BackendError(f"tritonserver exited with code {code} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening or not ready yet
            if time.monotonic() > deadline:
                raise BackendError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S + 20, stubs_grace_s: float = 10.0) -> int | None:
        """SIGINT (Triton unloads models and exits), SIGKILL after `timeout_s`; stubs still alive
        `stubs_grace_s` later are killed; then remove this server's shared-memory regions and work
        folder. Returns the exit code."""
        code = None
        if self.process is not None:
            code = interrupt(self.process, timeout_s)
            self._wait_for_stubs(stubs_grace_s)
            for pid in self.stub_pids():  # a stub still alive after the wait (a loaded machine): end it
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._wait_for_stubs(timeout_s=5.0)
        for region in self.leftover_regions():
            region.unlink(missing_ok=True)
        if self._remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def _wait_for_stubs(self, timeout_s: float = 10.0) -> None:
        """Stub processes outlive a killed server briefly; they exit when they see it gone."""
        deadline = time.monotonic() + timeout_s
        while self.stub_pids() and time.monotonic() < deadline:
            time.sleep(0.1)

    def stub_pids(self, model: str | None = None) -> list[int]:
        """Python backend stubs of this server, or only those serving `model`."""
        return [stub.pid for stub in self.stubs() if model is None or stub.model == model]

    def stubs(self) -> list[Stub]:
        """The live Python backend stubs of this server: they carry its shm prefix on their command
        line, after their model.py path (`<repository>/<model>/<version>/model.py`)."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(argv) > 2 and argv[0].endswith(b"triton_python_backend_stub") and argv[2].startswith(self.shm_prefix.encode()):
                model = Path(argv[1].decode(errors="replace")).parent.parent.name
                found.append(Stub(int(proc.name), model, argv[2].decode(errors="replace")))
        return found

    def leftover_regions(self) -> list[Path]:
        if not SHM_DIR.is_dir():
            return []
        return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(self.shm_prefix))

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
