"""The placement controller: the only writer of the plan.

It pulls step load records from the routers (moeray.placement.algorithms.load's ledger), and as each window of
``window_steps`` steps closes asks the rebalance trigger whether to rebalance (moeray.placement.algorithms.triggers:
on a schedule, or when the plan's expected imbalance stays above a threshold for several consecutive windows:
hysteresis, so it does not flap); once per poll it asks the autoscale trigger whether to scale. A rebalance asks
the policy for a layout, numbers it as the next plan's epoch, and switches to it in two phases:

    1. prepare  every worker makes the new epoch's slots resident beside the current ones
                (kept if resident, fetched from a peer worker that holds them, else read from the checkpoint)
    2. switch   every router moves to the new epoch between two forwards (a forward in flight ends on the old one)
    3. commit   every worker drops the other epochs' slots

A failed prepare aborts the switch (workers drop what they loaded; the current plan stays). Requests never see a
half-switched plan, so outputs are identical to a run that never rebalanced. Changes to the worker list (restore,
heal, scale, rebuild after a restart) switch the same way; they live in moeray.placement.runtime.elastic.

All Ray calls go through ``ActorOps`` (moeray.placement.runtime.actors), so this logic is tested with a fake. The
triggers are pure functions the offline simulator calls too: a trace of the closed windows (``trace_path``)
replays to the same decisions.

Shape legend: L MoE layers, E logical experts, W workers.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

import numpy as np
import torch

from moeray.placement.algorithms import replan
from moeray.placement.algorithms.load import ClosedWindow, LoadLedger, expected_imbalance, worker_load_LW
from moeray.placement.algorithms.plan import Layout, Plan
from moeray.placement.algorithms.policies import resolve_policy
from moeray.placement.algorithms.topology import Budget, Topology
from moeray.placement.algorithms.triggers import (AutoscaleState, Proposal, QueueObservation, RebalanceState,
                                                  WindowObservation, after_rebalance, decide_apply, decide_autoscale,
                                                  decide_rebalance)
from moeray.placement.config import ControllerConfig
from moeray.placement.runtime.elastic import ElasticWorkers, WorkersDied
from moeray.placement.runtime.metrics import ControllerMetrics
from moeray.placement.traces import trace_line

log = logging.getLogger(__name__)

__all__ = ["ActorOps", "PlacementController", "WorkersDied", "first_plan"]


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


def first_plan(layout: Layout) -> Plan:
    """The plan an engine starts on: epoch 0. From then on the controller alone numbers plans."""
    return layout.at_epoch(0)


class PlacementController(ElasticWorkers):
    """Load, decisions and the two-phase switch; changes to the worker list come from ``ElasticWorkers``."""

    def __init__(self, *, config: ControllerConfig, plan: Plan, topology: Topology, budget: Budget,
                 ops: ActorOps, clock=time.monotonic) -> None:
        if topology.num_workers != plan.num_workers:
            raise ValueError(f"topology has {topology.num_workers} workers; the plan {plan.num_workers}")
        self.config, self.plan, self.topology, self.budget, self.ops = config, plan, topology, budget, ops
        self.clock, self._started = clock, clock()
        self._policy_name, self._policy_params = config.policy, dict(config.policy_params)
        self._policy = resolve_policy(self._policy_name, self._policy_params)
        self._lock = threading.Lock()  # guards the policy and the trigger states
        self._switching = threading.Lock()  # one plan switch at a time
        self._reshaping = threading.Lock()  # one change of the worker list at a time (its spawns outside _switching)
        self.target_workers = plan.num_workers  # what healing and scaling bring the live workers back to
        self.healing = {"state": "idle", "target_workers": plan.num_workers, "error": ""}  # progress, for GetPlacement
        self.load = LoadLedger(num_layers=plan.num_layers, num_experts=plan.num_experts, num_workers=plan.num_workers,
                               window_steps=config.window_steps)
        self.rebalance_state, self.autoscale_state = RebalanceState(), AutoscaleState()
        self.history: list[dict] = []  # one record per applied rebalance
        self.dead_workers: frozenset[int] = frozenset()
        self.telemetry = ControllerMetrics(self)
        if config.trace_path:  # NOTE: a restarted controller starts a new trace: its windows count from 0 again
            open(config.trace_path, "w").close()

    def _now(self) -> float:
        return self.clock() - self._started

    # -- load --------------------------------------------------------------------------------------------
    def poll(self) -> dict | None:
        """Pull the routers' step records; let the rebalance trigger decide on each window that closed (in order),
        then the autoscale trigger on the routers' queue. Returns the last record of a switch it made."""
        self.pull()
        record = None
        for window in self.load.take_closed():
            record = self._on_window(window) or record
        queue = self.load.queue
        observation = QueueObservation(waiting=queue["waiting"], running=queue["running"],
                                       capacity=queue["capacity"], live_workers=len(self._live()))
        with self._lock:
            decision, self.autoscale_state = decide_autoscale(self.autoscale_state, observation, self.config)
        if decision.target_workers is not None:
            return self.scale(decision.target_workers, reason="autoscale")
        return record

    def _on_window(self, window: ClosedWindow) -> dict | None:
        """One closed window: the trigger's decision, the rebalance it calls for, and its line in the trace."""
        current = self.plan
        observation = WindowObservation(window=window.index, time_s=window.time_s,
                                        imbalance=expected_imbalance(window.load_LE, current, self.dead_workers,
                                                                     self.config.replica_rule))
        with self._lock:
            decision, self.rebalance_state = decide_rebalance(self.rebalance_state, observation, self.config)
        record = None
        if decision.rebalance:
            try:
                record = self.rebalance(reason=decision.reason, load_LE=window.load_LE, time_s=window.time_s)
            except Exception:  # a failed switch keeps the plan; the windows after this one are still decided on
                log.exception("automatic rebalance on window %d (%s) failed", window.index, decision.reason)
        if self.config.trace_path:
            with open(self.config.trace_path, "a", encoding="utf-8") as f:
                f.write(trace_line(window.index, window.load_LE, time_s=window.time_s, epoch=current.epoch,
                                   imbalance=observation.imbalance, trigger=decision.reason,
                                   applied=bool(record and record["applied"]), queue=self.load.queue))
        return record

    def pull(self) -> None:
        """Pull the routers' step records into the ledger (no decisions)."""
        self.load.add(self.ops.take_loads(), self._now(), on_step=self.telemetry.step)

    @property
    def window(self):
        """The sliding load window (the last ``window_steps`` step records)."""
        return self.load.window

    @property
    def total_steps(self) -> int:
        return self.load.total_steps

    @property
    def total_LE(self) -> np.ndarray:
        """Tokens per (layer, expert) since the start: a counter."""
        return self.load.total_LE

    def window_load(self) -> tuple[np.ndarray, np.ndarray]:
        """Tokens per (layer, expert) and per (layer, worker) over the window (what GetLoad reports)."""
        return self.load.window_total()

    def expected_load(self, expert_LE: np.ndarray) -> np.ndarray:
        """Tokens per (layer, worker) the plan in force expects of ``expert_LE`` (float64; the load model's even
        split over replicas, which dispatch realizes within one pair per replica: routing.py)."""
        return worker_load_LW(torch.as_tensor(expert_LE, dtype=torch.float64), self.plan,
                              self.config.replica_rule).numpy()

    def take_load(self) -> tuple[np.ndarray, np.ndarray]:
        """Tokens per (layer, expert) and per (layer, worker) since the previous call (pulls first)."""
        self.pull()
        return self.load.take()

    def top_tokens(self, k: int = 10) -> list[list[list[tuple[int, int]]]]:
        """Per layer and expert, the ``k`` token ids routed to it most often, as (token id, count)."""
        return self.load.top_tokens(k)

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
                  reason: str = "manual", load_LE: np.ndarray | None = None, time_s: float | None = None) -> dict:
        """Ask the policy for a layout from ``load_LE`` (default: the sliding window's) and switch to it as the next
        epoch's plan (unless ``dry_run``). Automatic rebalances (any reason but 'manual') apply only if the trigger
        judges them worth their moves (``decide_apply``: ``min_gain``). ``policy`` and/or ``params``: for this
        rebalance only (``params`` alone: the active policy with these). ``time_s``: when the triggering window
        closed."""
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
            layout = replan.layout_without(fn, name, load_LE, self.topology, self.dead_workers, self.budget) \
                if self.dead_workers else replan.propose(fn, name, load_LE, self.topology, current, self.budget)
            new = layout.at_epoch(current.epoch + 1)
            before, after = self._expected_imbalance(load_LE, current), self._expected_imbalance(load_LE, new)
            moved = current.moved_slots(new)
            record = {"reason": reason, "policy": name, "from_epoch": current.epoch,
                      "epoch": new.epoch, "dry_run": dry_run, "moves": replan.moves(current, new),
                      "moved_slots": moved, "moved_bytes": moved * self.budget.expert_bytes,
                      "expected_imbalance_before": before, "expected_imbalance_after": after, "applied": False}
            if reason == "manual":
                apply = moved > 0 or not replan.same_slots(current, new)
            else:
                with self._lock:
                    verdict, _ = decide_apply(self.rebalance_state, Proposal(
                        time_s=time_s, imbalance_before=before, imbalance_after=after, moved_slots=moved), self.config)
                apply = verdict.apply
            if dry_run or not apply:
                self.telemetry.rebalanced(record, started_ns)
                return record
            record["workers"] = self._switch(new)
            record["applied"] = True
            self.history.append({k: v for k, v in record.items() if k != "moves"})
            self.load.clear_window()  # worker counts measured under the old plan no longer describe this one
            with self._lock:
                self.rebalance_state = after_rebalance(self.rebalance_state,
                                                       self._now() if time_s is None else time_s, self.config)
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

    def _expected_imbalance(self, load_LE: torch.Tensor, plan: Plan) -> float:
        """Mean over layers of max / mean expected load over the live workers."""
        return expected_imbalance(load_LE, plan, self.dead_workers, self.config.replica_rule)

    def _window_LE(self) -> torch.Tensor:
        return torch.as_tensor(self.window_load()[0], dtype=torch.float64)

    def _plan_without(self, dead: frozenset[int]) -> Plan:
        """The next plan over the workers not in ``dead``, from the window's load (the dead keep no slots)."""
        with self._lock:
            name, fn = self._policy_name, self._policy
        layout = replan.layout_without(fn, name, self._window_LE(), self.topology, dead, self.budget)
        return layout.at_epoch(self.plan.epoch + 1)

    def _fit_plan(self, topology: Topology, what: str) -> Plan:
        """The next plan on a new ``topology``, from the window's load, with as much redundancy as fits."""
        with self._lock:
            name, fn = self._policy_name, self._policy
        return replan.fit_layout(fn, name, self._window_LE(), topology, self.budget, what).at_epoch(self.plan.epoch + 1)

    def _peers_for(self, worker: int | None, experts_per_layer: list[list[int]]) -> dict[int, list[tuple[int, int]]]:
        """For each slot a worker (current number, None if new) must load, a live current holder to fetch it from
        (none with ``weight_source: checkpoint``)."""
        if self.config.weight_source != "peer":
            return {}
        return replan.peers_for(self.plan, self.topology, self.dead_workers, worker, experts_per_layer)

    def describe(self) -> dict[str, Any]:
        name, params = self.policy
        return {"plan": self.plan.describe(), "policy": name, "policy_params": params,
                "topology": {"worker_node": list(self.topology.worker_node),
                             "slots_per_worker": self.topology.slots_per_worker},
                "redundant": self.budget.redundant, "expert_bytes": self.budget.expert_bytes,
                "rebalances": len(self.history), "total_steps": self.total_steps}

