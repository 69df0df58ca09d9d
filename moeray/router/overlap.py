"""Micro-batch ping-pong: how a step splits into micro-batches (pure: ``plan_micro_batches``), and the turn that lets
one micro-batch's dense compute run while another's tokens are with the expert workers.

A step split into micro-batches runs each micro-batch's forward on its own thread (``Scheduler``). They share one
``Turn``: a thread holds it while it computes on the router (attention, norms, gates, dispatch bookkeeping, combine)
and gives it up only while its layer's tokens are away (``ExpertDispatcher`` wraps the transport's send in
``away()``). So the router computes one micro-batch at a time, in the order the round trips come back:

```
micro-batch A: dense 0 ─ send ····· wait ····· ─ combine, dense 1 ─ send ····· ─ ...
micro-batch B:              dense 0 ─ send ····· ─ combine, dense 1 ─ send ····· ─ ...
turn held by:  A ────────── B ───────────────── A ──────────────── B ──────────
```

Why a turn rather than free threads: the router's ops already use all of its torch threads, and two forwards
computing at once would oversubscribe them (on a GPU they share a stream anyway). Only the waiting overlaps.

A forward with no turn (one micro-batch, scoring, tests calling the dispatcher directly) behaves exactly as
before: ``away()`` is a no-op there. The turn also times itself: ``held_s`` is the router's compute inside the
step's forwards, so the forwards' wall time minus it is the time the router waited with nothing to compute.
"""

from __future__ import annotations

import contextlib
import threading
import time

MAX_MICRO_BATCHES = 4
# The automatic rule splits a step in two only when each half gives a routed expert this many (token, expert) rows
# on average: below it an expert's compute is bound by streaming its weights, which each micro-batch that touches
# it pays again, so a split adds more expert time than the overlap hides. Measured (BENCHMARKS.md, issue 18): on
# the medium checkpoint (16 experts, top-2) two micro-batches lost 17-26% at 8-64 decoding streams (1-8 rows per
# expert and half) and gained 13% on 512-token prefill steps (32 rows), router and workers on cores of their own.
AUTO_MIN_ROWS_PER_EXPERT = 32


def auto_min_tokens(num_experts: int, top_k: int) -> int:
    """New tokens a micro-batch needs under the automatic rule: ``AUTO_MIN_ROWS_PER_EXPERT`` rows per expert."""
    return -(-AUTO_MIN_ROWS_PER_EXPERT * num_experts // top_k)


def split_rows(new_R: list[int], parts: int) -> list[list[int]]:
    """Row indices per micro-batch for rows of ``new_R`` new tokens each: rows go, largest first, to the
    micro-batch with the fewest tokens so far (ties: the earlier micro-batch and row), so the tokens spread as
    evenly as whole rows allow and every micro-batch gets a row. Each list is ascending: a micro-batch keeps the
    step's row order (one-token decode rows first). ``parts`` is capped at the row count."""
    if parts < 1:
        raise ValueError(f"a step splits into at least 1 micro-batch; got {parts}")
    parts = min(parts, len(new_R))
    groups: list[list[int]] = [[] for _ in range(parts)]
    tokens = [0] * parts
    for r in sorted(range(len(new_R)), key=lambda r: -new_R[r]):  # stable: equal rows keep their order
        p = min(range(parts), key=lambda p: tokens[p])
        groups[p].append(r)
        tokens[p] += new_R[r]
    return [sorted(g) for g in groups if g]


def plan_micro_batches(new_R: list[int], requested: int | None, min_tokens: int | None = None) -> list[list[int]]:
    """The step's micro-batches (row indices, see ``split_rows``). ``requested``: a fixed count (capped at the
    rows), or None for the automatic rule: two when each would get at least ``min_tokens`` new tokens (see
    ``auto_min_tokens``), else one; ``min_tokens`` None: always one (nothing to hide, e.g. in-process experts)."""
    if requested is not None and not 1 <= requested <= MAX_MICRO_BATCHES:
        raise ValueError(f"micro_batches must lie in [1, {MAX_MICRO_BATCHES}]; got {requested}")
    if not new_R:
        return []
    if requested is not None:
        return split_rows(new_R, requested)
    if min_tokens is not None and len(new_R) >= 2 and sum(new_R) >= 2 * min_tokens:
        halves = split_rows(new_R, 2)
        if min(sum(new_R[r] for r in half) for half in halves) >= min_tokens:
            return halves
    return [list(range(len(new_R)))]


_current = threading.local()  # the turn of the forward running on this thread, if any


class Turn:
    """One step's right to compute on the router, passed between its micro-batches' threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = 0.0
        self.held_s = 0.0  # summed over the micro-batches; only the holder adds to it

    def _acquire(self) -> None:
        self._lock.acquire()
        self._taken = time.perf_counter()

    def _release(self) -> None:
        self.held_s += time.perf_counter() - self._taken
        self._lock.release()

    @contextlib.contextmanager
    def held(self):
        """Run this thread's forward holding the turn (it is given up only inside ``away()``)."""
        if getattr(_current, "turn", None) is not None:
            raise RuntimeError("a thread runs one micro-batch's forward at a time")
        self._acquire()
        _current.turn = self
        try:
            yield self
        finally:
            _current.turn = None
            self._release()


@contextlib.contextmanager
def away():
    """This thread's tokens are with the expert workers: another micro-batch may compute meanwhile."""
    turn: Turn | None = getattr(_current, "turn", None)
    if turn is None:
        yield
        return
    turn._release()
    try:
        yield
    finally:
        turn._acquire()
