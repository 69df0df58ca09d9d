"""A router's feeds (moeray/router/feed.py): tokens merge per request until taken, finishes and errors ride along,
keys (not request ids) tell requests apart, starts need a feed its reader opened, and a feed ends only idle and
empty, refusing late starts."""

from __future__ import annotations

import threading

import pytest

from moeray.router import feed as feed_module
from moeray.router.feed import FeedClosed, Feeds


def test_tokens_merge_per_request_in_order_with_finishes_and_errors():
    feeds = Feeds()
    feeds.open("f")
    feed = feeds.register("f", 0, "a")
    feeds.register("f", 1, "b")
    feeds.register("f", 2, "c")
    for key, token in [(0, 5), (1, 7), (0, 6)]:
        feed.put_token(key, token)
    batch = feed.take(timeout=0)
    assert {k: (c.request_id, c.token_ids, c.finish_reason) for k, c in batch.chunks.items()} == \
        {0: ("a", [5, 6], None), 1: ("b", [7], None)}
    feed.put_token(0, 8)
    feed.finish(0, "stop", None)
    feed.finish(1, None, None)  # aborted: no reason of its own
    error = RuntimeError("step failed")
    feed.finish(2, None, error)
    batch = feed.take(timeout=0)
    assert {k: (c.token_ids, c.finish_reason) for k, c in batch.chunks.items()} == {0: ([8], "stop"),
                                                                                   1: ([], "abort")}
    assert batch.errors == {2: error} and feed.open == set() and feed.request_ids == {}


def test_a_request_id_reused_under_a_new_key_is_kept_apart():
    feeds = Feeds()
    feeds.open("f")
    feed = feeds.register("f", 0, "same")
    feeds.register("f", 1, "same")  # a client retrying an aborted request at once
    feed.put_token(0, 1)
    feed.finish(0, "abort", None)
    feed.put_token(1, 2)
    chunks = feed.take(timeout=0).chunks
    assert (chunks[0].token_ids, chunks[0].finish_reason) == ([1], "abort")
    assert (chunks[1].token_ids, chunks[1].finish_reason) == ([2], None)
    with pytest.raises(ValueError, match="already carries key 1"):
        feeds.register("f", 1, "other")


def test_take_waits_for_news_and_wakes_on_it():
    feeds = Feeds()
    feeds.open("f")
    feed = feeds.register("f", 0, "a")
    assert feed.take(timeout=0.01).chunks == {}, "nothing yet: an empty batch, the feed lives on"
    threading.Timer(0.05, feed.put_token, args=(0, 9)).start()
    assert feed.take(timeout=5).chunks[0].token_ids == [9]


def test_a_feed_ends_only_idle_and_empty_and_refuses_late_starts(monkeypatch):
    monkeypatch.setattr(feed_module, "IDLE_S", 0.0)
    feeds = Feeds()
    with pytest.raises(FeedClosed, match="feed f is not open on this router"):
        feeds.register("f", 0, "a")  # never opened here: e.g. a router restarted since its reader opened it
    feeds.open("f")
    feed = feeds.register("f", 0, "a")
    assert feed.take(timeout=0) is not None, "a request is open: the feed stays"
    feed.finish(0, "length", None)
    assert feed.take(timeout=0).chunks[0].finish_reason == "length"
    assert feed.take(timeout=0) is None and feed.closed, "idle and empty: ended"
    with pytest.raises(FeedClosed, match="feed f has ended"):
        feeds.register("f", 1, "b")
    feeds.end("f")  # the router's generator returned
    with pytest.raises(FeedClosed):
        feeds.register("f", 1, "b")
    assert len(feeds) == 0
    with pytest.raises(ValueError, match="feed f was opened before"):
        feeds.open("f")
    feeds.open("g")
    assert feeds.register("g", 0, "b").take(timeout=0) is not None, "another feed is unaffected"
