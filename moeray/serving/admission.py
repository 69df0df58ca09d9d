"""Exact admission control and the request ids in flight, in the ingress (one asyncio event loop: no locks).

Why not Serve's own ``max_ongoing_requests`` / ``max_queued_requests``: Serve enforces the first in each replica
against queue lengths its handles cache and probe (stale under bursts), and the second per handle, i.e. per proxy
process, so together they admit more than their sum at times (9-10 against 4 + 4) and reject below it at others.
Here one counter in the ingress decides: at most ``max_ongoing`` requests run at the routers, at most ``max_queued``
more wait here for a slot (first come, first served), and the next one is refused at once (RESOURCE_EXHAUSTED).
Serve's limits are set above ours (see ``serve_limits``) so that they never decide first. The count is exact per
ingress replica; the application runs one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from moeray import telemetry
from moeray.request import DuplicateRequestId
from moeray.serving.errors import AdmissionFull, Draining

# Serve admits this many calls beyond ours into the ingress, for the RPCs admission does not count (health,
# metadata, placement) and for calls about to be refused.
SERVE_HEADROOM = 256


def serve_limits(max_ongoing: int, max_queued: int) -> dict:
    """Serve's deployment options for an ingress admitting ``max_ongoing`` + ``max_queued`` requests: never below
    ours, and no queue of Serve's own to refuse from."""
    return {"max_ongoing_requests": max_ongoing + max_queued + SERVE_HEADROOM, "max_queued_requests": -1}


@dataclasses.dataclass(eq=False)
class InFlight:
    request_id: str
    aborted: bool = False  # Abort arrived while it waited here for a slot


class Admission:
    def __init__(self, max_ongoing: int, max_queued: int) -> None:
        if max_ongoing < 1 or max_queued < 0:
            raise ValueError(f"admission needs max_ongoing >= 1 and max_queued >= 0; got {max_ongoing}, {max_queued}")
        self.max_ongoing, self.max_queued = max_ongoing, max_queued
        self.running = 0
        self.draining = False  # set by drain(): nothing new is admitted, requests in flight finish
        self._waiters: list[asyncio.Future] = []  # FIFO of requests waiting for a slot
        self._ids: dict[str, InFlight] = {}  # Generate request ids admitted (running or waiting)

    @property
    def admitted(self) -> int:
        return self.running + len(self._waiters)

    def stats(self) -> dict:
        return {"running": self.running, "waiting": len(self._waiters), "admitted": self.admitted,
                "max_ongoing": self.max_ongoing, "max_queued": self.max_queued}

    def drain(self) -> None:
        """Admit nothing more (Draining: UNAVAILABLE / HTTP 503); requests running or waiting carry on."""
        self.draining = True

    def check_room(self, count: int) -> None:
        """AdmissionFull unless ``count`` more requests fit (running or waiting) now."""
        if self.admitted + count > self.max_ongoing + self.max_queued:
            raise AdmissionFull(f"the server is at its admission limit: {self.running} requests running "
                                f"(max {self.max_ongoing}) and {len(self._waiters)} waiting (max {self.max_queued}); "
                                "retry later")

    def _report(self) -> None:
        telemetry.admission(self.running, len(self._waiters))

    @contextlib.asynccontextmanager
    async def slot(self, request_id: str | None = None):
        """Hold one admission slot for the body; AdmissionFull at once if every slot and queue place is taken,
        DuplicateRequestId if ``request_id`` is in flight already. Yields the request's InFlight record."""
        if self.draining:
            raise Draining("the server is shutting down and admits no new requests; retry on another replica")
        if request_id is not None and request_id in self._ids:
            raise DuplicateRequestId(f"request_id {request_id!r} is already in flight; request ids must be unique "
                                     "among running requests")
        self.check_room(1)
        record = InFlight(request_id or "")
        if request_id is not None:
            self._ids[request_id] = record
        try:
            if self.running < self.max_ongoing and not self._waiters:
                self.running += 1
                self._report()
            else:
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                self._report()
                try:
                    await waiter  # resolved by _release, which hands its slot over (running stays counted)
                except BaseException:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
                        self._report()
                    elif waiter.done() and not waiter.cancelled():  # got the slot as it was cancelled: pass it on
                        self._release()
                    raise
            try:
                yield record
            finally:
                self._release()
        finally:
            if request_id is not None and self._ids.get(request_id) is record:
                del self._ids[request_id]

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next in line
                self._report()
                return
        self.running -= 1
        self._report()

    def abort(self, request_id: str) -> bool:
        """Mark a request still in flight here (waiting for a slot, or running) as aborted; True if it is."""
        record = self._ids.get(request_id)
        if record is None:
            return False
        record.aborted = True
        return True
