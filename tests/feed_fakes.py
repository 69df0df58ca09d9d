"""A fake router speaking the ingress's feed protocol (``Router.start`` and ``Router.feed``; moeray/router/feed.py)
over asyncio, no Ray: a subclass says what one request's chunks are (``chunks``); each request's producer emits one
chunk per event-loop turn into the feed and stops when the request is aborted."""

from __future__ import annotations

import asyncio

from moeray.router.feed import FeedBatch


class Method:
    """A fake actor method: ``.options(...).remote(...)`` calls it."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def options(self, **_):
        return self

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class Answer:
    """An answered call, as awaiting an ObjectRef gives it; never awaited is fine (abort is fire and forget)."""

    def __init__(self, value) -> None:
        self.value = value

    def __await__(self):
        return self.value
        yield  # a generator: what __await__ must return


class FeedRouter:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.aborted: list[str] = []
        self._feeds: dict[str, asyncio.Queue] = {}
        self._running: set[str] = set()
        self.start = Method(self._start)
        self.feed = Method(self._feed)
        self.abort = Method(self._abort)

    async def chunks(self, request_id: str):
        """One request's chunks (an async generator; raising fails the request with that error)."""
        raise NotImplementedError
        yield

    def _queue(self, feed_id: str) -> asyncio.Queue:
        return self._feeds.setdefault(feed_id, asyncio.Queue())

    def _start(self, ids, sampling, request_id, feed_id, key, traceparent, resumed=()):
        self.started.append(request_id)
        self._running.add(request_id)
        asyncio.get_running_loop().create_task(self._produce(request_id, self._queue(feed_id), key))
        return Answer(None)

    async def _produce(self, request_id: str, feed: asyncio.Queue, key: int) -> None:
        try:
            async for chunk in self.chunks(request_id):
                await asyncio.sleep(0)
                if request_id not in self._running:
                    return
                feed.put_nowait(FeedBatch({key: chunk}))
        except Exception as e:  # noqa: BLE001 - the request's error, as the router's feed carries it
            feed.put_nowait(FeedBatch({}, {key: e}))
        finally:
            self._running.discard(request_id)

    async def _feed(self, feed_id: str):
        queue = self._queue(feed_id)
        yield Answer(FeedBatch({}))  # open
        while True:
            yield Answer(await queue.get())

    def _abort(self, request_id: str) -> Answer:
        self.aborted.append(request_id)
        running = request_id in self._running
        self._running.discard(request_id)
        return Answer(running)
