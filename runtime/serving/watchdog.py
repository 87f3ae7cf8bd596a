"""Keep a local tritonserver's Python-backend models alive and their memory bounded, without
sending them a single request (so every model's statistics count user traffic only).

Triton 2.51 does not restart a crashed Python stub: the model and the server keep reporting
ready while every request that reaches the dead instance fails with 500 "Stub process ... is
not healthy". `ModelWatchdog.step()` watches the stub processes themselves instead (each carries
its model's path and its shared-memory region on its command line):

- **A stub died** (one of a model's current stubs is gone): the model is reloaded. Loading a
  loaded model is a no-op in 2.51 unless one of its files changed, so the watchdog touches its
  `model.py` first; the new version serves as soon as it is loaded, the old one is never unloaded
  (2.51 keeps a version whose stub died UNLOADING until exit), so its surviving stubs are ended
  once idle (below).
- **Memory**: a stub's shared-memory region only grows (to the largest tensors it has carried);
  a model whose region passed `shm_limit_bytes` is reloaded the same way, and its old stubs, being
  healthy, exit with their regions.
- **Old stubs** (of a version a reload replaced) are killed once their CPU time has not moved for
  `idle_s` seconds: whatever they were finishing is finished.

A model the operator unloaded is left alone; one the watchdog could not load is tried again at
the next step. A model reloaded by someone else is recognized (a full set of new stubs).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from runtime.errors import BackendError
from runtime.serving.names import ConfigKey, read_parameters
from runtime.serving.server import SHM_DIR, TritonServer

VERSION_FOLDER = "1"
SHM_LIMIT_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Recovery:
    model: str
    reason: str
    seconds: float
    ok: bool
    detail: str = ""


def _cpu_ticks(pid: int) -> int | None:
    """utime + stime of `pid` (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def _region_bytes(region: str) -> int:
    """Bytes of a shared-memory region in use (tmpfs pages, not its nominal size)."""
    try:
        return (SHM_DIR / region).stat().st_blocks * 512
    except OSError:
        return 0


class ModelWatchdog:
    """Watch the stubs of every ready adgen model of `server`; reload what died or grew.

        watchdog = ModelWatchdog(server, progress=log)
        while serving: watchdog.step(); time.sleep(interval)
    """

    def __init__(
        self,
        server: TritonServer,
        load_timeout_s: float = 300.0,
        idle_s: float = 10.0,
        shm_limit_bytes: int = SHM_LIMIT_BYTES,
        progress: Callable[[str], None] | None = None,
    ):
        self.server = server
        self.load_timeout_s = load_timeout_s
        self.idle_s = idle_s
        self.shm_limit_bytes = shm_limit_bytes
        self.progress = progress or (lambda message: None)
        self.recoveries: list[Recovery] = []
        self.ended: list[int] = []  # old stubs this watchdog killed
        self._current: dict[str, set[int]] = {}  # model -> its current version's stubs
        self._retiring: dict[int, tuple[int, float]] = {}  # old stub -> (CPU ticks, when they last moved)
        self._pending_load: set[str] = set()  # reloaded by us, the load failed: try again
        self._instances: dict[str, int] = {}  # adgen model -> its stubs when healthy (0: not ours)

    def _client(self, timeout_s: float) -> Any:
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(self.server.http_url, connection_timeout=timeout_s, network_timeout=timeout_s)

    def step(self) -> list[Recovery]:
        """Look at every ready model once; reload those with a dead stub or an oversized region;
        end old stubs gone idle. Returns this step's recoveries. A client is opened and closed per
        step: an idle keep-alive connection would make the server's shutdown wait (Triton 2.51)."""
        done = []
        client = self._client(30.0)
        try:
            for model in sorted(self._pending_load):
                done.append(self._reload(model, "load failed before", set()))
            stubs: dict[str, dict[int, str]] = {}
            for stub in self.server.stubs():
                stubs.setdefault(stub.model, {})[stub.pid] = stub.region
            ready = self._ready_models(client)
            for model in list(self._current):
                if model not in ready:
                    del self._current[model]  # unloaded by the operator: a later load starts afresh
            for model in ready:
                if self._instances_of(client, model):
                    recovery = self._check(model, stubs.get(model, {}))
                    if recovery is not None:
                        done.append(recovery)
        finally:
            client.close()
        self._end_idle_stubs()
        self.recoveries.extend(done)
        return done

    def _check(self, model: str, live: dict[int, str]) -> Recovery | None:
        pids = set(live) - set(self._retiring)
        current = self._current.get(model)
        if current is None:  # first sight: what runs now is the current version, if it is complete
            if len(pids) < self._instances[model]:
                return self._reload(model, f"{len(pids)} of its {self._instances[model]} stub processes alive", pids)
            self._current[model] = pids
            return None
        gone = current - pids
        if gone:
            fresh = pids - current
            if fresh and len(fresh) >= len(current):  # reloaded by someone else
                self._retire(current & pids)
                self._current[model] = fresh
                return None
            return self._reload(model, f"stub process {min(gone)} exited", current & pids)
        grown = max((_region_bytes(live[pid]) for pid in current if pid in live), default=0)
        if grown > self.shm_limit_bytes:
            return self._reload(model, f"shared memory grew to {grown // 2**20} MiB", current)
        return None

    def _ready_models(self, client: Any) -> list[str]:
        from tritonclient.utils import InferenceServerException

        try:
            index = client.get_model_repository_index(headers=self.server.admin_headers)
        except (InferenceServerException, OSError) as e:
            raise BackendError(f"watchdog: cannot read the model index: {e}") from e
        return [m["name"] for m in index if m.get("state") == "READY" and m["name"] not in self._pending_load]

    def _instances_of(self, client: Any, model: str) -> int:
        """How many stubs `model` runs when healthy (its instance groups); 0 for a model not ours."""
        from tritonclient.utils import InferenceServerException

        if model not in self._instances:
            try:
                config = client.get_model_config(model)
            except (InferenceServerException, OSError):
                return 0  # going away: next step
            ours = ConfigKey.PIPELINE in read_parameters(config)
            self._instances[model] = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) if ours else 0
        return self._instances[model]

    def _reload(self, model: str, reason: str, old: set[int]) -> Recovery:
        """Load `model` again beside its current version; `old` stubs retire once idle."""
        from tritonclient.utils import InferenceServerException

        self.progress(f"watchdog: {model}: {reason}; reloading")
        started = time.monotonic()
        self._retire(old)
        before = set(self.server.stub_pids(model))
        # 2.51 reloads a loaded model only if one of its files changed
        os.utime(self.server.repository / model / VERSION_FOLDER / "model.py")
        loader = self._client(self.load_timeout_s)
        try:
            loader.load_model(model, headers=self.server.admin_headers)  # returns when loaded (or failed)
        except (InferenceServerException, OSError) as e:
            self._pending_load.add(model)
            self._current.pop(model, None)
            self.progress(f"watchdog: {model}: load failed ({e}); will try again")
            return Recovery(model, reason, time.monotonic() - started, False, f"load: {e}")
        finally:
            loader.close()
        self._pending_load.discard(model)
        self._retire(before - old)  # a healthy version replaced by the reload exits by itself, or is ended
        self._current[model] = set(self.server.stub_pids(model)) - before
        seconds = time.monotonic() - started
        self.progress(f"watchdog: {model}: reloaded in {seconds:.1f} s")
        return Recovery(model, reason, seconds, True)

    def _retire(self, pids: set[int]) -> None:
        now = time.monotonic()
        for pid in pids:
            ticks = _cpu_ticks(pid)
            if ticks is not None:
                self._retiring.setdefault(pid, (ticks, now))

    def _end_idle_stubs(self) -> None:
        now = time.monotonic()
        for pid, (ticks, since) in list(self._retiring.items()):
            current = _cpu_ticks(pid)
            if current is None:
                del self._retiring[pid]
            elif current != ticks:
                self._retiring[pid] = (current, now)
            elif now - since >= self.idle_s:
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.ended.append(pid)
                    self.progress(f"watchdog: ended stub {pid} of a replaced version (idle {now - since:.0f} s)")
                except ProcessLookupError:
                    pass
                del self._retiring[pid]

    @property
    def retiring(self) -> list[int]:
        """Old stubs waiting to go idle (or to exit by themselves)."""
        return sorted(self._retiring)
