"""runtime/serving/resident.py without a server: the model's bounded store of per-request
invariants and the caller's choice of what to send (tests/test_triton_server.py runs both
against the real server)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.backends.base import current_scope, request_scope
from runtime.errors import BackendError
from runtime.serving import resident
from runtime.serving.resident import ResidentBounds, ResidentCaller, ResidentStore

CONTEXT_PARAMETER, END_PARAMETER, UNKNOWN_CONTEXT = resident.CONTEXT_PARAMETER, resident.END_PARAMETER, resident.UNKNOWN_CONTEXT
MIB = 2**20


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def arrays(mib: float, value: float = 1.0) -> dict[str, np.ndarray]:
    return {"text_embeds": np.full(int(mib * MIB) // 4, value, dtype=np.float32)}


def test_store_keeps_copies_and_evicts_least_recently_used_past_the_entry_bound():
    store = ResidentStore(ResidentBounds(entries=2, mib=100, ttl_s=60))
    first = arrays(0.1)
    store.put("a", first)
    first["text_embeds"][:] = 7  # the request's buffer is reused by Triton: the store kept a copy
    store.put("b", arrays(0.1, 2.0))
    assert store.get("a")["text_embeds"][0] == 1.0  # a is now the most recently used
    store.put("c", arrays(0.1, 3.0))
    assert store.get("b") is None and store.get("a") is not None and store.get("c")["text_embeds"][0] == 3.0
    assert store.stats()["evicted"] == 1 and len(store) == 2


def test_store_bounds_bytes_and_refuses_one_feed_larger_than_the_bound():
    store = ResidentStore(ResidentBounds(entries=10, mib=1.0, ttl_s=60))
    store.put("a", arrays(0.4))
    store.put("b", arrays(0.4))
    store.put("c", arrays(0.4))  # 1.2 MiB: a goes
    assert store.get("a") is None and len(store) == 2 and store.nbytes <= MIB
    store.put("huge", arrays(1.5))
    assert store.get("huge") is None and len(store) == 2


def test_store_forgets_what_was_not_used_for_its_ttl_and_drops_ended_keys():
    clock = Clock()
    store = ResidentStore(ResidentBounds(entries=10, mib=10, ttl_s=30), clock)
    store.put("left", arrays(0.1))  # a request that never reached its last step
    store.put("used", arrays(0.1))
    clock.now = 20
    assert store.get("used") is not None
    clock.now = 40
    assert store.get("left") is None and store.get("used") is not None
    store.drop("used")
    assert len(store) == 0 and store.stats()["expired"] == 1 and store.stats()["ended"] == 1


@pytest.mark.parametrize("text", ["0,10,30", "4,0,30", "4,10,-1", "4,10", "a,b,c"])
def test_bounds_text_that_would_keep_nothing_or_does_not_parse_is_refused(text):
    with pytest.raises(ValueError):
        ResidentBounds.parse(text)


def test_bounds_round_trip_through_the_config_text():
    bounds = ResidentBounds(entries=3, mib=512.5, ttl_s=90)
    assert ResidentBounds.parse(bounds.text()) == bounds and ResidentBounds.parse("") is None


class Model:
    """A stand-in for a component model that keeps invariants, as ComponentModel does."""

    def __init__(self, keeps: bool = True):
        self.store = ResidentStore(ResidentBounds()) if keeps else None
        self.seen: list[tuple[set[str], dict]] = []

    def __call__(self, feed, parameters):
        self.seen.append((set(feed), dict(parameters)))
        key = parameters.get(CONTEXT_PARAMETER)
        if "text_embeds" not in feed:
            held = self.store.get(key) if self.store is not None and key else None
            if held is None:
                raise BackendError(f"unet: {UNKNOWN_CONTEXT}" if self.store is not None else
                                   "unet: expected 3 inputs but got 2 inputs for model 'unet'. Got input(s) "
                                   "['timestep','sample'], but missing required input(s) ['text_embeds']")
            feed = {**feed, **held}
        elif self.store is not None and key and not parameters.get(END_PARAMETER):
            self.store.put(key, {"text_embeds": feed["text_embeds"]})
        if self.store is not None and parameters.get(END_PARAMETER):
            self.store.drop(key)
        return {"noise_pred": feed["sample"] + feed["text_embeds"][:1]}


FEED = {"sample": np.zeros(2, np.float32), "timestep": np.ones(1, np.float32), "text_embeds": np.ones(4, np.float32)}


def steps(caller, model, n):
    out = []
    with request_scope() as scope:
        for i in range(n):
            scope.final = i == n - 1
            out.append(caller.send(FEED, model)["noise_pred"])
    return out


def test_invariants_cross_once_per_scope_and_the_last_call_ends_them():
    model, caller = Model(), ResidentCaller("unet", frozenset({"text_embeds"}))
    out = steps(caller, model, 4)
    assert [names for names, _ in model.seen] == [set(FEED)] + [{"sample", "timestep"}] * 3
    keys = {p[CONTEXT_PARAMETER] for _, p in model.seen}
    assert len(keys) == 1 and len(next(iter(keys))) == 32
    assert [p.get(END_PARAMETER, False) for _, p in model.seen] == [False, False, False, True]
    assert len(model.store) == 0 and all(np.array_equal(o, out[0]) for o in out)
    assert caller.counts() == {"calls": 4, "without_invariants": 3, "input_bytes": 4 * 12 + 16}
    steps(caller, model, 2)  # the next request: a new key, sent in full again
    assert model.seen[4][0] == set(FEED) and model.seen[4][1][CONTEXT_PARAMETER] not in keys


def test_a_key_the_model_lost_is_answered_by_sending_everything_again():
    model, caller = Model(), ResidentCaller("unet", frozenset({"text_embeds"}))
    with request_scope():
        caller.send(FEED, model)
        model.store = ResidentStore(ResidentBounds())  # evicted, expired or a restarted model
        caller.send(FEED, model)
        caller.send(FEED, model)
    assert [names for names, _ in model.seen] == [set(FEED), {"sample", "timestep"}, set(FEED), {"sample", "timestep"}]


def test_a_model_that_keeps_nothing_gets_full_feeds_after_one_refusal():
    model, caller = Model(keeps=False), ResidentCaller("unet", frozenset({"text_embeds"}))
    steps(caller, model, 4)
    assert [names for names, _ in model.seen] == [set(FEED), {"sample", "timestep"}, set(FEED), set(FEED), set(FEED)]
    assert not caller.enabled


def test_other_errors_of_a_short_call_are_raised_not_hidden_by_a_resend():
    def failing(feed, parameters):
        if "text_embeds" not in feed:
            raise BackendError("unet: sample: expected finite values, got NaN or Inf")
        return {"noise_pred": feed["sample"]}

    caller = ResidentCaller("unet", frozenset({"text_embeds"}))
    with request_scope():
        caller.send(FEED, failing)
        with pytest.raises(BackendError, match="finite"):
            caller.send(FEED, failing)


def test_outside_a_scope_or_when_disabled_every_call_is_full_and_carries_no_key():
    model = Model()
    ResidentCaller("unet", frozenset({"text_embeds"})).send(FEED, model)
    with request_scope():
        for _ in range(2):
            ResidentCaller("unet", frozenset({"text_embeds"}), enabled=False).send(FEED, model)
    assert model.seen == [(set(FEED), {})] * 3 and current_scope() is None
