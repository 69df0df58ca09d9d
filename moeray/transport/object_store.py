"""The object-store transport: one ``worker.forward.remote(*call)`` per touched worker per MoE layer.

Each call's arrays go through Ray's object store (the format: ``moeray.transport.wire``); it always works, for any
number of routers.
"""

from __future__ import annotations

import ray

from moeray.transport.base import Sent
from moeray.transport.wire import WorkerCall


class ObjectStoreTransport:
    """Calls go out together, results are gathered in worker order; a dead worker is reported, not raised."""

    def __init__(self, workers: list) -> None:
        self.workers = list(workers)

    def set_workers(self, workers: list) -> None:
        self.workers = list(workers)

    def send(self, calls: dict[int, WorkerCall]) -> Sent:
        refs = {w: self.workers[w].forward.remote(*call) for w, call in calls.items()}
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
