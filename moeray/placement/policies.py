"""Placement policies: pure functions ``(load_LE, topology, current plan, budget, **params) -> plan``, and the
registry that finds one by name or import path.

Built in (see each module): ``contiguous`` and ``round_robin`` (static baselines, here), ``greedy``,
``replicated`` and ``replicated_hierarchical`` (moeray.placement.balanced), ``migration_aware``
(moeray.placement.migration), ``optimal`` (moeray.placement.optimal). A user's own policy plugs in by import path,
``package.module:function``, with the same signature; its parameters come from the config as keyword arguments.

Static baselines, used before any load is known:

- ``contiguous``: worker w holds experts [w*E/W, (w+1)*E/W) of every layer (DeepSeek's and vLLM's default).
- ``round_robin``: expert e goes to worker e % W, so neighbouring (often co-activated) experts spread out.

``redundant`` extra slots per layer hold second copies; with no load known yet they go to experts 0, 1, ...,
each on the worker with the fewest slots that does not already hold that expert.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

from moeray.placement.plan import Plan
from moeray.placement.topology import Budget, Topology

Policy = Callable[[torch.Tensor, Topology, "Plan | None", Budget], Plan]

BUILTIN_POLICIES = {
    "contiguous": "moeray.placement.policies:contiguous",
    "round_robin": "moeray.placement.policies:round_robin",
    "greedy": "moeray.placement.balanced:greedy",
    "replicated": "moeray.placement.balanced:replicated",
    "replicated_hierarchical": "moeray.placement.balanced:replicated_hierarchical",
    "migration_aware": "moeray.placement.migration:migration_aware",
    "optimal": "moeray.placement.optimal:optimal",
}

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


def _static(policy: str, load_LE: torch.Tensor, topology: Topology, current: Plan | None, budget: Budget) -> Plan:
    budget.check_fits(load_LE.shape[1], topology)
    return static_plan(policy, num_layers=load_LE.shape[0], num_experts=load_LE.shape[1],
                       num_workers=topology.num_workers, redundant=budget.redundant,
                       epoch=0 if current is None else current.epoch + 1)


contiguous = functools.partial(_static, "contiguous")
round_robin = functools.partial(_static, "round_robin")


def resolve_policy(name: str, params: dict | None = None) -> Policy:
    """A policy by built-in name or by import path (``pkg.module:function`` or ``pkg.module.function``), with
    ``params`` bound as keyword arguments."""
    path = BUILTIN_POLICIES.get(name, name)
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"placement policy {name!r} is neither a built-in ({', '.join(BUILTIN_POLICIES)}) nor an "
                         "import path like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"placement policy {name!r} could not be loaded from {path!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"placement policy {name!r} ({path}) is not callable")
    return functools.partial(fn, **params) if params else fn
