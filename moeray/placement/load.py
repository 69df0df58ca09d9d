"""Load: tokens routed to each (MoE layer, logical expert), and what a plan turns it into per worker.

Shape legend: L MoE layers, E logical experts, W workers, P slots per layer.

The dispatcher spreads an expert's tokens evenly over its replicas, so a worker's expected load is the sum, over
the slots it holds, of the slot's expert load divided by that expert's replica count.
"""

from __future__ import annotations

import collections

import torch

from moeray.placement.plan import Plan


def worker_load_LW(load_LE: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Expected tokens per (layer, worker) when ``load_LE`` is routed through ``plan`` (float64)."""
    load_LE = torch.as_tensor(load_LE, dtype=torch.float64)
    if load_LE.shape != (plan.num_layers, plan.num_experts):
        raise ValueError(f"load shape {tuple(load_LE.shape)} does not match the plan's "
                         f"[{plan.num_layers} layers, {plan.num_experts} experts]")
    per_replica_LE = load_LE / plan.replica_count_LE
    slot_load_LP = per_replica_LE.gather(1, plan.phy2log_LP)
    out_LW = torch.zeros(plan.num_layers, plan.num_workers, dtype=torch.float64)
    return out_LW.scatter_add_(1, plan.slot_worker_LP, slot_load_LP)


def imbalance_L(worker_load_LW: torch.Tensor) -> torch.Tensor:
    """max worker load / mean worker load per layer; 1.0 (perfect) for a layer with no tokens."""
    load_LW = torch.as_tensor(worker_load_LW, dtype=torch.float64)
    mean_L = load_LW.mean(dim=1)
    return torch.where(mean_L > 0, load_LW.max(dim=1).values / mean_L.clamp(min=1e-12), torch.ones_like(mean_L))


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
