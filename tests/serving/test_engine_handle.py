"""The ingress's engine handle against fake router and controller handles, no Ray: round-robin routing, abort fanned
out to every router, a stream aborted at its router only when its consumer leaves early, requests sharing one feed
per router, a feed that ended idle reopened, cached expert health, and the controller's refusals as
InvalidRequest."""

import asyncio
import contextlib

import pytest
from ray.exceptions import RayTaskError

from feed_fakes import Answer, FeedRouter, Method
from moeray.request import InvalidRequest, SamplingParams, StreamChunk
from moeray.router.feed import FeedClosed
from moeray.serving import engine_handle
from moeray.serving.engine_handle import EngineHandle

pytestmark = pytest.mark.ray


class FakeRouter(FeedRouter):
    """``chunks`` chunks of one token each per request, the last with its finish reason; with ``fail_at``, the
    request fails there with the router's error."""

    def __init__(self, running=(), chunks: int = 3, fail_at: int | None = None) -> None:
        super().__init__()
        self.preset_running = set(running)
        self.n_chunks, self.fail_at = chunks, fail_at
        self.score = Method(lambda ids, mask, traceparent, last_only: Answer([[len(self.started)]]))

    async def chunks(self, request_id):
        for i in range(self.n_chunks):
            if i == self.fail_at:
                raise RuntimeError("the router died")
            last = i == self.n_chunks - 1
            yield StreamChunk(request_id=request_id, token_ids=[i], finish_reason="length" if last else None)

    def _abort(self, request_id):
        return Answer(super()._abort(request_id).value or request_id in self.preset_running)


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
        return Answer(answer)

    now = [100.0]
    monkeypatch.setattr(engine_handle.time, "monotonic", lambda: now[0])
    handle = EngineHandle(routers=[], controller=type("C", (), {"health": Method(health)})())
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

    handle = EngineHandle(routers=[], controller=type("C", (), {"request_scale": Method(request_scale)})())
    with pytest.raises(InvalidRequest) as err:
        asyncio.run(handle.request_scale(9))
    assert str(err.value) == "workers must lie in [1, 4]; got 9"


def test_requests_on_one_router_share_its_feed_and_an_ended_feed_is_reopened():
    router = FakeRouter(chunks=4)
    handle = EngineHandle(routers=[router], controller=None)
    feeds: list[str] = []
    start = router._start

    def recording_start(ids, sampling, request_id, feed_id, key, traceparent, resumed=()):
        feeds.append(feed_id)
        return start(ids, sampling, request_id, feed_id, key, traceparent, resumed)

    router.start = Method(recording_start)

    async def together():
        return await asyncio.gather(*[_consume(handle, rid) for rid in "abc"])

    assert [[c.token_ids for c in got] for got in asyncio.run(together())] == [[[0], [1], [2], [3]]] * 3
    assert len(set(feeds)) == 1, "one feed for the three requests"

    # The feed ended idle just as a request came: its start is refused, and it starts again on a new feed.
    closed = [True]

    def refusing_start(ids, sampling, request_id, feed_id, key, traceparent, resumed=()):
        feeds.append(feed_id)
        if closed.pop() if closed else False:
            async def refuse():
                raise FeedClosed(f"feed {feed_id} has ended")
            return refuse()
        return start(ids, sampling, request_id, feed_id, key, traceparent, resumed)

    router.start = Method(refusing_start)

    assert [c.token_ids for c in asyncio.run(_consume(handle, "d"))] == [[0], [1], [2], [3]]
    assert feeds[-1] != feeds[-2] and router.aborted == [], "a new feed; nothing to abort"
