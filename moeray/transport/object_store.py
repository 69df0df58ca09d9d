"""The object-store transport: one ``worker.forward.remote(*call)`` per touched worker per MoE layer.

Each call's arrays go through Ray's object store (the format: ``moeray.transport.wire``); it always works, for any
number of routers. Every call is submitted before any result is awaited, so the touched workers compute at once
(a one-token layer whose top-k experts sit on different workers waits for the slowest, not for their sum), and
the results come back in one ``ray.get`` (one wait in Ray's core worker instead of one per worker).
"""

from __future__ import annotations

import time

import ray

from moeray.transport.base import Sent
from moeray.transport.wire import WorkerCall


class ObjectStoreTransport:
    """Calls go out together, results are gathered in worker order; a dead worker is reported, not raised."""

    concurrent_sends = True  # Ray actor calls from several threads at once are safe (micro-batches; dispatch.py)

    def __init__(self, workers: list) -> None:
        self.workers = list(workers)
        # Seconds submitting calls and waiting for their results, summed (``moeray bench layer``'s breakdown; with
        # micro-batches sending at once an update may be lost, which only that bench reads, sending from one thread)
        self.submit_s = self.wait_s = 0.0

    def set_workers(self, workers: list) -> None:
        self.workers = list(workers)

    def send(self, calls: dict[int, WorkerCall]) -> Sent:
        started = time.perf_counter()
        refs = {w: self.workers[w].forward.remote(*call) for w, call in calls.items()}
        submitted = time.perf_counter()
        try:
            return Sent(dict(zip(refs, ray.get(list(refs.values())))))
        except ray.exceptions.RayActorError:
            pass  # which workers died: each result on its own (the live ones' are ready or nearly)
        finally:
            self.submit_s += submitted - started
            self.wait_s += time.perf_counter() - submitted
        results, lost = {}, set()
        for w, ref in refs.items():
            try:
                results[w] = ray.get(ref)
            except ray.exceptions.RayActorError:
                lost.add(w)
        return Sent(results, frozenset(lost))

    def release_if_idle(self) -> bool:
        return False

    def close(self) -> None:
        pass
