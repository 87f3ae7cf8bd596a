"""The overload bounds the fronts keep in place of Triton's queue policies (which stall calls
0.5 s on 2.51: runtime/serving/admission.py): the per-model slots and queue, the model name read
from a gRPC inference message without parsing its tensors, and the HTTP front refusing past a
bound while the stand-in upstream is busy."""

from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_front import Upstream

from runtime.serving.admission import Admission, Bound, QueueFull, model_of_infer_request
from runtime.serving.front import FrontThread, HttpFront


def _run(coroutine):
    return asyncio.run(coroutine)


def test_calls_past_the_running_slots_wait_in_order_and_past_the_queue_are_refused_at_once():
    async def scenario():
        admission = Admission({"m": Bound(concurrency=1, queue=2, timeout_s=5.0)})
        order: list[str] = []
        release = asyncio.Event()

        async def call(name: str):
            async with admission.slot("m"):
                order.append(name)
                await release.wait()

        first = asyncio.create_task(call("a"))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(call(n)) for n in ("b", "c")]
        await asyncio.sleep(0)
        assert admission.stats()["m"]["waiting"] == 2
        started = time.monotonic()
        with pytest.raises(QueueFull, match="m: exceeds maximum queue size"):
            await call("d")
        assert time.monotonic() - started < 0.1  # refused without waiting
        release.set()
        await asyncio.gather(first, *waiting)
        assert order == ["a", "b", "c"]
        stats = admission.stats()["m"]
        assert stats["forwarded"] == 0 and stats["waiting"] == 0 and stats["refused_full"] == 1 and stats["admitted"] == 3
        assert stats["most_forwarded"] == 1

    _run(scenario())


def test_a_call_that_waits_past_its_timeout_is_refused_and_a_cancelled_waiter_leaks_no_slot():
    async def scenario():
        admission = Admission({"m": Bound(concurrency=1, queue=4, timeout_s=0.05)})
        hold = asyncio.Event()

        async def holder():
            async with admission.slot("m"):
                await hold.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="request timeout expired after 0.05 s in the queue"):
            async with admission.slot("m"):
                pass
        gone = asyncio.create_task(admission.slot("m").__aenter__())
        await asyncio.sleep(0.01)
        gone.cancel()  # the client left while waiting
        with pytest.raises(asyncio.CancelledError):
            await gone
        hold.set()
        await task
        stats = admission.stats()["m"]
        assert stats == {**stats, "forwarded": 0, "waiting": 0, "refused_timeout": 1}
        async with admission.slot("m"):  # the slot is free again
            assert admission.stats()["m"]["forwarded"] == 1

    _run(scenario())


def test_models_without_a_bound_pass_and_bounds_that_mean_nothing_are_refused():
    async def scenario():
        admission = Admission({})
        async with admission.slot("anything"):
            pass

    _run(scenario())
    for bad in (dict(concurrency=0, queue=0, timeout_s=1.0), dict(concurrency=1, queue=-1, timeout_s=1.0),
                dict(concurrency=1, queue=0, timeout_s=0.0)):
        with pytest.raises(Exception, match="admission bound"):
            Bound(**bad)


def test_the_model_name_is_read_from_a_real_infer_request_without_its_tensors():
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="refadgen_unet", model_version="1", id="42")
    tensor = request.inputs.add(name="sample", datatype="FP32", shape=[2, 5, 20, 16])
    tensor.parameters["x"].int64_param = 7
    request.raw_input_contents.append(b"\x00" * 12800)
    data = request.SerializeToString()
    assert model_of_infer_request(data) == "refadgen_unet"
    # field order is the writer's choice: the name after the id and a varint field still counts
    reordered = service_pb2.ModelInferRequest(id="7").SerializeToString() + bytes([0x0A, 3]) + b"abc"
    assert model_of_infer_request(reordered) == "abc"
    assert model_of_infer_request(data[:3]) is None  # cut inside the name
    assert model_of_infer_request(b"\x0f\xff") is None  # a wire type protobuf does not have
    assert model_of_infer_request(service_pb2.ModelInferRequest(id="1").SerializeToString()) is None


class SlowUpstream(Upstream):
    """Answers every request 200 after `delay_s`, counting how many it holds at once."""

    def __init__(self, thread: FrontThread, delay_s: float):
        self.delay_s = delay_s
        self.holding = self.most = 0
        super().__init__(thread)

    async def respond(self, writer) -> bool:
        self.holding += 1
        self.most = max(self.most, self.holding)
        await asyncio.sleep(self.delay_s)
        self.holding -= 1
        return await super().respond(writer)


def _post(port: int, model: str) -> int:
    body = b'{"inputs": []}'
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_the_http_front_holds_the_bound_and_answers_503_past_it():
    thread = FrontThread()
    upstream = SlowUpstream(thread, delay_s=0.3)
    admission = Admission({"slow": Bound(concurrency=2, queue=2, timeout_s=10.0)})
    port = thread.serve_http(HttpFront(("127.0.0.1", upstream.port), admission=admission), "127.0.0.1", 0)
    try:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: _post(port, "slow"), range(8)))
        assert sorted(statuses) == [200] * 4 + [503] * 4  # 2 running + 2 waiting; the rest refused
        assert upstream.most == 2  # Triton never held more than the bound
        assert _post(port, "other") == 200  # models without a bound are not held
        stats = admission.stats()["slow"]
        assert stats["refused_full"] == 4 and stats["admitted"] == 4 and stats["forwarded"] == 0
    finally:
        thread.stop()
        thread.close()
