"""Load: tokens routed to each (MoE layer, logical expert), what a layout turns it into per worker, and the
controller's ledger of the load it pulls from the routers.

Shape legend: L MoE layers, E logical experts, W workers, P slots per layer.

The dispatcher deals an expert's tokens to its replicas in turn (routing.py), so a worker's expected load is the
sum, over the slots it holds, of the slot's expert load divided by that expert's replica count.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Collection

import numpy as np
import torch

from moeray.placement.algorithms.plan import Layout


def worker_load_LW(load_LE: torch.Tensor, plan: Layout, rule: str = "even") -> torch.Tensor:
    """Expected tokens per (layer, worker) when ``load_LE`` is routed through ``plan`` (float64) by the replica
    rule ``rule`` (routing.RULES): 'even' in closed form, 'least_loaded' by running the rule on the load as one call
    (its rounded counts), which is what a step of that load would get."""
    load_LE = torch.as_tensor(load_LE, dtype=torch.float64)
    if load_LE.shape != (plan.num_layers, plan.num_experts):
        raise ValueError(f"load shape {tuple(load_LE.shape)} does not match the plan's "
                         f"[{plan.num_layers} layers, {plan.num_experts} experts]")
    if rule != "even":
        return _routed_load_LW(load_LE, plan, rule)
    per_replica_LE = load_LE / plan.replica_count_LE
    slot_load_LP = per_replica_LE.gather(1, plan.phy2log_LP)
    out_LW = torch.zeros(plan.num_layers, plan.num_workers, dtype=torch.float64)
    return out_LW.scatter_add_(1, plan.slot_worker_LP, slot_load_LP)


def _routed_load_LW(load_LE: torch.Tensor, plan: Layout, rule: str) -> torch.Tensor:
    from moeray.placement.algorithms.routing import RULES

    route, counts_LE = RULES[rule], load_LE.round().long().numpy()
    replicas_LE, log2phy_LER = plan.replica_count_LE.numpy(), plan.log2phy_LER.numpy()
    slot_worker_LP = plan.slot_worker_LP.numpy()
    out_LW = torch.zeros(plan.num_layers, plan.num_workers, dtype=torch.float64)
    for l in range(plan.num_layers):
        pair_expert_N = np.repeat(np.arange(plan.num_experts), counts_LE[l])
        slot_N, _ = route(pair_expert_N, replicas_LE[l], log2phy_LER[l], np.zeros(plan.num_experts, np.int64),
                          slot_worker_LP[l], plan.num_workers)
        out_LW[l] = torch.from_numpy(np.bincount(slot_worker_LP[l, slot_N], minlength=plan.num_workers).astype(float))
    return out_LW


def imbalance_L(worker_load_LW: torch.Tensor) -> torch.Tensor:
    """max worker load / mean worker load per layer; 1.0 (perfect) for a layer with no tokens."""
    load_LW = torch.as_tensor(worker_load_LW, dtype=torch.float64)
    mean_L = load_LW.mean(dim=1)
    return torch.where(mean_L > 0, load_LW.max(dim=1).values / mean_L.clamp(min=1e-12), torch.ones_like(mean_L))


def routing_gap_L(realized_LW, expected_LW) -> np.ndarray:
    """Per layer, max over workers of |realized - expected| / mean expected: 0 when dispatch split the tokens as the
    plan promised (GetLoad's routing_gap and the moeray_routing_gap_ratio metric); 0 for a layer with no tokens."""
    realized_LW, expected_LW = np.asarray(realized_LW, np.float64), np.asarray(expected_LW, np.float64)
    mean_L = expected_LW.mean(axis=1)
    gap_L = np.abs(realized_LW - expected_LW).max(axis=1, initial=0.0)
    return np.where(mean_L > 0, gap_L / np.maximum(mean_L, 1e-12), 0.0)


def expected_imbalance(load_LE, layout: Layout, dead: Collection[int] = (), rule: str = "even") -> float:
    """Mean over layers of max / mean expected worker load, over the workers not in ``dead``: what the triggers
    judge a window by, in the controller and the simulator alike (so both compute it here)."""
    live = [w for w in range(layout.num_workers) if w not in dead]
    load_LW = worker_load_LW(torch.as_tensor(load_LE, dtype=torch.float64), layout, rule)
    return float(imbalance_L(load_LW[:, live]).mean())


class LoadWindow:
    """The sum of the last ``size`` load reports (each a step or a batch of steps from one router)."""

    def __init__(self, *, num_layers: int, num_experts: int, num_workers: int, size: int) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1; got {size}")
        self.shape = (num_layers, num_experts, num_workers)
        self._reports: collections.deque[tuple[torch.Tensor, torch.Tensor]] = collections.deque(maxlen=size)

    def add(self, expert_LE: torch.Tensor, worker_LW: torch.Tensor) -> None:
        expert_LE, worker_LW = torch.as_tensor(expert_LE).long(), torch.as_tensor(worker_LW).long()
        L, E, W = self.shape
        if expert_LE.shape != (L, E):
            raise ValueError(f"expert load shape {tuple(expert_LE.shape)} is not [{L}, {E}]")
        if worker_LW.shape != (L, W):  # the worker count changed: earlier worker loads no longer line up
            self.shape = (L, E, worker_LW.shape[1]) if worker_LW.shape[0] == L else self.shape
            if worker_LW.shape != (L, self.shape[2]):
                raise ValueError(f"worker load shape {tuple(worker_LW.shape)} is not [{L}, workers]")
            self._reports = collections.deque(((e, torch.zeros_like(worker_LW)) for e, _ in self._reports),
                                              maxlen=self._reports.maxlen)
        self._reports.append((expert_LE, worker_LW))

    def __len__(self) -> int:
        return len(self._reports)

    def total(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens per (layer, expert), tokens per (layer, worker)) over the window."""
        L, E, W = self.shape
        expert_LE, worker_LW = torch.zeros(L, E, dtype=torch.long), torch.zeros(L, W, dtype=torch.long)
        for e, w in self._reports:
            expert_LE += e
            worker_LW += w
        return expert_LE, worker_LW

    def clear(self) -> None:
        self._reports.clear()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClosedWindow:
    """``window_steps`` consecutive step records: what the rebalance trigger decides on."""

    index: int  # windows closed before this one, since the controller started
    time_s: float  # seconds since the controller started when its last step was pulled
    load_LE: np.ndarray  # tokens per (layer, expert) over its steps


class LoadLedger:
    """The controller's account of the load it pulls from the routers: the sliding window (GetLoad, manual
    rebalances), counts since the last ``take`` and since the start, token ids per expert, the routers' queue, and
    the closed windows the triggers have yet to see.

    NOTE: windows close every ``window_steps`` step records counted from the start, whenever they are pulled, so
    the windows (and the decisions on them) depend on the step records alone, not on when polls happen.
    """

    def __init__(self, *, num_layers: int, num_experts: int, num_workers: int, window_steps: int) -> None:
        L, E, W = num_layers, num_experts, num_workers
        self._lock = threading.Lock()
        self.window_steps = window_steps
        self.window = LoadWindow(num_layers=L, num_experts=E, num_workers=W, size=window_steps)
        self._since_take_LE, self._since_take_LW = np.zeros((L, E), np.int64), np.zeros((L, W), np.int64)
        self.total_LE = np.zeros((L, E), np.int64)  # tokens per (layer, expert) since the start: a counter
        self.total_steps = 0
        self._token_counts: collections.Counter[tuple[int, int, int]] = collections.Counter()
        self.queue = {"waiting": 0, "running": 0, "capacity": 0}  # requests in the routers at the last pull
        self._open_LE, self._open_steps = np.zeros((L, E), np.int64), 0
        self._closed: list[ClosedWindow] = []
        self._windows = 0

    def add(self, reports: list[dict], time_s: float,
            on_step: Callable[[np.ndarray, np.ndarray], None] | None = None) -> None:
        """Account the routers' reports (their step records in order, then the token counts and queue)."""
        with self._lock:
            self.queue = {key: sum(r.get(key, 0) for r in reports) for key in ("waiting", "running", "capacity")}
            for report in reports:
                for expert_LE, worker_LW in report["steps"]:
                    self._add_step(np.asarray(expert_LE), np.asarray(worker_LW), time_s)
                    if on_step is not None:
                        on_step(np.asarray(expert_LE), np.asarray(worker_LW))
                for layer, expert, token, count in np.asarray(report.get("tokens", ())).reshape(-1, 4).tolist():
                    self._token_counts[(layer, expert, token)] += count

    def _add_step(self, expert_LE: np.ndarray, worker_LW: np.ndarray, time_s: float) -> None:
        self.window.add(torch.from_numpy(expert_LE), torch.from_numpy(worker_LW))
        self._since_take_LE += expert_LE
        self.total_LE += expert_LE
        if worker_LW.shape == self._since_take_LW.shape:
            self._since_take_LW += worker_LW
        self.total_steps += 1
        self._open_LE += expert_LE
        self._open_steps += 1
        if self._open_steps == self.window_steps:
            self._closed.append(ClosedWindow(index=self._windows, time_s=time_s, load_LE=self._open_LE))
            self._windows += 1
            self._open_LE, self._open_steps = np.zeros_like(self._open_LE), 0

    def take_closed(self) -> list[ClosedWindow]:
        """The windows closed since the last call, oldest first."""
        with self._lock:
            closed, self._closed = self._closed, []
        return closed

    def window_total(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            expert_LE, worker_LW = self.window.total()
        return expert_LE.numpy(), worker_LW.numpy()

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """Tokens per (layer, expert) and per (layer, worker) since the previous call."""
        with self._lock:
            out = (self._since_take_LE.copy(), self._since_take_LW.copy())
            self._since_take_LE[...] = 0
            self._since_take_LW[...] = 0
        return out

    def top_tokens(self, k: int) -> list[list[list[tuple[int, int]]]]:
        """Per layer and expert, the ``k`` token ids routed to it most often, as (token id, count)."""
        L, E = self.total_LE.shape
        out = [[[] for _ in range(E)] for _ in range(L)]
        with self._lock:
            for (layer, expert, token), count in self._token_counts.items():
                out[layer][expert].append((token, count))
        return [[sorted(t, key=lambda tc: (-tc[1], tc[0]))[:k] for t in layer] for layer in out]

    def clear_window(self, num_workers: int | None = None) -> None:
        """Drop the sliding window: its worker counts were measured under another plan (``num_workers``: that
        many workers from now on). Closed windows and the open one keep counting: they hold expert load only."""
        with self._lock:
            if num_workers is None:
                self.window.clear()
                return
            L, E, _ = self.window.shape
            self.window = LoadWindow(num_layers=L, num_experts=E, num_workers=num_workers, size=self.window_steps)
            self._since_take_LW = np.zeros((L, num_workers), np.int64)
