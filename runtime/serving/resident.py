"""Per-request invariants resident in a component model: sent once per request, reused every step.

Within one loop over a request (`runtime.backends.base.RequestScope`: the latent loop or a box
loop) the inputs a component's spec marks `invariant` (text embeddings, the AFM keys and values,
ControlNet conditioning, style residuals, feature maps) do not change. A caller serving the loop
from elsewhere (`BlsComponent` in the server, `TritonComponent` in a client) sends them with the
first step's call, naming the scope's key in the request parameter CONTEXT_PARAMETER; the model
keeps them (`ResidentStore`) and later calls carry the key and what changes per step only (the
latents, the timestep, a ControlNet's residuals). The last step's call carries END_PARAMETER and
the model drops them after running it.

- Keys are the callers' random 128-bit tokens: a client cannot name another request's tensors.
- The store is bounded (entries, bytes) and forgets what was not used for `ttl_s`, so a request
  that never reaches its last step (cancelled, failed, its client gone) leaks nothing for long.
- A key the model does not hold (evicted, expired, another instance, a restarted model) is
  answered with UNKNOWN_CONTEXT; the caller sends the full feed again, so eviction costs a resend,
  never a wrong result.
- The value scan at the model's boundary covers what crosses: resident tensors were scanned when
  they arrived.
- Steps of several requests batched into one execution each take their own resident tensors.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from runtime.backends.base import current_scope
from runtime.serving.names import MISSING_INPUTS_MESSAGE

CONTEXT_PARAMETER = "adgen_context"  # request parameter: the request scope's key
END_PARAMETER = "adgen_context_end"  # request parameter: drop the key's tensors after this call
UNKNOWN_CONTEXT = "adgen context unknown"  # in the model's answer to a key it does not hold


@dataclass(frozen=True)
class ResidentBounds:
    entries: int = 16  # requests whose invariants one model process keeps
    mib: float = 2048.0  # their bytes, all together
    ttl_s: float = 300.0  # forgotten when unused this long

    def __post_init__(self) -> None:
        if self.entries < 1 or not self.mib > 0 or not self.ttl_s > 0:
            raise ValueError(f"resident bounds: entries >= 1, mib > 0 and ttl_s > 0 expected, got {self}")

    def text(self) -> str:
        """The config parameter's value (ConfigKey.RESIDENT)."""
        return f"{self.entries},{self.mib:g},{self.ttl_s:g}"

    @classmethod
    def parse(cls, text: str) -> "ResidentBounds | None":
        """ConfigKey.RESIDENT's value; "" (or absent) is None: the model keeps nothing."""
        if not text:
            return None
        entries, mib, ttl = text.split(",")
        return cls(int(entries), float(mib), float(ttl))


@dataclass
class _Entry:
    arrays: dict[str, np.ndarray]
    nbytes: int
    used: float


class ResidentStore:
    """key -> the invariant inputs of one request, least recently used first out."""

    def __init__(self, bounds: ResidentBounds, clock: Callable[[], float] = time.monotonic):
        self.bounds = bounds
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.stored = self.reused = self.unknown = self.evicted = self.expired = self.ended = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def put(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Keep copies of `arrays` under `key` (replacing what it held); evicts the least recently
        used entries past the bounds. A feed larger than the byte bound alone is not kept."""
        kept = {n: np.array(a, copy=True) for n, a in arrays.items()}  # the request's buffers are Triton's
        nbytes = sum(a.nbytes for a in kept.values())
        with self._lock:
            self._entries.pop(key, None)
            self._expire()
            if nbytes > self.bounds.mib * 2**20:
                return
            self._entries[key] = _Entry(kept, nbytes, self.clock())
            self.stored += 1
            total = sum(e.nbytes for e in self._entries.values())
            while len(self._entries) > self.bounds.entries or total > self.bounds.mib * 2**20:
                _, old = self._entries.popitem(last=False)
                total -= old.nbytes
                self.evicted += 1

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            if entry is None:
                self.unknown += 1
                return None
            entry.used = self.clock()
            self._entries.move_to_end(key)
            self.reused += 1
            return entry.arrays

    def drop(self, key: str) -> None:
        with self._lock:
            if self._entries.pop(key, None) is not None:
                self.ended += 1

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, e in self._entries.items() if now - e.used > self.bounds.ttl_s]:
            del self._entries[key]
            self.expired += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": sum(e.nbytes for e in self._entries.values()),
                    "stored": self.stored, "reused": self.reused, "unknown": self.unknown,
                    "evicted": self.evicted, "expired": self.expired, "ended": self.ended}


class ResidentCaller:
    """The caller's half, for one component model: what to send on a call inside the current
    request scope. `send(feed, call)` runs `call(wire_feed, parameters)`, omitting the invariant
    inputs when the model already holds them for this scope, and sends them again (once) when the
    model answers that it does not (UNKNOWN_CONTEXT) or Triton refuses the short call for missing
    required inputs (a native config or a server started with --no-resident: then it stops
    omitting them)."""

    def __init__(self, model: str, invariant: frozenset[str], enabled: bool = True):
        self.model = model
        self.invariant = invariant
        self.enabled = enabled and bool(invariant)
        self.calls = self.short_calls = self.sent_bytes = 0  # all calls together (short: without the invariants)

    def send(self, feed: Mapping[str, np.ndarray], call: Callable[[Mapping[str, np.ndarray], dict], dict]) -> dict:
        scope = current_scope() if self.enabled else None
        if scope is None:
            return self._call(call, feed, {})
        parameters: dict = {CONTEXT_PARAMETER: scope.key}
        if scope.final:
            parameters[END_PARAMETER] = True
        refused: Exception | None = None
        if self.model in scope.holders:
            try:
                result = self._call(call, {n: a for n, a in feed.items() if n not in self.invariant}, parameters,
                                    short=True)
            except Exception as e:
                if not (is_unknown_context(e) or is_missing_inputs(e)):
                    raise
                refused = e  # evicted, expired, another instance, or a model that keeps nothing
                scope.holders.discard(self.model)
            else:
                if scope.final:
                    scope.holders.discard(self.model)
                return result
        result = self._call(call, feed, parameters)
        if refused is not None and is_missing_inputs(refused):
            self.enabled = False  # a model that keeps nothing (a native config, --no-resident): full feeds from now
        elif not scope.final:
            scope.holders.add(self.model)
        return result

    def _call(self, call: Callable, feed: Mapping[str, np.ndarray], parameters: dict, short: bool = False) -> dict:
        result = call(feed, parameters)
        self.calls += 1
        self.short_calls += short
        self.sent_bytes += sum(int(a.nbytes) for a in feed.values())
        return result

    def counts(self) -> dict[str, int]:
        """Calls answered so far, those without the invariant inputs, and the input bytes they carried."""
        return {"calls": self.calls, "without_invariants": self.short_calls, "input_bytes": self.sent_bytes}


def is_unknown_context(error: BaseException) -> bool:
    return UNKNOWN_CONTEXT in str(error)


def is_missing_inputs(error: BaseException) -> bool:
    """Triton refused the call for inputs its config requires (a model that keeps nothing)."""
    return MISSING_INPUTS_MESSAGE in str(error).lower()
