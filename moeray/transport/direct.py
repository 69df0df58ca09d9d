"""The direct transport: ``worker.forward(*call)`` on ``ExpertWorker`` objects in this process (``backend="local"``,
``moeray.local_engine``). No Ray, no serialization.

The wire format still applies (``moeray.transport.wire``): the dispatcher builds the same ``WorkerCall``s for every
transport. On a CPU it costs nothing, since ``pack`` and ``unpack`` share memory with the tensors; on a GPU it is
one copy to the host and back per touched worker and layer, as on the Ray paths.

Calls run on the calling thread one after another unless ``threads`` > 1: then on a small pool, so that touched
workers compute at once (their kernels release the GIL). One thread is the default: on a CPU every call already uses
all of torch's threads, and two calls at once would oversubscribe them; on one GPU the kernels share one stream
anyway. Sends may come from several threads at once (micro-batches, ``moeray.router.dispatch``): a worker's
``forward`` takes concurrent calls, as its Ray actor does.
"""

from __future__ import annotations

import concurrent.futures

import torch

from moeray.transport.base import Sent
from moeray.transport.wire import WireTensor, WorkerCall


def _forward(worker, call: WorkerCall) -> WireTensor:
    # NOTE: grad mode is per thread: a pool thread does not inherit the router's no_grad.
    with torch.no_grad():
        return worker.forward(*call)


class DirectTransport:
    """In-process workers cannot die apart from this process, so nothing is ever reported ``lost``: an error in a
    worker's forward raises here, failing the step like any other worker error."""

    concurrent_sends = True

    def __init__(self, workers: list, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1; got {threads}")
        self.workers = list(workers)
        self.threads = threads
        self._pool = None if threads == 1 else concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="moeray-direct")

    def set_workers(self, workers: list) -> None:
        self.workers = list(workers)

    def send(self, calls: dict[int, WorkerCall]) -> Sent:
        if self._pool is None or len(calls) == 1:
            return Sent({w: _forward(self.workers[w], call) for w, call in calls.items()})
        futures = {w: self._pool.submit(_forward, self.workers[w], call) for w, call in calls.items()}
        return Sent({w: f.result() for w, f in futures.items()})

    def release_if_idle(self) -> bool:
        return False

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
