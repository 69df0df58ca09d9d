"""The controller's other half: changes to the worker list. Workers die (restore their experts on the live ones,
or on replacements), the operator or the autoscaler asks for more or fewer (scale, drained before they stop), the
healer brings the live workers back to the target, and a restarted controller rebuilds the plan from what the
workers hold. Every change is one two-phase switch (``PlacementController._switch``) onto a plan the controller
numbers; layouts come from moeray.placement.algorithms.replan.

``ElasticWorkers`` is mixed into ``PlacementController`` (moeray.placement.runtime.controller); it uses the
controller's plan, topology, ops, locks and switch.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from moeray.placement.algorithms import replan
from moeray.placement.algorithms.plan import Plan
from moeray.placement.algorithms.topology import Topology

log = logging.getLogger(__name__)

HEAL_PLACEMENT_TIMEOUT_S = 120.0  # how long the background healer waits for replacement workers to be placed
RESTORE_ATTEMPTS = 3  # a restore that finds more dead workers while it switches plans again without them


class WorkersDied(RuntimeError):
    """A switch failed because these workers (current numbering) are dead."""

    def __init__(self, workers: list[int]) -> None:
        super().__init__(f"expert workers {workers} died")
        self.workers = workers


class ElasticWorkers:
    """Restore, heal, scale and rebuild, for ``PlacementController``."""

    # -- failures ----------------------------------------------------------------------------------------
    def restore(self, dead: list[int]) -> dict:
        """Workers died: re-place every expert over the live workers (their weights fetched from surviving
        replicas or re-read from the checkpoint), restoring as much redundancy as the live slots hold. When the live
        workers cannot hold every expert, start replacement workers first (bounded by ``restore_timeout_s``).
        Either way the worker list is brought back to ``target_workers`` afterwards (``heal``). Idempotent:
        routers that find the same dead worker call it too."""
        started_ns = time.time_ns()
        with self._switching:
            newly = frozenset(dead) - self.dead_workers
            self.dead_workers = self.dead_workers | frozenset(dead)
            self.telemetry.workers_lost(len(newly))
            if not any(w in self.dead_workers for layer in self.plan.replica_workers() for ws in layer for w in ws):
                return {"applied": False, "epoch": self.plan.epoch, "dead_workers": sorted(self.dead_workers)}
            live = self.plan.num_workers - len(self.dead_workers)
            if self.plan.num_experts <= live * self.topology.slots_per_worker:
                return self._restore_on_live(started_ns)
        # NOTE: outside _switching: placing replacements may take a while (an autoscaler adds a node).
        return self._reshape(self.target_workers, f"failure: workers {sorted(self.dead_workers)} lost",
                             timeout_s=self.config.restore_timeout_s, started_ns=started_ns)

    def _restore_on_live(self, started_ns: int) -> dict:
        current = self.plan
        for attempt in range(RESTORE_ATTEMPTS):
            new = self._plan_without(self.dead_workers)
            try:
                stats = self._switch(new)
                break
            except WorkersDied as e:  # more died than the routers have noticed yet: plan without them too
                if attempt == RESTORE_ATTEMPTS - 1:
                    raise
                self.dead_workers = self.dead_workers | frozenset(e.workers)
        read = sum(s.get("read_slots", 0) for s in stats)
        record = self._applied({"reason": f"failure: workers {sorted(self.dead_workers)} lost",
                                "dead_workers": sorted(self.dead_workers)}, current, new, stats, started_ns)
        self.telemetry.restored(started_ns)
        log.warning("placement epoch %d -> %d: %s; %d slots re-read from the checkpoint", current.epoch,
                    new.epoch, record["reason"], read)
        return record

    def experts_available(self) -> bool:
        """Every logical expert has a replica on a live worker (what health reports)."""
        dead = self.dead_workers
        return all(any(w not in dead for w in ws) for layer in self.plan.replica_workers() for ws in layer)

    def heal(self) -> dict | None:
        """Bring the live workers back to ``target_workers`` (replacing the dead, or a requested scale); None when
        there is nothing to do. The controller's loop calls it until it succeeds."""
        if self.plan.num_workers - len(self.dead_workers) == self.target_workers and not self.dead_workers:
            return None
        reason = "scale" if not self.dead_workers else f"replace: workers {sorted(self.dead_workers)} lost"
        # NOTE: no request waits on this: a slow worker start (a loaded node, an autoscaler's new one) must not
        # fail every retry, so placement may take longer than the restore timeout requests wait.
        return self._reshape(self.target_workers, reason,
                             timeout_s=max(self.config.restore_timeout_s, HEAL_PLACEMENT_TIMEOUT_S))

    def _applied(self, record: dict, current: Plan, new: Plan, stats: list[dict], started_ns: int) -> dict:
        """Complete the record of a switch made for a failure, a scale or a restart; keep and report it. Moved
        slots are those the workers loaded (kept ones not counted), from peers or from the checkpoint."""
        fetched = sum(s.get("fetched_slots", 0) for s in stats)
        read = sum(s.get("read_slots", 0) for s in stats)
        load_LE = self._window_LE()
        record = {"policy": self._policy_name, "from_epoch": current.epoch, "epoch": new.epoch, "applied": True,
                  "moved_slots": fetched + read, "moved_bytes": (fetched + read) * self.budget.expert_bytes,
                  "fetched_slots": fetched, "read_slots": read, "read_bytes": read * self.budget.expert_bytes,
                  "redundant": new.num_slots - new.num_experts,
                  "expected_imbalance_before": float("nan"),  # the old plan's workers are gone or renumbered
                  "expected_imbalance_after": self._expected_imbalance(load_LE, new), **record}
        self.history.append(record)
        self.telemetry.rebalanced(record, started_ns)
        return record

    def rebuild(self) -> dict:
        """After a controller restart: rebuild the plan from what the workers hold and switch everyone to it under
        a fresh epoch (which also settles a switch the previous controller left half done). Experts lost with
        workers that died meanwhile are placed again, read from the checkpoint."""
        started_ns = time.time_ns()
        with self._switching:
            infos = self.ops.worker_infos()
            self.dead_workers = frozenset(i for i, info in enumerate(infos) if info is None)
            live = [info for info in infos if info is not None]
            if not live:
                raise RuntimeError("cannot rebuild the plan: no expert worker answers")
            reported = replan.reported_layout(infos, self.plan.num_layers, self.plan.num_experts)
            # NOTE: above every epoch any worker holds, prepared or committed, so no one mistakes the new one.
            epoch = max(max(info["epochs"]) for info in live)
            if reported is not None:
                self.plan = reported.at_epoch(epoch)
                new, peers = reported.at_epoch(epoch + 1), True
            else:
                self.plan = dataclasses.replace(self.plan, epoch=epoch)
                new, peers = self._plan_without(self.dead_workers), False  # self.plan's holders are unknown
            current = self.plan
            stats = self._switch(new, peers=peers)
            record = self._applied({"reason": "restart: the controller restarted",
                                    "dead_workers": sorted(self.dead_workers)}, current, new, stats, started_ns)
            log.warning("placement controller restarted: plan rebuilt from %d live workers at epoch %d",
                        len(live), new.epoch)
            return record

    # -- elasticity --------------------------------------------------------------------------------------
    def check_workers(self, workers: int) -> None:
        """Raise ValueError, naming the limit, for a worker count this controller must not scale to: outside
        [min_workers, max_workers], or, with no max_workers set, beyond what the cluster's resources hold now (on
        an autoscaling cluster set max_workers: the autoscaler adds the nodes)."""
        c = self.config
        top = c.max_workers if c.max_workers is not None else self.ops.max_workers()
        if workers < c.min_workers or (top is not None and workers > top):
            why = " (what the cluster's resources hold; set max_workers to go further)" \
                if c.max_workers is None and top is not None else ""
            raise ValueError(f"workers must lie in [{c.min_workers}, {top or 'unbounded'}]{why}; got {workers}")
        if self.plan.num_experts > workers * self.topology.slots_per_worker:
            raise ValueError(f"{workers} workers x {self.topology.slots_per_worker} slots cannot hold the "
                             f"{self.plan.num_experts} experts of a layer; at least "
                             f"{-(-self.plan.num_experts // self.topology.slots_per_worker)} are needed")

    def request_scale(self, workers: int) -> dict:
        """Set the worker count to reach and return at once; the controller's loop does the work (``heal``) and
        ``healing`` reports its progress."""
        self.check_workers(workers)
        self.target_workers = workers
        self.healing = {**self.healing, "target_workers": workers}
        return {"target": workers, "epoch": self.plan.epoch, "accepted": True}

    def scale(self, workers: int, reason: str = "scale") -> dict:
        """Change the number of live workers to ``workers`` now: new ones start empty and load their slots from
        peers; leaving ones (the highest numbers, and any dead) are drained: the new plan places their experts
        elsewhere before they stop. Requests flow throughout."""
        self.check_workers(workers)
        self.target_workers = workers
        return self._reshape(workers, reason, timeout_s=None)

    def _reshape(self, workers: int, reason: str, timeout_s: float | None, started_ns: int | None = None) -> dict:
        started_ns = started_ns or time.time_ns()
        with self._reshaping:
            live = self._live()
            if workers == len(live) and not self.dead_workers:
                return {"applied": False, "workers": workers, "epoch": self.plan.epoch, "reason": reason}
            # NOTE: the last failure's reason stays until an attempt succeeds (the healer retries with backoff)
            self.healing = {**self.healing, "state": "placing workers", "target_workers": workers}
            new: list = []
            try:
                for _ in range(RESTORE_ATTEMPTS):
                    # 1. New workers are placed (and load nothing yet) while requests and switches go on; more
                    #    are placed if more workers died meanwhile.
                    missing = workers - min(workers, len(self._live())) - len(new)
                    if missing > 0:
                        new += self.ops.spawn(missing, self.plan.epoch, timeout_s or 600.0)
                    self.healing["state"] = "loading experts"
                    with self._switching:
                        keep = self._live()[: max(0, workers - len(new))]
                        if len(keep) + len(new) < workers:
                            continue
                        # 2. The next plan's worker list, then one two-phase switch onto it.
                        node_ids = self.ops.stage(keep, new)
                        index = {n: i for i, n in enumerate(dict.fromkeys(node_ids))}
                        topology = Topology(worker_node=tuple(index[n] for n in node_ids),
                                            slots_per_worker=self.topology.slots_per_worker)
                        current, plan = self.plan, self._fit_plan(topology, "scale")
                        new, placed = [], new  # NOTE: from here on the switch owns them (an abort stops them)
                        stats = self._switch(plan, old_index=keep + [None] * len(placed), dead=frozenset())
                        self.topology, self.dead_workers = topology, frozenset()
                        record = self._applied({"reason": reason, "workers": len(node_ids),
                                                "scale": f"{len(live)} -> {len(node_ids)} workers"},
                                               current, plan, stats, started_ns)
                        self._reset_window(plan)
                        break
                else:
                    raise WorkersDied(sorted(self.dead_workers))
            except Exception as e:
                self.ops.stop(new)  # placed but never switched to
                self.healing = {"state": "failed, retrying", "target_workers": workers, "error": str(e)[:500]}
                raise
            self.healing = {"state": "idle", "target_workers": workers, "error": ""}
        if reason.startswith(("failure", "replace")):
            self.telemetry.restored(started_ns)
        log.info("placement epoch %d -> %d: %s (%s)", current.epoch, plan.epoch, record["scale"], reason)
        return record

    def _live(self) -> list[int]:
        return [w for w in range(self.plan.num_workers) if w not in self.dead_workers]

    def _reset_window(self, plan: Plan) -> None:
        """A new worker list: the window's worker counts and the hysteresis start over."""
        self.load.clear_window(plan.num_workers)
        with self._lock:
            self.rebalance_state = dataclasses.replace(self.rebalance_state, hot_windows=0)
