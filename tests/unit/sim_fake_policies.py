"""Placement policies for the simulator's tests, loaded by import path (``sim_fake_policies:lpt``)."""

from __future__ import annotations

import torch

from moeray.placement.plan import Plan

SEEN: list[torch.Tensor] = []  # the loads ``recording`` was called with


def lpt(load_LE, topology, current, budget, *, epoch_step: int = 1) -> Plan:
    """Longest processing time first, one copy per expert: each expert, hottest first, goes to the least-loaded
    worker with a free slot."""
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
    epoch = 0 if current is None else current.epoch + epoch_step
    return Plan.from_replicas(replica_workers, epoch=epoch, num_workers=topology.num_workers)


def recording(load_LE, topology, current, budget) -> Plan:
    """``lpt``, remembering the load it was handed."""
    SEEN.append(torch.as_tensor(load_LE).clone())
    return lpt(load_LE, topology, current, budget)


def crowded(load_LE, topology, current, budget) -> Plan:
    """Every expert on worker 0: breaks the slot capacity."""
    L, E = load_LE.shape
    return Plan(epoch=1, num_workers=topology.num_workers, num_experts=E,
                phy2log_LP=torch.arange(E).repeat(L, 1), slot_worker_LP=torch.zeros(L, E, dtype=torch.long))
