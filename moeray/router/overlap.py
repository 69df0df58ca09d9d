"""Micro-batch ping-pong: the turn that lets one micro-batch's dense compute run while another's tokens are with the
expert workers.

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
