"""The offline placement simulator: replay a load trace through a policy, as the controller would.

Shape legend: L MoE layers, E logical experts, W workers, N windows.

Two replays. ``replay`` is the controller's own loop: for each window, judge the plan in force on it, ask the same
trigger functions the live controller asks (moeray.placement.algorithms.triggers: threshold with hysteresis,
schedule, cool-down, then min_gain on the policy's layout) under the same ``ControllerConfig``, and number each applied
layout as the next epoch; fed a trace the controller recorded (its ``trace_path``), it makes the same decisions at
the same windows. ``simulate`` compares policies on a fixed cadence:

    plan_0 = static plan (round_robin) or a given layout, or the policy applied to the first ``warmup`` windows
    for each window t:
        judge the CURRENT plan on window t's load      -> worker_load_LW, imbalance_L   (load it has not seen)
        history += load_t
        every ``rebalance_every`` windows (never after the last): plan = policy(history, topology, plan, budget),
            count the slots it loads (Plan.moved_slots) and their bytes; history *= decay

``decay = 0`` hands the policy the windows since its last rebalance (with ``rebalance_every = 1``, the last
window); ``decay = 1`` everything seen so far. ``optimal_bounds`` solves the oracle per (window, layer): the least
max worker load any placement of that window's own load could reach, a lower bound to compare policies against.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from moeray.placement.algorithms.load import expected_imbalance, imbalance_L, worker_load_LW
from moeray.placement.algorithms.plan import Layout, Plan
from moeray.placement.algorithms.policies import check_layout, resolve_policy, static_layout
from moeray.placement.algorithms.routing import RULES
from moeray.placement.algorithms.topology import Budget, Topology
from moeray.placement.algorithms.triggers import (Proposal, RebalanceState, WindowObservation, decide_apply,
                                                  decide_rebalance)
from moeray.placement.config import ControllerConfig
from moeray.placement.initial import check_fits


@dataclasses.dataclass(frozen=True, kw_only=True)
class WindowRecord:
    window: int  # index in the trace
    epoch: int  # epoch of the plan judged on this window
    worker_load_LW: torch.Tensor  # expected tokens per (layer, worker) under that plan
    imbalance_L: torch.Tensor
    moved_slots: int = 0  # slots the rebalance after this window loaded (0: no rebalance)
    rebalanced: bool = False  # a rebalance after this window was applied
    policy_s: float = 0.0  # wall time of that rebalance's policy call
    trigger: str = ""  # why the trigger called for a rebalance after this window ("": it did not; replay only)

    def to_json(self) -> dict:
        return {"window": self.window, "epoch": self.epoch, "mean_imbalance": float(self.imbalance_L.mean()),
                "max_imbalance": float(self.imbalance_L.max()), "rebalanced": self.rebalanced,
                "moved_slots": self.moved_slots, "trigger": self.trigger}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bounds:
    """optimal's lower bound on max worker load, per solved (window, layer), as a ratio to the mean worker load."""

    cells: tuple[tuple[int, int], ...]  # (window index, layer)
    ratio: tuple[float, ...]  # lower bound on max load / mean worker load, per cell
    proven: tuple[bool, ...]  # the solver proved the bound optimal (else it is the best bound at its time limit)
    attempted: int  # cells asked for
    seconds: float

    def layers_solved(self) -> int:
        return len({layer for _, layer in self.cells})


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimResult:
    policy: str
    records: list[WindowRecord]
    expert_bytes: int
    bounds: Bounds | None = None

    @property
    def imbalance_NL(self) -> torch.Tensor:
        return torch.stack([r.imbalance_L for r in self.records])

    def summary(self) -> dict:
        imb = self.imbalance_NL.numpy()
        rebalances = [r for r in self.records if r.rebalanced]
        moved = sum(r.moved_slots for r in rebalances)
        out = {
            "policy": self.policy,
            "windows": len(self.records),
            "mean_imbalance": float(imb.mean()),
            "p50_imbalance": float(np.percentile(imb, 50)),
            "max_imbalance": float(imb.max()),
            "moved_slots": moved,
            "rebalances": len(rebalances),
            "moved_slots_per_rebalance": moved / len(rebalances) if rebalances else 0.0,
            "moved_bytes": moved * self.expert_bytes,
            "policy_ms_per_rebalance": 1e3 * sum(r.policy_s for r in rebalances) / max(1, len(rebalances)),
        }
        by_window = {r.window: r for r in self.records}
        cells = [(i, w, l) for i, (w, l) in enumerate(self.bounds.cells if self.bounds else ()) if w in by_window]
        if cells:  # only the cells this replay judged (not its warm-up windows)
            mine = float(np.mean([float(by_window[w].imbalance_L[l]) for _, w, l in cells]))
            bound = float(np.mean([self.bounds.ratio[i] for i, _, _ in cells]))
            out.update({
                "bound_imbalance": bound,
                "imbalance_on_bound_cells": mine,
                "vs_bound": mine / bound,
                "bound_cells": len(cells),
                "bound_proven": sum(self.bounds.proven[i] for i, _, _ in cells),
                "bound_layers": len({l for _, _, l in cells}),
            })
        return out


def _first_plan(initial: str | Layout, num_layers: int, num_experts: int, topology: Topology,
                budget: Budget) -> Plan:
    """Epoch 0: a static layout by name, or a given one (an exported plan), which must fit ``topology``."""
    if isinstance(initial, str):
        return static_layout(initial, num_layers=num_layers, num_experts=num_experts,
                             num_workers=topology.num_workers, redundant=budget.redundant).at_epoch(0)
    return check_fits(initial, source="the initial plan", num_layers=num_layers, num_experts=num_experts,
                      num_workers=topology.num_workers, slots_per_worker=topology.slots_per_worker,
                      redundant=budget.redundant).at_epoch(0)


def replay(
    windows: Sequence[torch.Tensor],
    config: ControllerConfig,
    topology: Topology,
    budget: Budget,
    *,
    initial: str | Layout = "round_robin",
    times: Sequence[float | None] | None = None,
    name: str | None = None,
) -> SimResult:
    """Replay ``windows`` (each ``load_LE``, one closed window of ``config.window_steps`` steps) through the
    controller's triggers and ``config.policy``, as the live controller would decide on them (module docstring).
    ``times[t]``: when window t closed, seconds since the start (needed by ``rebalance_interval_s`` only)."""
    if times is not None and len(times) != len(windows):
        raise ValueError(f"{len(times)} window times for {len(windows)} windows")
    name = name or config.policy
    fn = resolve_policy(config.policy, config.policy_params)
    num_layers, num_experts = windows[0].shape
    budget.check_fits(num_experts, topology)
    plan = _first_plan(initial, num_layers, num_experts, topology, budget)
    state, records = RebalanceState(), []
    for t, window in enumerate(windows):
        load_LE = torch.as_tensor(window).to(torch.float64)
        if load_LE.shape != (num_layers, num_experts):
            raise ValueError(f"window {t}: load shape {tuple(load_LE.shape)} is not [{num_layers}, {num_experts}]")
        time_s = None if times is None else times[t]
        # 1. Judge the plan in force on the window, and let the trigger decide, as the controller's _on_window does.
        load_LW = worker_load_LW(load_LE, plan, config.replica_rule)
        observation = WindowObservation(window=t, time_s=time_s,
                                        imbalance=expected_imbalance(load_LE, plan, rule=config.replica_rule))
        decision, state = decide_rebalance(state, observation, config)
        record = dict(window=t, epoch=plan.epoch, worker_load_LW=load_LW, imbalance_L=imbalance_L(load_LW),
                      trigger=decision.reason)
        # 2. The policy's layout for this window, applied if the trigger judges it worth its moves.
        if decision.rebalance:
            start = time.perf_counter()
            layout = check_layout(fn(load_LE, topology, plan, budget), name, load_LE, topology, budget)
            elapsed = time.perf_counter() - start
            new = layout.at_epoch(plan.epoch + 1)
            moved = plan.moved_slots(new)
            verdict, state = decide_apply(state, Proposal(time_s=time_s, imbalance_before=observation.imbalance,
                                                          imbalance_after=expected_imbalance(load_LE, new,
                                                                                         rule=config.replica_rule),
                                                          moved_slots=moved), config)
            if verdict.apply:
                record.update(moved_slots=moved, rebalanced=True, policy_s=elapsed)
                plan = new
        records.append(WindowRecord(**record))
    return SimResult(policy=name, records=records, expert_bytes=budget.expert_bytes)


def simulate(
    windows: Sequence[torch.Tensor],
    policy: str | Callable[..., Layout],
    topology: Topology,
    budget: Budget,
    *,
    params: dict | None = None,
    name: str | None = None,
    rebalance_every: int = 1,
    decay: float = 0.0,
    warmup: int = 0,
    initial: str | Layout = "round_robin",
    bounds: Bounds | None = None,
) -> SimResult:
    """Replay ``windows`` (each ``load_LE``) through ``policy`` (a name or import path resolved with ``params``, or
    a callable) and judge every plan on the windows after it. See the module docstring."""
    if rebalance_every < 1:
        raise ValueError(f"rebalance_every must be >= 1; got {rebalance_every}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1]; got {decay}")
    if not 0 <= warmup < len(windows):
        raise ValueError(f"warmup must lie in [0, {len(windows)}) for {len(windows)} windows; got {warmup}")
    name = name or (policy if isinstance(policy, str) else getattr(policy, "__name__", repr(policy)))
    fn = resolve_policy(policy, params) if isinstance(policy, str) else policy
    num_layers, num_experts = windows[0].shape
    budget.check_fits(num_experts, topology)
    # 1. The plan before any load is known: a static one, or the policy applied to the warm-up windows.
    plan = _first_plan(initial, num_layers, num_experts, topology, budget)
    if warmup:
        seen_LE = torch.stack([torch.as_tensor(w) for w in windows[:warmup]]).sum(0)
        plan = check_layout(fn(seen_LE, topology, plan, budget), name, seen_LE, topology, budget).at_epoch(1)
    history_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64 if decay else torch.long)
    records = []
    for t in range(warmup, len(windows)):
        load_LE = torch.as_tensor(windows[t])
        if load_LE.shape != (num_layers, num_experts):
            raise ValueError(f"window {t}: load shape {tuple(load_LE.shape)} is not [{num_layers}, {num_experts}]")
        # 2. Judge the current plan on load it has not seen.
        load_LW = worker_load_LW(load_LE, plan)
        record = dict(window=t, epoch=plan.epoch, worker_load_LW=load_LW, imbalance_L=imbalance_L(load_LW))
        history_LE += load_LE.to(history_LE.dtype)
        # 3. Rebalance from the history; the last window's plan would never be judged, so none is made.
        if (t - warmup + 1) % rebalance_every == 0 and t + 1 < len(windows):
            start = time.perf_counter()
            layout = fn(history_LE.clone(), topology, plan, budget)
            elapsed = time.perf_counter() - start
            new = check_layout(layout, name, load_LE, topology, budget).at_epoch(plan.epoch + 1)
            record.update(moved_slots=plan.moved_slots(new), rebalanced=True, policy_s=elapsed)
            plan = new
            history_LE = history_LE * decay if decay else torch.zeros_like(history_LE)
        records.append(WindowRecord(**record))
    return SimResult(policy=name, records=records, expert_bytes=budget.expert_bytes, bounds=bounds)


def optimal_bounds(
    windows: Sequence[torch.Tensor],
    topology: Topology,
    budget: Budget,
    *,
    window_ids: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    time_limit_s: float = 2.0,
    budget_s: float = 60.0,
) -> Bounds:
    """optimal's lower bound for each (window, layer) asked (default: every one), each solve limited to
    ``time_limit_s``; stop starting new solves once ``budget_s`` has passed, and say how many were solved."""
    from moeray.placement.algorithms.optimal import optimal_bound

    window_ids = list(range(len(windows))) if window_ids is None else list(window_ids)
    layers = list(range(windows[0].shape[0])) if layers is None else list(layers)
    cells, ratio, proven = [], [], []
    start = time.perf_counter()
    for t in window_ids:
        for l in layers:
            if time.perf_counter() - start > budget_s:
                break
            load_E = torch.as_tensor(windows[t][l])
            _, lower, ok = optimal_bound(load_E, topology, budget, time_limit_s)
            mean = float(load_E.sum()) / topology.num_workers
            cells.append((t, l))
            ratio.append(float(lower) / mean if mean > 0 else 1.0)
            proven.append(bool(ok))
    return Bounds(cells=tuple(cells), ratio=tuple(ratio), proven=tuple(proven),
                  attempted=len(window_ids) * len(layers), seconds=time.perf_counter() - start)


def realized_load_LW(calls_LN: Sequence[np.ndarray], layout: Layout, rule: str = "even") -> np.ndarray:
    """Pairs per (call, layer, worker) that dispatch sends when each call's pair experts ``[L, N]`` go through the
    replica rule ``rule`` (routing.RULES) in order, each expert's cursor carried from call to call as a router
    carries it: the pair-level replay that checks the load model (``worker_load_LW``) against the rule dispatch runs
    (routing.py). Sum over the first axis for a run's totals; each call's max / mean is a step's imbalance."""
    route = RULES[rule]
    replicas_LE, log2phy_LER = layout.replica_count_LE.numpy(), layout.log2phy_LER.numpy()
    slot_worker_LP = layout.slot_worker_LP.numpy()
    cursor_LE = np.zeros_like(replicas_LE)
    out_CLW = np.zeros((len(calls_LN), layout.num_layers, layout.num_workers), dtype=np.int64)
    for c, pair_expert_LN in enumerate(calls_LN):
        for l in range(layout.num_layers):
            slot_N, cursor_LE[l] = route(pair_expert_LN[l], replicas_LE[l], log2phy_LER[l], cursor_LE[l],
                                         slot_worker_LP[l], layout.num_workers)
            out_CLW[c, l] = np.bincount(slot_worker_LP[l, slot_N], minlength=layout.num_workers)
    return out_CLW
