"""Overload bounds kept by the fronts instead of Triton's queue policies.

Triton 2.51 stalls calls ~0.5 s when a model has a `default_queue_policy` (issue 15): any policy
(a size or a timeout) turns off the dynamic batcher's payload prefetching
(`PriorityQueue::support_prefetching_`), and then `DynamicBatchScheduler::Enqueue` wakes the
batcher thread only if a model instance is idle at that moment. A call that arrives while the
previous one is still finishing (its response already sent) wakes nobody; the batcher thread,
woken by the finishing payload before the instance is released, waits on its condition
variable for `default_wait_microseconds` = 500 ms. With no policy the queue supports prefetching,
the slot check passes, and every enqueue wakes the batcher. So the generated configs carry no
queue policy, and the bounds are applied here, in front of Triton, per model:

- at most `concurrency` calls of the model are forwarded to Triton at once (what Triton holds:
  its instances plus, for a batched model, the calls it may batch);
- at most `queue` more wait in the front, in arrival order; past that a call is refused at once;
- a call that waited `timeout_s` without being forwarded is refused.

Refusals are 503 (HTTP) / UNAVAILABLE (gRPC) with the fragments of Triton's own queue messages
(`names.QUEUE_MESSAGES`), so clients retry them as before. Calls from inside the server (the
pipeline models' BLS calls) do not pass the fronts; they are bounded by the pipeline models'
instances, each running one request, one component call at a time. The fronts of one service
share one Admission on one event loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Mapping

from runtime.errors import BackendError


@dataclass(frozen=True)
class Bound:
    concurrency: int  # calls forwarded to Triton at once
    queue: int  # calls waiting in the front beyond those
    timeout_s: float  # longest wait in the front

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.queue < 0 or not self.timeout_s > 0:
            raise BackendError(f"admission bound: concurrency >= 1, queue >= 0 and timeout > 0 expected, got {self}")


class QueueFull(Exception):
    """A call refused by its model's bound; the message carries Triton's queue-message fragment."""


@dataclass
class _ModelState:
    forwarded: int = 0
    waiting: deque = field(default_factory=deque)  # futures of waiting calls, oldest first
    refused_full: int = 0
    refused_timeout: int = 0
    admitted: int = 0
    most_forwarded: int = 0
    most_waiting: int = 0


class Admission:
    """The bounds of every model (a model without one is not bounded here: Triton answers for
    names it does not serve)."""

    def __init__(self, bounds: Mapping[str, Bound]):
        self.bounds = dict(bounds)
        self.state = {model: _ModelState() for model in self.bounds}

    @asynccontextmanager
    async def slot(self, model: str) -> AsyncIterator[None]:
        """Hold one of `model`'s forwarding slots for the body of the `async with`; raises
        QueueFull when the model's queue is full or the wait ran out."""
        bound = self.bounds.get(model)
        if bound is None:
            yield
            return
        state = self.state[model]
        if state.forwarded < bound.concurrency and not state.waiting:
            state.forwarded += 1
        else:
            await self._wait(model, bound, state)
        state.admitted += 1
        state.most_forwarded = max(state.most_forwarded, state.forwarded)
        try:
            yield
        finally:
            self._release(state)

    async def _wait(self, model: str, bound: Bound, state: _ModelState) -> None:
        if len(state.waiting) >= bound.queue:
            state.refused_full += 1
            raise QueueFull(f"{model}: exceeds maximum queue size ({bound.queue} waiting, {bound.concurrency} running); "
                            "retry later")
        handed: asyncio.Future = asyncio.get_running_loop().create_future()
        state.waiting.append(handed)
        state.most_waiting = max(state.most_waiting, len(state.waiting))
        try:
            await asyncio.wait_for(asyncio.shield(handed), bound.timeout_s)
        except BaseException as e:  # timed out, or the caller went away
            if handed.done() and not handed.cancelled():
                self._release(state)  # the slot was handed over as we gave up: pass it on
            else:
                handed.cancel()
                state.waiting.remove(handed)
            if isinstance(e, asyncio.TimeoutError):
                state.refused_timeout += 1
                raise QueueFull(f"{model}: request timeout expired after {bound.timeout_s:g} s in the queue; "
                                "retry later") from None
            raise

    def _release(self, state: _ModelState) -> None:
        """A forwarding slot freed: to the oldest waiting call, else back to the pool."""
        while state.waiting:
            handed = state.waiting.popleft()
            if not handed.done():
                handed.set_result(None)  # its slot now; `forwarded` does not change
                return
        state.forwarded -= 1

    def stats(self) -> dict[str, dict[str, int]]:
        """Per model: forwarded now, waiting now, admitted, refused (full, timeout), peaks."""
        return {model: {"forwarded": s.forwarded, "waiting": len(s.waiting), "admitted": s.admitted,
                        "refused_full": s.refused_full, "refused_timeout": s.refused_timeout,
                        "most_forwarded": s.most_forwarded, "most_waiting": s.most_waiting}
                for model, s in self.state.items()}


def model_of_infer_request(message: bytes) -> str | None:
    """`model_name` (field 1) of a serialized inference.ModelInferRequest, read without parsing
    the rest of the message (its tensors); None when it is not there or the bytes are malformed."""
    at, end = 0, len(message)
    while at < end:
        key, at = _varint(message, at)
        if key is None:
            return None
        number, wire = key >> 3, key & 7
        if wire == 2:
            length, at = _varint(message, at)
            if length is None or at + length > end:
                return None
            if number == 1:
                try:
                    return message[at:at + length].decode("utf-8")
                except UnicodeDecodeError:
                    return None
            at += length
        elif wire == 0:
            value, at = _varint(message, at)
            if value is None:
                return None
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        else:
            return None
    return None


def _varint(data: bytes, at: int) -> tuple[int | None, int]:
    value = shift = 0
    while at < len(data) and shift < 64:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
    return None, at
