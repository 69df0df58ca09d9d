"""Initial placement policies: pure functions from sizes to a plan, used before any load is known.

- ``contiguous``: worker w holds experts [w*E/W, (w+1)*E/W) of every layer (DeepSeek's and vLLM's default).
- ``round_robin``: expert e goes to worker e % W, so neighbouring (often co-activated) experts spread out.

``redundant`` extra slots per layer hold second copies; with no load known yet they go to experts 0, 1, ...,
each on the worker with the fewest slots that does not already hold that expert.
"""

from __future__ import annotations

import torch

from moeray.placement.plan import Plan

STATIC_POLICIES = ("contiguous", "round_robin")


def _primary_workers(policy: str, num_experts: int, num_workers: int) -> list[int]:
    if policy == "contiguous":
        return [e * num_workers // num_experts for e in range(num_experts)]
    if policy == "round_robin":
        return [e % num_workers for e in range(num_experts)]
    raise ValueError(f"placement policy {policy!r} is not one of {STATIC_POLICIES}")


def static_plan(
    policy: str, *, num_layers: int, num_experts: int, num_workers: int, redundant: int = 0, epoch: int = 0
) -> Plan:
    if num_workers < 1:
        raise ValueError(f"workers must be >= 1; got {num_workers}")
    if num_workers > num_experts + redundant:
        raise ValueError(f"{num_workers} workers but only {num_experts + redundant} slots per layer "
                         f"({num_experts} experts + {redundant} redundant): some workers would hold nothing")
    if redundant < 0 or redundant > num_experts * (num_workers - 1):
        limit = num_experts * (num_workers - 1)
        raise ValueError(f"redundant slots must lie in [0, {limit}] with {num_workers} workers "
                         f"(two copies of an expert never share a worker); got {redundant}")
    # 1. One primary copy of every expert.
    logical = list(range(num_experts))
    workers = _primary_workers(policy, num_experts, num_workers)
    # 2. Redundant copies, each on the least-filled worker that lacks that expert.
    for r in range(redundant):
        expert = r % num_experts
        holders = {w for e, w in zip(logical, workers) if e == expert}
        fill = [workers.count(w) for w in range(num_workers)]
        worker = min((w for w in range(num_workers) if w not in holders), key=lambda w: (fill[w], w))
        logical.append(expert)
        workers.append(worker)
    phy2log_LP = torch.tensor([logical] * num_layers, dtype=torch.long).reshape(num_layers, -1)
    slot_worker_LP = torch.tensor([workers] * num_layers, dtype=torch.long).reshape(num_layers, -1)
    return Plan(epoch=epoch, num_workers=num_workers, num_experts=num_experts,
                phy2log_LP=phy2log_LP, slot_worker_LP=slot_worker_LP)
