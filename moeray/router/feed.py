"""Feeds: one token stream per ingress and router, carrying every request the ingress started there.

    ingress ── Router.start(prompt, sampling, request_id, feed_id, key) ──▶ router: the sequence joins the batch
    ingress ◀── Router.feed(feed_id): a Ray streaming generator ──── FeedBatch per wake-up: each request's new tokens
                                                                     since the last batch, finishes, errors; by key

Why: a Ray streaming generator per request costs the router a thread, a wake-up and a Ray object per request and
token: at 32 streams, 32 objects per step, serialized and reported under the GIL the step also needs (measured: ~11
ms of a 38 ms step on the demo checkpoint outside the forward). A feed yields once per wake-up for all of its
requests. ``Router.stream`` (one generator per request) stays for the Python API (``Engine.stream``).

Entries go by ``key``, which the ingress picks per ``start`` (unique on its feed), not by request id: a client may
retry an aborted request at once under the same id, while the aborted one still emits its last token.

A feed lives while its ingress reads it: the reader's call opens it (its first batch is empty: the ingress starts
requests on it only after that), and one with no request open and nothing to send for ``IDLE_S`` ends (its reader
gone, e.g. an ingress replica that died, it would otherwise hold a router thread for ever). A ``start`` that names a
feed not open here (ended, or opened on the incarnation of the router before a restart) raises ``FeedClosed``, and
the ingress opens a new feed and starts again. The check and the end happen under one lock, so a request is never
registered on a feed that has ended.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from moeray.request import StreamChunk

IDLE_S = 60.0  # a feed with no request open and nothing queued for this long ends


class FeedClosed(RuntimeError):
    """``Router.start`` named a feed that is not open on this router (it ended idle, or the router restarted since):
    open a new one and start again."""


@dataclasses.dataclass(frozen=True)
class FeedBatch:
    """What a feed carries per wake-up, by the key each request was started under: one chunk per request with news
    (its new tokens, in order; the finish reason on its last), and the requests that failed, with their errors
    (raised in the reader's stream)."""

    chunks: dict[int, StreamChunk]
    errors: dict[int, BaseException] = dataclasses.field(default_factory=dict)


class Feed:
    """One feed's queue: tokens merge per request until the reader takes them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.request_ids: dict[int, str] = {}  # key -> request id, while open or queued
        self.tokens: dict[int, list[int]] = {}  # key -> tokens not yet taken (insertion order: first news)
        self.logprobs: dict[int, list] = {}  # key -> their TokenLogprobs, for requests that asked
        self.finished: dict[int, str] = {}  # key -> finish reason
        self.errors: dict[int, BaseException] = {}
        self.open: set[int] = set()  # keys started and not yet finished
        self.closed = False
        self.idle_since = time.monotonic()

    def put_token(self, key: int, token: int, logprob=None) -> None:
        with self.cond:
            self.tokens.setdefault(key, []).append(token)
            if logprob is not None:
                self.logprobs.setdefault(key, []).append(logprob)
            self.cond.notify()

    def finish(self, key: int, reason: str | None, error: BaseException | None) -> None:
        with self.cond:
            self.open.discard(key)
            self.tokens.setdefault(key, [])
            if error is not None:
                self.errors[key] = error
            else:
                self.finished[key] = reason or "abort"
            self.cond.notify()

    def open_request_ids(self) -> list[str]:
        with self.cond:
            return [self.request_ids[k] for k in self.open]

    def take(self, timeout: float) -> FeedBatch | None:
        """What is queued, waiting up to ``timeout`` for something; None once the feed has ended (idle)."""
        with self.cond:
            if not self.tokens and not self.closed:
                self.cond.wait(timeout)
            if not self.tokens:
                if not self.open and time.monotonic() - self.idle_since > IDLE_S:
                    self.closed = True
                return None if self.closed else FeedBatch({})
            tokens, finished, errors, logprobs = self.tokens, self.finished, self.errors, self.logprobs
            self.tokens, self.finished, self.errors, self.logprobs = {}, {}, {}, {}
            request_ids = {k: self.request_ids[k] for k in tokens}
            for k in (*finished, *errors):
                del self.request_ids[k]
            self.idle_since = time.monotonic()
        chunks = {k: StreamChunk(request_id=request_ids[k], token_ids=ids, finish_reason=finished.get(k),
                                 logprobs=logprobs.get(k))
                  for k, ids in tokens.items() if ids or k in finished}
        return FeedBatch(chunks, errors)


class Feeds:
    """A router's feeds by id. A feed exists from its reader's first call (``Router.feed``) until it ends; a start
    naming any other id is refused, so a router Ray restarted, which never saw its predecessor's feeds, refuses
    theirs instead of running requests nobody reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._feeds: dict[str, Feed] = {}
        self._ended: set[str] = set()

    def open(self, feed_id: str) -> Feed:
        """A new feed ``feed_id`` (its reader's call)."""
        with self._lock:
            if feed_id in self._feeds or feed_id in self._ended:
                raise ValueError(f"feed {feed_id} was opened before; a feed id is used once")
            feed = self._feeds[feed_id] = Feed()
            return feed

    def register(self, feed_id: str, key: int, request_id: str) -> Feed:
        """Open ``key`` (for ``request_id``) on ``feed_id``; ``FeedClosed`` if that feed is not open here."""
        with self._lock:
            feed = self._feeds.get(feed_id)
        if feed is None:
            raise FeedClosed(f"feed {feed_id} is not open on this router (it ended, or an earlier incarnation of the "
                             "router had it); open a new one")
        with feed.cond:
            if feed.closed:
                raise FeedClosed(f"feed {feed_id} has ended (idle for {IDLE_S:.0f}s); open a new one")
            if key in feed.request_ids:
                raise ValueError(f"feed {feed_id} already carries key {key}; keys must be unique on a feed")
            feed.open.add(key)
            feed.request_ids[key] = request_id
        return feed

    def unregister(self, feed: Feed, key: int) -> None:
        """Undo ``register`` for a request that did not start (refused by the scheduler)."""
        with feed.cond:
            feed.open.discard(key)
            feed.request_ids.pop(key, None)

    def end(self, feed_id: str) -> None:
        """``feed_id``'s reader has left (its generator ended): forget the feed, remember its id."""
        with self._lock:
            self._feeds.pop(feed_id, None)
            self._ended.add(feed_id)

    def __len__(self) -> int:
        return len(self._feeds)
