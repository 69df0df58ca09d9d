"""The compiled-graph transport: one Ray compiled graph over all of a router's workers, one ``execute`` per layer.

    execute(call_0, ..., call_W-1)          one payload per worker in the graph (None: untouched this layer)
      ├─▶ worker 0: forward_compiled(call_0) ─┐
      ├─▶ ...                                 ├─▶ MultiOutputNode ─▶ results, in worker order
      └─▶ worker W-1: forward_compiled(...)  ─┘

On CPU the edges are Ray's shared-memory channels; nothing goes through the object store or the actor task
queue per layer. Ray's constraints shape the rest:
- only the process that compiled a graph may execute it, and an actor can be in one compiled graph at a time:
  this transport serves a single router (``EngineConfig`` enforces ``routers == 1``);
- membership is fixed at compile time: a new worker list tears the graph down and compiles a new one (lazily, at
  the next send); a plan switch alone does not, since the epoch travels in each payload;
- a worker that dies makes ``execute`` raise: the graph is torn down, the dead are found by ping and reported in
  ``Sent.lost``, and the calls of the live ones go again on a graph compiled over the live workers only;
- each worker keeps its share of the graph's executable tasks (``ExpertWorker.hold_compiled``), so that a router
  Ray restarted after a crash can cancel the graph its previous incarnation left running there before it
  compiles its own (``release_compiled``); without that, the new graph's loop would queue behind the old one.
Ray runs a compiled graph's loop on the actor's ``_ray_system`` thread, so a worker in a graph still answers its
ordinary methods (info, prepare, commit) on its other threads. That loop polls its input channel: measured here,
an idle worker in a graph burns 0.3-1 of a CPU core. So a graph unused for ``IDLE_TEARDOWN_S`` is torn down (the
router's loop asks, ``release_if_idle``) and compiled again at the next send. The router polls too while it waits
for a layer's results (Ray's channel read with a timeout spins on the semaphore): on a machine whose cores the
workers need, that took a third of their CPU (a layer 1.5x slower). So the router first sleeps ``poll_backoff`` of
the shortest recent round trip for layers of that size (by the largest call's pair count, a power-of-two bucket),
then reads. The shortest, not a mean: an estimate too long would only be measured back as the sleep it caused;
with the minimum an overestimate shrinks by ``poll_backoff`` per layer, and a slower regime shows within a window.

NCCL (``with_tensor_transport``) does not apply here: it joins actors inside a graph, and the router is the
graph's driver, whose input and output edges are always shared memory. On GPUs the payloads are host copies.
"""

from __future__ import annotations

import collections
import logging
import time

import ray
from ray.exceptions import RayActorError, RayChannelError, RayChannelTimeoutError

from moeray.transport.base import PING_TIMEOUT_S, Sent, call_each
from moeray.transport.wire import WorkerCall

log = logging.getLogger(__name__)

GET_TIMEOUT_S = 300.0  # one layer's results; Ray's default (10 s) is too short for a loaded CPU machine
MAX_ATTEMPTS = 3  # executions of one layer: a death found per attempt, then give up
IDLE_TEARDOWN_S = 10.0  # a compile costs ~0.1-1 s; an idle graph's polling costs a core per few workers
POLL_BACKOFF = 0.5  # < 1, so that an overestimate shrinks (see the module docstring)
ROUND_TRIP_WINDOW = 8  # executions per size bucket whose shortest round trip sets the next sleep


def _actor_ids(workers: list) -> list:
    return [getattr(w, "_actor_id", id(w)) for w in workers]


class CompiledGraphTransport:
    def __init__(self, workers: list, get_timeout_s: float = GET_TIMEOUT_S, method: str = "forward_compiled",
                 idle_teardown_s: float = IDLE_TEARDOWN_S, poll_backoff: float = POLL_BACKOFF) -> None:
        if not 0 <= poll_backoff < 1:
            raise ValueError(f"poll_backoff must lie in [0, 1); got {poll_backoff}")
        self.workers = list(workers)
        self.method = method  # the worker method each node runs (``moeray bench layer``'s floor: an echo)
        self.get_timeout_s, self.idle_teardown_s, self.poll_backoff = get_timeout_s, idle_teardown_s, poll_backoff
        self._round_trip_s: dict[int, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=ROUND_TRIP_WINDOW))  # size bucket -> recent round trips
        self.dead: set[int] = set()
        self.graph = None
        self.members: list[int] = []  # worker indices in the graph, in its input order
        self.compiles = self.idle_releases = 0
        self.last_send = time.monotonic()

    def set_workers(self, workers: list) -> None:
        if _actor_ids(workers) == _actor_ids(self.workers):
            return
        self._teardown()
        self.workers, self.dead = list(workers), set()

    def send(self, calls: dict[int, WorkerCall]) -> Sent:
        self.last_send = time.monotonic()
        lost = {w for w in calls if w in self.dead}
        for attempt in range(MAX_ATTEMPTS):
            if self.graph is None:
                lost |= self._compile()
            pending = {w: call for w, call in calls.items() if w not in self.dead}
            if not self.members:
                return Sent({}, frozenset(lost | set(pending)))
            try:
                outs = self._execute([pending.get(w) for w in self.members])
            except RayChannelTimeoutError:
                self._teardown()  # an execution still in flight leaves the channels out of step
                raise
            except (RayChannelError, RayActorError) as e:
                self._teardown()
                dead = self._find_dead(self.members)
                if not dead and attempt > 0:
                    raise
                log.warning("compiled graph execution failed (%s); workers %s dead; recompiling over the others",
                            type(e).__name__, sorted(dead))
                self.dead |= dead
                lost |= dead
                continue
            return Sent({w: out for w, out in zip(self.members, outs) if w in pending}, frozenset(lost))
        raise RuntimeError(f"the compiled graph failed {MAX_ATTEMPTS} times in a row")

    def _execute(self, payloads: list[WorkerCall | None]) -> list:
        bucket = max((len(p.pair_token_N) for p in payloads if p is not None), default=0).bit_length()
        recent = self._round_trip_s[bucket]
        started = time.perf_counter()
        # NOTE: plain tuples on the channel: Ray serializes them natively, a NamedTuple goes through pickle
        refs = self.graph.execute(*(None if p is None else tuple(p) for p in payloads))
        if self.poll_backoff and recent:
            time.sleep(self.poll_backoff * min(recent))  # rather than spin on the channel meanwhile
        outs = ray.get(refs, timeout=self.get_timeout_s)
        recent.append(time.perf_counter() - started)
        return outs

    def release_if_idle(self) -> bool:
        if self.graph is None or time.monotonic() - self.last_send < self.idle_teardown_s:
            return False
        log.info("compiled graph idle for %.0fs: torn down until the next send", self.idle_teardown_s)
        self._teardown()
        self.idle_releases += 1
        return True

    def close(self) -> None:
        self._teardown()

    # -- the graph -----------------------------------------------------------------------------------------
    def _compile(self) -> set[int]:
        """Compile over the live workers; returns the workers found dead on the way (added to ``self.dead``)."""
        from ray.dag import InputNode, MultiOutputNode

        found: set[int] = set()
        while True:
            members = [w for w in range(len(self.workers)) if w not in self.dead]
            # 1. Free the workers from a graph an earlier incarnation of this router may have left on them.
            dead = self._call_each(members, "release_compiled")
            if dead:
                self.dead |= dead
                found |= dead
                continue
            if not members:
                self.members = []
                return found
            # 2. One node per worker, each reading its own element of the input tuple.
            with InputNode() as inp:
                out = MultiOutputNode([getattr(self.workers[w], self.method).bind(inp[i])
                                       for i, w in enumerate(members)])
            try:
                graph = out.experimental_compile()
            except (RayChannelError, RayActorError):
                dead = self._find_dead(members)
                if not dead:
                    raise
                self.dead |= dead
                found |= dead
                continue
            break
        self.graph, self.members = graph, members
        self.compiles += 1
        # 3. Each worker keeps its tasks (see the module docstring); private to Ray, so only where it exists.
        tasks = getattr(graph, "actor_to_executable_tasks", None)
        if tasks is not None:
            ray.get([self.workers[w].hold_compiled.remote(tasks[self.workers[w]]) for w in members],
                    timeout=PING_TIMEOUT_S)
        log.info("compiled graph over workers %s (compile %d)", members, self.compiles)
        return found

    def _teardown(self) -> None:
        graph, self.graph, self.members = self.graph, None, []
        if graph is not None:
            try:
                graph.teardown()
            except Exception:  # noqa: BLE001 - a graph whose actors died tears down with errors; it is gone either way
                log.exception("compiled graph teardown failed")

    def _find_dead(self, members: list[int]) -> set[int]:
        return self._call_each(members, "ping")

    def _call_each(self, members: list[int], method: str) -> set[int]:
        return call_each(self.workers, members, method, PING_TIMEOUT_S)
