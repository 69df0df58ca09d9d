"""The placement controller as a Ray actor, and the one wrapper through which it calls workers and routers.

``RayActorOps`` is the only placement code that calls Ray (tests of the controller's logic use a fake with the
same methods). ``ControllerActor`` runs a ``PlacementController`` with a loop thread that pulls load from the
routers every ``poll_interval_s``; it is threaded, so reads (plan, load) answer while a switch is under way.
"""

from __future__ import annotations

import logging
import threading

try:
    import ray
except ImportError:  # NOTE: moeray.engine imports this module; its in-process backend runs without Ray
    ray = None

from moeray import telemetry
from moeray.placement.algorithms.plan import Plan
from moeray.placement.algorithms.topology import Budget, Topology
from moeray.placement.config import ControllerConfig
from moeray.placement.runtime.controller import PlacementController, WorkersDied

log = logging.getLogger(__name__)

HEAL_INTERVAL_S = 1.0  # how often the healer pings the workers
HEAL_MAX_BACKOFF_S = 30.0


class RayActorOps:
    """``workers`` are the current plan's; ``next_workers`` the next plan's (the same list unless ``stage``
    staged another): prepare, switch and commit address the next ones, peers are named in the current numbering."""

    def __init__(self, workers: list, routers: list, spawn=None, timeout_s: float = 600.0) -> None:
        self.workers, self.routers, self.spawn_worker, self.timeout_s = list(workers), list(routers), spawn, timeout_s
        self.next_workers = self.workers
        self.routed: tuple | None = None  # (plan, workers) the routers were last sent: a restarted router's start

    def spawn(self, count: int, epoch: int, timeout_s: float) -> list:
        """Start ``count`` new, empty workers and wait up to ``timeout_s`` for Ray to place them (an autoscaler may
        add nodes meanwhile); on timeout they are stopped and a TimeoutError names what the cluster has."""
        if count and self.spawn_worker is None:
            raise RuntimeError("this controller cannot start workers (no spawner)")
        new = [self.spawn_worker(len(self.workers) + i, epoch=epoch) for i in range(count)]
        try:
            ray.get([w.ping.remote() for w in new], timeout=timeout_s)
        except Exception as e:
            for w in new:
                ray.kill(w)
            if isinstance(e, ray.exceptions.GetTimeoutError):
                raise TimeoutError(f"{count} new expert workers were not placed within {timeout_s:.0f}s; the "
                                   f"cluster has {_resources(ray.available_resources())} free") from None
            raise
        return new

    def stage(self, keep: list[int], new: list) -> list[str]:
        """Stage the next plan's workers: the current ones in ``keep``, in that order, then ``new``. Returns the
        staged workers' node ids."""
        self.next_workers = [self.workers[i] for i in keep] + list(new)
        return [info["node_id"] for info in ray.get([w.info.remote() for w in self.next_workers],
                                                    timeout=self.timeout_s)]

    def stop(self, workers: list) -> None:
        for w in workers:
            ray.kill(w)

    def dead_workers(self, timeout_s: float = 5.0) -> list[int]:
        """Current workers whose process is gone (a ping raises); a slow one is not dead."""
        refs = [w.ping.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        ready = set(ready)
        dead = []
        for i, ref in enumerate(refs):
            if ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    dead.append(i)
        return dead

    def max_workers(self) -> int | None:
        """How many workers of this spawner's shape the cluster's resources hold (None: no spawner)."""
        options = getattr(self.spawn_worker, "options", None)
        if options is None:
            return None
        total = ray.cluster_resources()
        if options.get("num_gpus"):
            return int(total.get("GPU", 0) // options["num_gpus"])
        share = options.get("num_cpus") or 0
        return None if not share else int(total.get("CPU", 0) // share)

    def take_loads(self) -> list[dict]:
        reports = []
        for ref in [r.take_load.remote() for r in self.routers]:
            try:
                reports.append(ray.get(ref, timeout=self.timeout_s))
            except ray.exceptions.RayActorError:  # a router restarting after a crash: its load is gone with it
                pass
        return reports

    def prepare(self, epoch: int, experts_per_worker: list[list[list[int]]],
                peers_per_worker: list[dict[int, list[tuple[int, int]]]], skip: frozenset[int]) -> list[dict]:
        refs = [w.prepare.remote(epoch, experts, [(self.workers[p], pairs) for p, pairs in peers.items()])
                for i, (w, experts, peers) in enumerate(zip(self.next_workers, experts_per_worker, peers_per_worker))
                if i not in skip]
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.RayError:
            # A target or a peer it fetched from may have died (its node went, say): name the dead, if any.
            dead = [i for i, info in enumerate(self.worker_infos(timeout_s=10)) if info is None and i not in skip]
            if dead:
                raise WorkersDied(dead) from None
            raise

    def worker_infos(self, timeout_s: float | None = None) -> list[dict | None]:
        """Each current worker's info (its slots and epochs), None for one that is dead or does not answer."""
        out = []
        for ref in [w.info.remote() for w in self.workers]:
            try:
                out.append(ray.get(ref, timeout=timeout_s or self.timeout_s))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                out.append(None)
        return out

    def workers_alive(self, timeout_s: float = 1.0) -> int:
        """How many workers answer a ping within ``timeout_s`` (telemetry's moeray_workers_alive)."""
        refs = [w.ping.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        alive = 0
        for ref in ready:
            try:
                alive += bool(ray.get(ref))
            except ray.exceptions.RayError:
                pass
        return alive

    def switch(self, plan: Plan) -> None:
        workers = None if self.next_workers is self.workers else self.next_workers
        self.routed = (plan, list(self.next_workers))  # set first: a router restarting now starts on it
        for i, ref in enumerate([r.set_plan.remote(plan, workers) for r in self.routers]):
            try:
                ray.get(ref, timeout=self.timeout_s)
            except ray.exceptions.RayActorError:  # it restarts on the controller's plan (Router.__init__)
                log.warning("router %d is down during the switch to epoch %d", i, plan.epoch)

    def commit(self, epoch: int, skip: frozenset[int]) -> None:
        ray.get([w.commit.remote(epoch, i) for i, w in enumerate(self.next_workers) if i not in skip],
                timeout=self.timeout_s)
        # Workers the new plan does not use (drained, or dead) are stopped.
        for w in self.workers:
            if not any(w is n for n in self.next_workers):
                ray.kill(w)
        self.workers = self.next_workers

    def abort(self, epoch: int, skip: frozenset[int]) -> None:
        for i, ref in [(i, w.abort.remote(epoch)) for i, w in enumerate(self.next_workers) if i not in skip]:
            try:
                ray.get(ref, timeout=self.timeout_s)
            except Exception:  # a worker that failed its prepare may be gone; the others still drop theirs
                log.exception("abort of epoch %d failed on worker %d", epoch, i)
        for w in self.next_workers:  # workers started for the aborted plan are stopped
            if not any(w is c for c in self.workers):
                ray.kill(w)
        self.next_workers = self.workers


def _resources(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU") or "memory" not in k
                     and not k.startswith("node:"))


def topology_of(workers: list, slots_per_worker: int) -> Topology:
    """Number the nodes the workers run on (in worker order) and build the topology."""
    node_ids = [info["node_id"] for info in ray.get([w.info.remote() for w in workers])]
    index = {n: i for i, n in enumerate(dict.fromkeys(node_ids))}
    return Topology(worker_node=tuple(index[n] for n in node_ids), slots_per_worker=slots_per_worker)


class ControllerActor:
    def __init__(self, *, config: ControllerConfig, plan: Plan, topology: Topology, budget: Budget,
                 workers: list, routers: list, spawn=None,
                 telemetry_config: telemetry.TelemetryConfig | None = None) -> None:
        telemetry.setup(telemetry_config)
        self.controller = PlacementController(config=config, plan=plan, topology=topology, budget=budget,
                                              ops=RayActorOps(workers, routers, spawn))
        self.controller.ops.routed = (plan, list(workers))
        if ray.get_runtime_context().was_current_actor_reconstructed:  # Ray restarted this controller
            self.controller.rebuild()
        self._stopped, self._wake_healer = threading.Event(), threading.Event()
        self._loop = threading.Thread(target=self._run, name="moeray-placement-loop", daemon=True)
        self._loop.start()
        self._healer = threading.Thread(target=self._heal, name="moeray-healer", daemon=True)
        self._healer.start()

    def _heal(self) -> None:
        """Find dead workers without waiting for a router to trip over them, restore their experts, and bring the
        worker list back to its target (replacements, or a requested scale); retried with backoff until it
        holds."""
        backoff = HEAL_INTERVAL_S
        while not self._stopped.is_set():
            self._wake_healer.wait(backoff)
            self._wake_healer.clear()
            controller = self.controller
            try:
                dead = set(controller.ops.dead_workers()) - controller.dead_workers
                if dead:
                    log.warning("expert workers %s are dead: restoring their experts", sorted(dead))
                    controller.restore(sorted(dead))
                controller.heal()
                backoff = HEAL_INTERVAL_S
            except Exception:  # e.g. no room for a replacement yet: try again later
                log.exception("healing the expert workers failed; retrying in %.0fs", backoff)
                backoff = min(backoff * 2, HEAL_MAX_BACKOFF_S)

    def request_scale(self, workers: int) -> dict:
        """Validate and accept a worker count; the healer reaches it in the background (GetPlacement shows how
        far it got)."""
        record = self.controller.request_scale(workers)
        self._wake_healer.set()
        return record

    def health(self) -> dict:
        """Whether every expert has a live replica, and the healing state (for health checks and GetPlacement)."""
        c = self.controller
        return {"serving": c.experts_available(), "dead_workers": sorted(c.dead_workers),
                "live_workers": c.plan.num_workers - len(c.dead_workers), **c.healing}

    def _run(self) -> None:
        while not self._stopped.wait(self.controller.config.poll_interval_s):
            try:
                self.controller.poll()
                if telemetry.STATE.metrics:
                    self.controller.telemetry.workers_alive(self.controller.ops.workers_alive())
            except Exception:  # a failed poll or automatic rebalance must not stop the loop
                log.exception("placement poll failed")

    def plan(self) -> Plan:
        return self.controller.plan

    def describe(self) -> dict:
        return self.controller.describe()

    def window_load(self) -> dict:
        """Tokens per (layer, expert) and per (layer, worker) over the load window, its step records, and tokens
        per (layer, expert) since the start."""
        self.controller.pull()
        expert_LE, worker_LW = self.controller.window_load()
        expected_LW = self.controller.expected_load(expert_LE)
        if expected_LW.shape != worker_LW.shape:  # the window was counted under another worker count (a scale)
            expected_LW = None
        return {"expert_LE": expert_LE, "worker_LW": worker_LW, "steps": len(self.controller.window),
                "total_LE": self.controller.total_LE.copy(), "expected_LW": expected_LW}

    def take_load(self):
        return self.controller.take_load()

    def top_tokens(self, k: int = 10):
        self.controller.pull()
        return self.controller.top_tokens(k)

    def rebalance(self, **kwargs) -> dict:
        return self.controller.rebalance(**kwargs)

    def set_policy(self, name: str, params: dict | None = None) -> None:
        self.controller.set_policy(name, params)

    def restore(self, dead: list[int]) -> dict:
        record = self.controller.restore(dead)
        self._wake_healer.set()  # replace the dead workers in the background
        return record

    def scale(self, workers: int) -> dict:
        return self.controller.scale(workers)

    def workers(self) -> list:
        return list(self.controller.ops.workers)

    def plan_and_workers(self) -> tuple:
        """The plan the routers were last switched to and its worker handles, read together (for a router that
        restarted). NOTE: not under the switch lock: a switch waits for every router to take the new plan, and a
        router restarting meanwhile (its node lost) runs this in its constructor before it can take any; the
        switch's own call then reaches it after its constructor, with the same plan or a newer one."""
        return self.controller.ops.routed

    def history(self) -> list[dict]:
        return list(self.controller.history)

    def ping(self) -> bool:
        return True

    def shutdown(self) -> None:
        self._stopped.set()
        self._wake_healer.set()
        self._loop.join(timeout=5)
        telemetry.shutdown()  # flush: the engine kills this actor next
