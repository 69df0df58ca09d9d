"""The transport interface: how one MoE layer's per-worker payloads reach the expert workers and come back.

The dispatcher decides what each worker gets (``moeray.router.dispatch``); a transport only moves it, in the wire
format every path shares (``moeray.transport.wire``):

    send({worker: WorkerCall}) -> Sent(results={worker: WireTensor}, lost={workers found dead})

- ``object_store`` (always works): one ``worker.forward.remote(*call)`` per touched worker, numpy payloads through
  Ray's object store.
- ``compiled_graph``: one Ray compiled graph over all the router's workers, executed once per MoE layer through
  shared-memory channels (an untouched worker gets ``None`` and answers at once). One router only: a worker can be
  in one compiled graph at a time, and only the process that compiled a graph may execute it.
- ``direct``: ``worker.forward(*call)`` on ``ExpertWorker`` objects in this process (``backend="local"``,
  ``moeray.local_engine``): no Ray at all.
- ``collective``: a torch.distributed process group per router over its live workers (gloo on CPU, NCCL when the
  router's device is CUDA), rendezvous through Ray; per layer, batched point-to-point transfers to the touched
  workers only (a header, then the payloads). Any number of routers: a worker serves one group per router. The
  group is rebuilt when membership changes (scaling, a death, a router restart).
- ``tcp``: a connected socket from the router to each touched worker, one message each way per layer (the wire
  format's arrays pickled out of band); pooled connections, any number of routers, nothing polls. The cheapest
  path measured here at every batch size.

A worker found dead is reported in ``lost``; the dispatcher routes its pairs to other replicas and sends again.
``make_transport`` turns the configured name (``EngineConfig.transport``) into a transport; the router calls it in
its own process (a compiled graph runs only in the process that compiled it).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

from moeray.transport.wire import WireTensor, WorkerCall

log = logging.getLogger(__name__)

TRANSPORTS = ("object_store", "compiled_graph", "direct", "collective", "tcp")


@dataclasses.dataclass(frozen=True)
class Sent:
    results: dict[int, WireTensor]  # per worker that answered: its experts' weighted outputs per token it got
    lost: frozenset[int] = frozenset()  # workers found dead (a compiled graph may find some that had no call)


class Transport(Protocol):
    workers: list  # the worker handles, indexed as the plan numbers them

    def send(self, calls: dict[int, WorkerCall]) -> Sent:
        """Run every call (keyed by worker index); a worker's error other than its death raises here."""

    def set_workers(self, workers: list) -> None:
        """A new worker list (the controller scaled): earlier deaths no longer apply. Call between sends."""

    def release_if_idle(self) -> bool:
        """Nothing was sent for a while: free what polls (a compiled graph); the next send rebuilds it."""

    def close(self) -> None: ...


def make_transport(name: str, workers: list) -> Transport:
    """The transport ``name`` (one of ``TRANSPORTS``) over ``workers``."""
    if name == "object_store":
        from moeray.transport.object_store import ObjectStoreTransport
        return ObjectStoreTransport(workers)
    if name == "compiled_graph":
        from moeray.transport.compiled_graph import CompiledGraphTransport
        return CompiledGraphTransport(workers)
    if name == "direct":
        from moeray.transport.direct import DirectTransport
        return DirectTransport(workers)
    if name == "collective":
        from moeray.transport.collective import CollectiveTransport
        return CollectiveTransport(workers)
    if name == "tcp":
        from moeray.transport.tcp import TcpTransport
        return TcpTransport(workers)
    raise ValueError(f"transport {name!r} is not one of {TRANSPORTS}")


PING_TIMEOUT_S = 30.0  # how long a liveness call may take before a worker counts as dead (a slow one is not)


class WorkerFailed(RuntimeError):
    """A worker's ``forward`` raised (anything but its death): the router's step fails with its message."""


def call_each(workers: list, members: list[int], method: str, timeout_s: float = PING_TIMEOUT_S) -> set[int]:
    """Call ``method`` on each member worker; returns those found dead (one that is merely slow is not)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    refs = {w: getattr(workers[w], method).remote() for w in members}
    dead = set()
    for w, ref in refs.items():
        try:
            ray.get(ref, timeout=timeout_s)
        except RayActorError:
            dead.add(w)
        except GetTimeoutError:
            log.warning("worker %d did not answer %s within %.0fs", w, method, timeout_s)
    return dead
