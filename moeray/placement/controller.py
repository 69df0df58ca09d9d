"""The placement controller: the only writer of the plan.

It pulls step load records from the routers into a sliding window, decides when to rebalance (on demand, on a
schedule, or when the measured imbalance stays above a threshold for several consecutive windows: hysteresis, so
it does not flap), asks the policy for a new plan, and switches to it in two phases:

    1. prepare  every worker makes the new epoch's slots resident beside the current ones
                (kept if resident, fetched from a peer worker that holds them, else read from the checkpoint)
    2. switch   every router moves to the new epoch between two forwards (a forward in flight ends on the old one)
    3. commit   every worker drops the other epochs' slots

A failed prepare aborts the switch (workers drop what they loaded; the current plan stays). Requests never see a
half-switched plan, so outputs are identical to a run that never rebalanced.

All Ray calls go through ``ActorOps`` (moeray.placement.actors), so this logic is tested with a fake.

Shape legend: L MoE layers, E logical experts, W workers.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Protocol

import numpy as np
import torch

from moeray.placement.config import ControllerConfig
from moeray.placement.load import LoadWindow, imbalance_L, worker_load_LW
from moeray.placement.metrics import ControllerMetrics
from moeray.placement.plan import Plan
from moeray.placement.policies import resolve_policy
from moeray.placement.topology import Budget, Topology

log = logging.getLogger(__name__)

HEAL_PLACEMENT_TIMEOUT_S = 120.0  # how long the background healer waits for replacement workers to be placed
RESTORE_ATTEMPTS = 3  # a restore that finds more dead workers while it switches plans again without them


class WorkersDied(RuntimeError):
    """A switch failed because these workers (current numbering) are dead."""

    def __init__(self, workers: list[int]) -> None:
        super().__init__(f"expert workers {workers} died")
        self.workers = workers


class ActorOps(Protocol):
    """Calls to the workers and routers. ``skip`` names workers known dead: they are not called."""

    def take_loads(self) -> list[dict]: ...
    def worker_infos(self) -> list[dict | None]: ...
    def dead_workers(self) -> list[int]: ...
    def max_workers(self) -> int | None: ...
    def spawn(self, count: int, epoch: int, timeout_s: float) -> list: ...
    def stage(self, keep: list[int], new: list) -> list[str]: ...
    def stop(self, workers: list) -> None: ...
    def prepare(self, epoch: int, experts_per_worker: list[list[list[int]]],
                peers_per_worker: list[dict[int, list[tuple[int, int]]]], skip: frozenset[int]) -> list[dict]: ...
    def switch(self, plan: Plan) -> None: ...
    def commit(self, epoch: int, skip: frozenset[int]) -> None: ...
    def abort(self, epoch: int, skip: frozenset[int]) -> None: ...


class PlacementController:
    def __init__(self, *, config: ControllerConfig, plan: Plan, topology: Topology, budget: Budget,
                 ops: ActorOps, clock=time.monotonic) -> None:
        if topology.num_workers != plan.num_workers:
            raise ValueError(f"topology has {topology.num_workers} workers; the plan {plan.num_workers}")
        self.config, self.plan, self.topology, self.budget, self.ops = config, plan, topology, budget, ops
        self.clock = clock
        self._policy_name, self._policy_params = config.policy, dict(config.policy_params)
        self._policy = resolve_policy(self._policy_name, self._policy_params)
        self._lock = threading.Lock()  # guards load state
        self._switching = threading.Lock()  # one plan switch at a time
        self._reshaping = threading.Lock()  # one change of the worker list at a time (its spawns outside _switching)
        self.target_workers = plan.num_workers  # what healing and scaling bring the live workers back to
        self.healing = {"state": "idle", "target_workers": plan.num_workers, "error": ""}  # progress, for GetPlacement
        L, E, W = plan.num_layers, plan.num_experts, plan.num_workers
        self.window = LoadWindow(num_layers=L, num_experts=E, num_workers=W, size=config.window_steps)
        self._since_take = (np.zeros((L, E), np.int64), np.zeros((L, W), np.int64))
        self.total_LE = np.zeros((L, E), np.int64)  # tokens per (layer, expert) since the start: a counter
        self._token_counts: collections.Counter[tuple[int, int, int]] = collections.Counter()
        self._steps_since_check, self._hot_windows = 0, 0
        self._last_rebalance = clock()
        self.history: list[dict] = []  # one record per applied rebalance
        self.dead_workers: frozenset[int] = frozenset()
        self.queue = {"waiting": 0, "running": 0, "capacity": 0}  # requests in the routers at the last pull
        self._busy_polls = self._idle_polls = 0
        self.total_steps = 0
        self.telemetry = ControllerMetrics(self)

    # -- load --------------------------------------------------------------------------------------------
    def poll(self) -> dict | None:
        """Pull the routers' step records into the window; rebalance if the hysteresis or schedule says so.
        Returns the rebalance record when one was applied."""
        self.pull()
        with self._lock:
            trigger = self._check_triggers()
            target = self._check_autoscale()
        if target is not None:
            return self.scale(target, reason="autoscale")
        return self.rebalance(reason=trigger) if trigger else None

    def _check_autoscale(self) -> int | None:
        """One more worker after ``autoscale_polls`` polls with a queue, one fewer after as many nearly idle."""
        c, queue = self.config, self.queue
        live = self.plan.num_workers - len(self.dead_workers)
        busy = c.scale_out_queue is not None and queue["waiting"] > c.scale_out_queue and (
            c.max_workers is None or live < c.max_workers)
        idle = c.scale_in_utilisation is not None and queue["waiting"] == 0 and live > c.min_workers and \
            queue["running"] < c.scale_in_utilisation * max(1, queue["capacity"])
        self._busy_polls = self._busy_polls + 1 if busy else 0
        self._idle_polls = self._idle_polls + 1 if idle else 0
        if self._busy_polls >= c.autoscale_polls or self._idle_polls >= c.autoscale_polls:
            target = live + (1 if busy else -1)
            self._busy_polls = self._idle_polls = 0
            return target
        return None

    def pull(self) -> None:
        """Pull the routers' step records into the window (no decisions)."""
        reports = self.ops.take_loads()
        with self._lock:
            self.queue = {key: sum(r.get(key, 0) for r in reports) for key in ("waiting", "running", "capacity")}
            for report in reports:
                for expert_LE, worker_LW in report["steps"]:
                    self._add_step(np.asarray(expert_LE), np.asarray(worker_LW))
                for layer, expert, token, count in np.asarray(report.get("tokens", ())).reshape(-1, 4).tolist():
                    self._token_counts[(layer, expert, token)] += count

    def _add_step(self, expert_LE: np.ndarray, worker_LW: np.ndarray) -> None:
        self.window.add(torch.from_numpy(expert_LE), torch.from_numpy(worker_LW))
        self._since_take[0][...] += expert_LE
        self.total_LE += expert_LE
        if worker_LW.shape == self._since_take[1].shape:
            self._since_take[1][...] += worker_LW
        self._steps_since_check += 1
        self.total_steps += 1
        self.telemetry.step(expert_LE, worker_LW)

    def _check_triggers(self) -> str | None:
        c = self.config
        if c.imbalance_threshold is not None and self._steps_since_check >= c.window_steps:
            self._steps_since_check = 0
            live = [w for w in range(self.window.shape[2]) if w not in self.dead_workers]
            measured = float(imbalance_L(self.window.total()[1][:, live]).mean())
            self._hot_windows = self._hot_windows + 1 if measured > c.imbalance_threshold else 0
            if self._hot_windows >= c.consecutive_windows:
                self._hot_windows = 0
                return f"imbalance {measured:.3f} > {c.imbalance_threshold} for {c.consecutive_windows} windows"
        if c.rebalance_interval_s is not None and self.clock() - self._last_rebalance >= c.rebalance_interval_s:
            self._last_rebalance = self.clock()
            if len(self.window):
                return "schedule"
        return None

    def window_load(self) -> tuple[np.ndarray, np.ndarray]:
        """Tokens per (layer, expert) and per (layer, worker) over the window (what GetLoad reports)."""
        with self._lock:
            expert_LE, worker_LW = self.window.total()
        return expert_LE.numpy(), worker_LW.numpy()

    def take_load(self) -> tuple[np.ndarray, np.ndarray]:
        """Tokens per (layer, expert) and per (layer, worker) since the previous call (pulls first)."""
        self.pull()
        with self._lock:
            out = (self._since_take[0].copy(), self._since_take[1].copy())
            self._since_take[0][...] = 0
            self._since_take[1][...] = 0
        return out

    def top_tokens(self, k: int = 10) -> list[list[list[tuple[int, int]]]]:
        """Per layer and expert, the ``k`` token ids routed to it most often, as (token id, count)."""
        out = [[[] for _ in range(self.plan.num_experts)] for _ in range(self.plan.num_layers)]
        with self._lock:
            for (layer, expert, token), count in self._token_counts.items():
                out[layer][expert].append((token, count))
        return [[sorted(t, key=lambda tc: (-tc[1], tc[0]))[:k] for t in layer] for layer in out]

    # -- decisions ---------------------------------------------------------------------------------------
    def _resolve(self, name: str, params: dict | None):
        """A policy named over the API: a built-in, the startup policy or a function in an allowed module (nothing
        else is imported), its ``params`` checked against its signature. Raises ValueError naming what is wrong."""
        return resolve_policy(name, params, allowed_modules=self.config.allowed_policy_modules,
                              also=(self.config.policy,))

    def set_policy(self, name: str, params: dict | None = None) -> None:
        policy = self._resolve(name, params)  # raises ValueError; the policy in force stays
        with self._lock:
            self._policy_name, self._policy_params, self._policy = name, dict(params or {}), policy

    @property
    def policy(self) -> tuple[str, dict]:
        with self._lock:
            return self._policy_name, dict(self._policy_params)

    def rebalance(self, *, dry_run: bool = False, policy: str | None = None, params: dict | None = None,
                  reason: str = "manual", load_LE: np.ndarray | None = None) -> dict:
        """Ask the policy for a plan from the window's load and switch to it (unless ``dry_run``). Automatic
        rebalances (any reason but 'manual') apply only if the expected imbalance drops by ``min_gain``.
        ``policy`` and/or ``params``: for this rebalance only (``params`` alone: the active policy with these)."""
        started_ns = time.time_ns()
        with self._lock:
            name, fn = self._policy_name, self._policy
        if policy is not None or params:  # checked before waiting for a switch in progress, and before any change
            name = policy or name
            fn = self._resolve(name, params)
        with self._switching:
            if load_LE is None:
                load_LE = self.window_load()[0]
            load_LE = torch.as_tensor(np.asarray(load_LE), dtype=torch.float64)
            current = self.plan
            # NOTE: with dead workers in the list (until the next scale), plan over the live ones only.
            new = self._plan_without(self.dead_workers, fn) if self.dead_workers else \
                fn(load_LE, self.topology, current, self.budget)
            before, after = self._expected_imbalance(load_LE, current), self._expected_imbalance(load_LE, new)
            record = {"reason": reason, "policy": name, "from_epoch": current.epoch,
                      "epoch": new.epoch, "dry_run": dry_run, "moves": _moves(current, new),
                      "moved_slots": current.moved_slots(new),
                      "moved_bytes": current.moved_slots(new) * self.budget.expert_bytes,
                      "expected_imbalance_before": before, "expected_imbalance_after": after, "applied": False}
            worth = reason == "manual" or after <= before * (1 - self.config.min_gain)
            if dry_run or not worth or record["moved_slots"] == 0 and _same_layout(current, new):
                self.telemetry.rebalanced(record, started_ns)
                return record
            record["workers"] = self._switch(new)
            record["applied"] = True
            self.history.append({k: v for k, v in record.items() if k != "moves"})
            with self._lock:
                self.window.clear()  # worker counts measured under the old plan no longer describe this one
                self._hot_windows = self._steps_since_check = 0
            self._last_rebalance = self.clock()
            log.info("placement epoch %d -> %d (%s): %d slots moved, expected imbalance %.3f -> %.3f",
                     current.epoch, new.epoch, reason, record["moved_slots"], before, after)
            self.telemetry.rebalanced(record, started_ns)
            return record

    def _switch(self, new: Plan, old_index: list[int | None] | None = None, dead: frozenset[int] | None = None,
                peers: bool = True) -> list[dict]:
        """``old_index[w]``: the current number of the new plan's worker w (None: a new worker); default: same.
        ``peers=False``: every slot not resident is read from the checkpoint."""
        old_index = list(range(new.num_workers)) if old_index is None else old_index
        experts = [new.experts_of(w) for w in range(new.num_workers)]
        peers = [self._peers_for(old_index[w], new.experts_of(w)) if peers else {} for w in range(new.num_workers)]
        dead = self.dead_workers if dead is None else dead
        try:
            stats = self.ops.prepare(new.epoch, experts, peers, dead)  # 1. prepare
        except Exception:
            self.ops.abort(new.epoch, dead)
            raise
        self.ops.switch(new)  # 2. switch
        self.plan = new
        self.ops.commit(new.epoch, dead)  # 3. commit
        return stats

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
        load_LE = torch.as_tensor(self.window_load()[0], dtype=torch.float64)
        record = {"policy": self._policy_name, "from_epoch": current.epoch, "epoch": new.epoch, "applied": True,
                  "moved_slots": fetched + read, "moved_bytes": (fetched + read) * self.budget.expert_bytes,
                  "fetched_slots": fetched, "read_slots": read, "read_bytes": read * self.budget.expert_bytes,
                  "redundant": new.num_slots - new.num_experts,
                  "expected_imbalance_before": float("nan"),  # the old plan's workers are gone or renumbered
                  "expected_imbalance_after": self._expected_imbalance(load_LE, new), **record}
        self.history.append(record)
        self.telemetry.rebalanced(record, started_ns)
        return record

    def _expected_imbalance(self, load_LE: torch.Tensor, plan: Plan) -> float:
        """Mean over layers of max / mean expected load over the live workers."""
        live = [w for w in range(plan.num_workers) if w not in self.dead_workers]
        return float(imbalance_L(worker_load_LW(load_LE, plan)[:, live]).mean())

    def _plan_without(self, dead: frozenset[int], policy=None) -> Plan:
        live = [w for w in range(self.topology.num_workers) if w not in dead]
        plan = self._fit_plan(Topology(worker_node=tuple(self.topology.worker_node[w] for w in live),
                                       slots_per_worker=self.topology.slots_per_worker), "restore", policy)
        # Back to the original worker numbering; the dead keep no slots.
        replicas = [[[live[w] for w in ws] for ws in layer] for layer in plan.replica_workers()]
        return Plan.from_replicas(replicas, epoch=self.plan.epoch + 1, num_workers=self.topology.num_workers)

    def _fit_plan(self, topology: Topology, what: str, policy=None) -> Plan:
        """A fresh plan on ``topology`` from the window's load, with as much of the redundancy budget as fits."""
        E = self.plan.num_experts
        if E > topology.capacity:
            raise RuntimeError(f"cannot {what}: {E} experts need {E} slots per layer and the {topology.num_workers} "
                               f"live workers hold {topology.capacity}")
        redundant = min(self.budget.redundant, topology.capacity - E, E * (topology.num_workers - 1))
        budget = dataclasses.replace(self.budget, redundant=redundant)
        load_LE = torch.as_tensor(self.window_load()[0], dtype=torch.float64) + 1  # +1: no load seen yet is fine
        try:
            plan = (policy or self._policy)(load_LE, topology, None, budget)
        except ValueError:  # a policy that cannot place this (e.g. greedy with redundant slots)
            plan = resolve_policy("replicated")(load_LE, topology, None, budget)
        return Plan.from_replicas(plan.replica_workers(), epoch=self.plan.epoch + 1, num_workers=topology.num_workers)

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
            L, E = self.plan.num_layers, self.plan.num_experts
            replicas = [[[] for _ in range(E)] for _ in range(L)]
            for w, info in enumerate(infos):
                for l, experts in enumerate(info["experts_per_layer"] if info else []):
                    for e in experts:
                        replicas[l][e].append(w)
            # NOTE: above every epoch any worker holds, prepared or committed, so no one mistakes the new one.
            epoch = max(max(info["epochs"]) for info in live)
            complete = all(replicas[l][e] for l in range(L) for e in range(E)) and \
                len({sum(map(len, layer)) for layer in replicas}) == 1
            if complete:
                self.plan = Plan.from_replicas(replicas, epoch=epoch, num_workers=len(infos))
                new, peers = Plan.from_replicas(replicas, epoch=epoch + 1, num_workers=len(infos)), True
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
        with self._lock:
            L, E, W = plan.num_layers, plan.num_experts, plan.num_workers
            self.window = LoadWindow(num_layers=L, num_experts=E, num_workers=W, size=self.config.window_steps)
            self._since_take = (self._since_take[0], np.zeros((L, W), np.int64))
            self._hot_windows = self._steps_since_check = 0

    def _peers_for(self, worker: int | None, experts_per_layer: list[list[int]]) -> dict[int, list[tuple[int, int]]]:
        """For each slot a worker (current number, None if new) must load, a current holder to fetch it from
        (same node first)."""
        if self.config.weight_source != "peer":
            return {}
        node = self.topology.worker_node
        holders = self.plan.replica_workers()
        out: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
        for layer, experts in enumerate(experts_per_layer):
            for expert in experts:
                sources = [p for p in holders[layer][expert] if p not in self.dead_workers]
                if worker in sources or not sources:
                    continue
                peer = min(sources, key=lambda p: (worker is None or node[p] != node[worker], p))
                out[peer].append((layer, expert))
        return dict(out)

    def describe(self) -> dict[str, Any]:
        name, params = self.policy
        return {"plan": self.plan.describe(), "policy": name, "policy_params": params,
                "topology": {"worker_node": list(self.topology.worker_node),
                             "slots_per_worker": self.topology.slots_per_worker},
                "redundant": self.budget.redundant, "expert_bytes": self.budget.expert_bytes,
                "rebalances": len(self.history), "total_steps": self.total_steps}


def _same_layout(a: Plan, b: Plan) -> bool:
    return torch.equal(a.phy2log_LP, b.phy2log_LP) and torch.equal(a.slot_worker_LP, b.slot_worker_LP)


def _moves(old: Plan, new: Plan) -> list[dict]:
    """Per (layer, worker), the experts a switch loads there and the ones it drops."""
    out = []
    for layer in range(new.num_layers):
        before, after = old.holders(layer), new.holders(layer)
        for action, pairs in (("load", after - before), ("drop", before - after)):
            for expert, worker in sorted(pairs, key=lambda p: (p[1], p[0])):
                out.append({"layer": layer, "expert": expert, "worker": worker, "action": action})
    return out
