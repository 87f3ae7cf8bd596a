"""Detect and repair Python-backend models whose stub process died.

Triton 2.51 does not restart a crashed Python stub: the model and the server keep reporting
ready while every request to it fails with 500 "Stub process ... is not healthy". The only
repair is unloading the model and loading it again (explicit model-control mode, which
`adgen serve` uses).

`ModelWatchdog.step()` sends each ready model a canary: a request well-formed for Triton (right
names, dtypes and shapes, so the core passes it on) that the model's own code must refuse, a
component a NaN in a float input, a pipeline a product that is not an image. A live stub answers
400 (INVALID_ARG) from our validation without running a network, so the probe costs
milliseconds on any preset (a component with integer inputs only, the text encoder, gets a valid
request at its smallest shape, answered 200); a dead one answers "is not healthy" and the model
is reloaded.
Canaries appear in Triton's failure counts. A busy model (503: queue full) or a canary that waits
past `timeout_s` is left alone: slow is not broken. Models the operator unloaded are not loaded
back; a model the watchdog unloaded and could not load is tried again at the next step.

Triton 2.51 cannot fully retire a version whose stub died after a request reached it: it stays
UNLOADING until the server exits (see `recover`). Serving recovers; a clean shutdown does not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from runtime.errors import BackendError
from runtime.pipelines import get_pipeline
from runtime.serving.names import ConfigKey, config_preset, read_parameters
from runtime.serving.protocol import OptionKind, request_tensors, to_wire
from runtime.specs.core import Precision

CANARY_BYTES = b"adgen-watchdog-canary: not an image"


@dataclass(frozen=True)
class Probe:
    model: str
    verdict: str  # "alive", "dead", "busy", "timeout", "unexpected"
    detail: str = ""


@dataclass(frozen=True)
class Recovery:
    model: str
    reason: str
    seconds: float
    ok: bool
    detail: str = ""


def canary_inputs(parameters: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The canary request for a model with these adgen config parameters."""
    definition = get_pipeline(parameters[ConfigKey.PIPELINE])
    component = parameters.get(ConfigKey.COMPONENT)
    if not component:
        feed = {}
        for t in request_tensors(definition):
            if not t.required:
                continue
            feed[t.name] = {
                OptionKind.FILE: np.array([CANARY_BYTES], dtype=np.object_),
                OptionKind.TEXT: np.array([b"canary"], dtype=np.object_),
                OptionKind.TEXTS: np.array([b"canary"], dtype=np.object_),
                OptionKind.INT: np.array([1], dtype=np.int64),
                OptionKind.FLOAT: np.array([1.0], dtype=np.float64),
            }[t.kind]
        return feed
    preset = config_preset(parameters)
    spec = definition.specs(preset, Precision(parameters[ConfigKey.PRECISION]))[component]
    feed = spec.sample_inputs(np.random.default_rng(0), spec.env_at("min"))
    floating = [n for n, a in feed.items() if np.issubdtype(a.dtype, np.floating)]
    if floating:
        feed[floating[0]] = feed[floating[0]].copy()
        feed[floating[0]].flat[0] = np.nan  # refused by the model's spec check: no network runs
    # else (token ids only: the text encoder) a valid request at the smallest shape, which runs
    return to_wire(spec, feed)


class ModelWatchdog:
    """Canary every ready adgen model of the server at `http_url`; reload the dead ones.

        watchdog = ModelWatchdog(server.http_url, server.admin_headers, progress=log)
        while serving: watchdog.step(); time.sleep(interval)
    """

    def __init__(
        self,
        http_url: str,
        admin_headers: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
        load_timeout_s: float = 300.0,
        unload_wait_s: float = 5.0,
        progress: Callable[[str], None] | None = None,
    ):
        self.http_url = http_url
        self.admin_headers = dict(admin_headers or {})
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s
        self.unload_wait_s = unload_wait_s
        self.progress = progress or (lambda message: None)
        self.recoveries: list[Recovery] = []
        self._canaries: dict[str, dict[str, np.ndarray]] = {}
        self._pending_load: set[str] = set()  # unloaded by us, load failed: try again

    def _client(self, timeout_s: float) -> Any:
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(self.http_url, connection_timeout=timeout_s, network_timeout=timeout_s)

    def step(self) -> list[Recovery]:
        """Probe every ready model once, reload those whose stub is dead. Returns this step's
        recoveries. A client is opened and closed per step: an idle keep-alive connection would
        make the server's shutdown wait (Triton 2.51)."""
        done = []
        client = self._client(self.timeout_s)
        try:
            for model in sorted(self._pending_load):
                done.append(self._load_again(client, model, "load failed before"))
            for model in self._ready_models(client):
                probe = self.probe(client, model)
                if probe.verdict == "dead":
                    done.append(self.recover(client, model, probe.detail))
                elif probe.verdict == "unexpected":
                    self.progress(f"watchdog: {model}: unexpected canary answer: {probe.detail}")
        finally:
            client.close()
        self.recoveries.extend(done)
        return done

    def _ready_models(self, client: Any) -> list[str]:
        from tritonclient.utils import InferenceServerException

        try:
            index = client.get_model_repository_index(headers=self.admin_headers or None)
        except (InferenceServerException, OSError) as e:
            raise BackendError(f"watchdog: cannot read the model index of {self.http_url}: {e}") from e
        return [m["name"] for m in index if m.get("state") == "READY" and m["name"] not in self._pending_load]

    def _canary(self, client: Any, model: str) -> dict[str, np.ndarray] | None:
        if model not in self._canaries:
            parameters = read_parameters(client.get_model_config(model))
            if ConfigKey.PIPELINE not in parameters:
                return None  # not one of ours: no canary we know to be refused
            self._canaries[model] = canary_inputs(parameters)
        return self._canaries[model]

    def probe(self, client: Any, model: str) -> Probe:
        from tritonclient.utils import InferenceServerException

        from runtime.serving.client import http_inputs

        try:
            feed = self._canary(client, model)
        except (InferenceServerException, OSError) as e:
            return Probe(model, "unexpected", f"config: {e}")
        if feed is None:
            return Probe(model, "alive", "not an adgen model: not probed")
        try:
            client.infer(model, http_inputs(feed))
            if not any(np.issubdtype(a.dtype, np.floating) for a in feed.values()):
                return Probe(model, "alive")
        except InferenceServerException as e:
            message, status = e.message() or "", str(e.status() or "")
            if "is not healthy" in message:
                return Probe(model, "dead", message)
            if status == "400":
                return Probe(model, "alive")
            if status == "503":
                return Probe(model, "busy", message)
            return Probe(model, "unexpected", f"{status}: {message}")
        except OSError as e:  # includes socket timeouts: the canary waited behind real work
            return Probe(model, "timeout", f"{type(e).__name__}: {e}")
        return Probe(model, "unexpected", "the canary was accepted")

    def recover(self, client: Any, model: str, reason: str) -> Recovery:
        from tritonclient.utils import InferenceServerException

        self.progress(f"watchdog: {model}: {reason.splitlines()[0]}; reloading")
        started = time.monotonic()
        try:
            client.unload_model(model, headers=self.admin_headers or None)
        except (InferenceServerException, OSError) as e:
            return Recovery(model, reason, time.monotonic() - started, False, f"unload: {e}")
        self._pending_load.add(model)
        # 2.51's unload returns at once and finishes ~2 s later, but only if no request reached the
        # dead stub: after one has (the canary always has), the old version stays UNLOADING for
        # good. Loading then starts a new version beside it, which serves; the stuck one stays
        # until the process exits, whose shutdown waits out --exit-timeout-secs and exits 1.
        deadline = time.monotonic() + self.unload_wait_s
        stuck = False
        while self._state(client, model) in ("READY", "UNLOADING"):
            if time.monotonic() > deadline:
                stuck = True
                self.progress(f"watchdog: {model}: old version still unloading after {self.unload_wait_s:.0f} s; loading beside it")
                break
            time.sleep(0.2)
        recovery = self._load_again(client, model, reason, started)
        if stuck:
            recovery = Recovery(recovery.model, recovery.reason, recovery.seconds, recovery.ok,
                                (recovery.detail + "; " if recovery.detail else "") + "old version stuck UNLOADING")
        return recovery

    def _state(self, client: Any, model: str) -> str:
        from tritonclient.utils import InferenceServerException

        try:
            index = client.get_model_repository_index(headers=self.admin_headers or None)
        except (InferenceServerException, OSError):
            return "UNKNOWN"  # the server is not answering: the load will tell
        return next((m.get("state", "") for m in index if m["name"] == model), "")

    def _load_again(self, client: Any, model: str, reason: str, started: float | None = None) -> Recovery:
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        started = time.monotonic() if started is None else started
        loader = httpclient.InferenceServerClient(
            self.http_url, connection_timeout=self.load_timeout_s, network_timeout=self.load_timeout_s
        )
        try:
            loader.load_model(model, headers=self.admin_headers or None)  # returns when loaded (or failed)
        except (InferenceServerException, OSError) as e:
            self.progress(f"watchdog: {model}: load failed ({e}); will try again")
            return Recovery(model, reason, time.monotonic() - started, False, f"load: {e}")
        finally:
            loader.close()
        self._pending_load.discard(model)
        self._canaries.pop(model, None)
        seconds = time.monotonic() - started
        self.progress(f"watchdog: {model}: reloaded in {seconds:.1f} s")
        return Recovery(model, reason, seconds, True)
