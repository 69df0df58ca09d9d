"""Placement policies for the simulator's tests, loaded by import path (``sim_fake_policies:lpt``). Like every
policy they return a ``Layout``: the caller (controller or simulator) numbers it as a plan."""

from __future__ import annotations

import torch

from moeray.placement.algorithms.plan import Layout

SEEN: list[torch.Tensor] = []  # the loads ``recording`` was called with


def lpt(load_LE, topology, current, budget, *, lazy: bool = False) -> Layout:
    """Longest processing time first, one copy per expert: each expert, hottest first, goes to the least-loaded
    worker with a free slot. ``lazy``: keep the current layout when there is one (a parameter tests can see)."""
    if lazy and current is not None:
        return Layout.from_replicas(current.replica_workers(), num_workers=topology.num_workers)
    replica_workers = []
    for load_E in torch.as_tensor(load_LE, dtype=torch.float64):
        fill, total = [0] * topology.num_workers, [0.0] * topology.num_workers
        experts = [[] for _ in range(load_E.numel())]
        for e in sorted(range(load_E.numel()), key=lambda e: (-float(load_E[e]), e)):
            w = min((w for w in range(topology.num_workers) if fill[w] < topology.slots_per_worker),
                    key=lambda w: (total[w], w))
            experts[e].append(w)
            fill[w] += 1
            total[w] += float(load_E[e])
        replica_workers.append(experts)
    return Layout.from_replicas(replica_workers, num_workers=topology.num_workers)


def recording(load_LE, topology, current, budget) -> Layout:
    """``lpt``, remembering the load it was handed."""
    SEEN.append(torch.as_tensor(load_LE).clone())
    return lpt(load_LE, topology, current, budget)


def crowded(load_LE, topology, current, budget) -> Layout:
    """Every expert on worker 0: breaks the slot capacity."""
    L, E = load_LE.shape
    return Layout(num_workers=topology.num_workers, num_experts=E, phy2log_LP=torch.arange(E).repeat(L, 1),
                  slot_worker_LP=torch.zeros(L, E, dtype=torch.long))
