"""The ingress's engine handle against fake router and controller handles, no Ray: round-robin routing, abort fanned
out to every router, a stream aborted at its router only when its consumer leaves early, cached expert health, and
the controller's refusals as InvalidRequest."""

import asyncio
import contextlib

import pytest
from ray.exceptions import RayTaskError

from moeray.request import InvalidRequest, SamplingParams, StreamChunk
from moeray.serving import engine_handle
from moeray.serving.engine_handle import EngineHandle


class _ready:
    """An answered call, as awaiting an ObjectRef gives it; never awaited is fine (abort is fire and forget)."""

    def __init__(self, value) -> None:
        self.value = value

    def __await__(self):
        return self.value
        yield  # a generator: what __await__ must return


class _Remote:
    def __init__(self, fn) -> None:
        self.fn = fn

    def options(self, **_):
        return self

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class FakeRouter:
    def __init__(self, running=(), chunks: int = 3, fail_at: int | None = None) -> None:
        self.running, self.aborted, self.started = set(running), [], []
        self.chunks, self.fail_at = chunks, fail_at
        self.stream = _Remote(self._stream)
        self.abort = _Remote(self._abort)
        self.score = _Remote(lambda ids, mask, traceparent, last_only: _ready([[len(self.started)]]))

    def _abort(self, request_id):
        self.aborted.append(request_id)
        return _ready(request_id in self.running)

    async def _stream(self, ids, sampling, request_id, traceparent):
        self.started.append(request_id)
        for i in range(self.chunks):
            if i == self.fail_at:
                raise RuntimeError("the router died")
            last = i == self.chunks - 1
            yield _ready(StreamChunk(request_id=request_id, token_ids=[i], finish_reason="length" if last else None))


async def _consume(handle, request_id, take: int | None = None):
    got = []
    async with contextlib.aclosing(handle.stream([1, 2], SamplingParams(), request_id)) as chunks:
        async for chunk in chunks:
            got.append(chunk)
            if take is not None and len(got) == take:
                break
    return got


def test_requests_take_the_routers_in_turn_and_abort_reaches_every_router():
    routers = [FakeRouter(), FakeRouter(running={"b"})]
    handle = EngineHandle(routers=routers, controller=None)
    for rid in "abc":
        asyncio.run(_consume(handle, rid))
    assert [r.started for r in routers] == [["a", "c"], ["b"]]
    assert asyncio.run(handle.abort("b")) is True and asyncio.run(handle.abort("zzz")) is False
    assert [r.aborted for r in routers] == [["b", "zzz"], ["b", "zzz"]]


def test_a_stream_is_aborted_at_its_router_only_when_left_early():
    router = FakeRouter()
    handle = EngineHandle(routers=[router], controller=None)
    assert [c.token_ids for c in asyncio.run(_consume(handle, "whole"))] == [[0], [1], [2]]
    assert router.aborted == []  # it finished: nothing to abort
    assert len(asyncio.run(_consume(handle, "left", take=1))) == 1
    assert router.aborted == ["left"]
    failing = FakeRouter(fail_at=1)
    with pytest.raises(RuntimeError, match="the router died"):
        asyncio.run(_consume(EngineHandle(routers=[failing], controller=None), "failed"))
    assert failing.aborted == []  # the router ended it: never abort an id it may have handed on


def test_health_is_cached_and_an_unreachable_controller_keeps_the_last_answer(monkeypatch):
    answers = [{"serving": False}, RuntimeError("restarting")]
    asked = []

    def health():
        asked.append(1)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            async def fail():
                raise answer
            return fail()
        return _ready(answer)

    now = [100.0]
    monkeypatch.setattr(engine_handle.time, "monotonic", lambda: now[0])
    handle = EngineHandle(routers=[], controller=type("C", (), {"health": _Remote(health)})())
    assert asyncio.run(handle.experts_available()) is False
    now[0] += engine_handle.HEALTH_TTL_S / 2
    assert asyncio.run(handle.experts_available()) is False and len(asked) == 1  # cached
    now[0] += engine_handle.HEALTH_TTL_S
    assert asyncio.run(handle.experts_available()) is False and len(asked) == 2  # asked; the failure keeps it


def test_controller_refusals_are_invalid_requests_with_the_controllers_message():
    def request_scale(workers):
        try:
            raise ValueError(f"workers must lie in [1, 4]; got {workers}")
        except ValueError as e:
            wrapped = RayTaskError("ControllerActor.request_scale", "Traceback ...\n(pid=7)", e).as_instanceof_cause()

        async def fail():
            raise wrapped
        return fail()

    handle = EngineHandle(routers=[], controller=type("C", (), {"request_scale": _Remote(request_scale)})())
    with pytest.raises(InvalidRequest) as err:
        asyncio.run(handle.request_scale(9))
    assert str(err.value) == "workers must lie in [1, 4]; got 9"
