"""Pure layout arithmetic for the controller: a policy's layout checked against its contract, layouts over the live
workers only, the redundancy fitted to what the workers hold, where each loaded slot is fetched from, the moves
between two plans, and the layout the workers report after a controller restart. No Ray, no state.

Shape legend: L MoE layers, E logical experts, W workers.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Collection

import torch

from moeray.placement.algorithms.plan import Layout
from moeray.placement.algorithms.policies import Policy, check_layout, resolve_policy
from moeray.placement.algorithms.topology import Budget, Topology


def propose(policy: Policy, name: str, load_LE: torch.Tensor, topology: Topology, current, budget: Budget) -> Layout:
    """The policy's layout for ``load_LE``, held to the policy contract (``check_layout``)."""
    return check_layout(policy(load_LE, topology, current, budget), name, load_LE, topology, budget)


def fit_layout(policy: Policy, name: str, load_LE: torch.Tensor, topology: Topology, budget: Budget,
               what: str) -> Layout:
    """A fresh layout on ``topology`` (no current plan: its workers are gone or renumbered), with as much of the
    redundancy budget as fits; ``replicated`` stands in for a policy that cannot place it. ``what`` names the
    operation in the error raised when even one copy of every expert does not fit."""
    E = load_LE.shape[1]
    if E > topology.capacity:
        raise RuntimeError(f"cannot {what}: {E} experts need {E} slots per layer and the {topology.num_workers} "
                           f"live workers hold {topology.capacity}")
    redundant = min(budget.redundant, topology.capacity - E, E * (topology.num_workers - 1))
    budget = dataclasses.replace(budget, redundant=redundant)
    load_LE = load_LE + 1  # no load seen yet is fine
    try:
        return propose(policy, name, load_LE, topology, None, budget)
    except ValueError:  # a policy that cannot place this (e.g. greedy with redundant slots)
        return propose(resolve_policy("replicated"), "replicated", load_LE, topology, None, budget)


def layout_without(policy: Policy, name: str, load_LE: torch.Tensor, topology: Topology, dead: Collection[int],
                   budget: Budget, what: str = "restore") -> Layout:
    """A layout over the workers not in ``dead``, numbered as in ``topology``: the dead keep no slots."""
    live = [w for w in range(topology.num_workers) if w not in dead]
    layout = fit_layout(policy, name, load_LE, Topology(worker_node=tuple(topology.worker_node[w] for w in live),
                                                        slots_per_worker=topology.slots_per_worker), budget, what)
    replicas = [[[live[w] for w in ws] for ws in layer] for layer in layout.replica_workers()]
    return Layout.from_replicas(replicas, num_workers=topology.num_workers)


def peers_for(current: Layout, topology: Topology, dead: Collection[int], worker: int | None,
              experts_per_layer: list[list[int]]) -> dict[int, list[tuple[int, int]]]:
    """For each slot a worker (current number, None if new) must load, a live current holder to fetch it from
    (same node first); slots no live worker holds are absent (read from the checkpoint)."""
    node = topology.worker_node
    holders = current.replica_workers()
    out: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for layer, experts in enumerate(experts_per_layer):
        for expert in experts:
            sources = [p for p in holders[layer][expert] if p not in dead]
            if worker in sources or not sources:
                continue
            peer = min(sources, key=lambda p: (worker is None or node[p] != node[worker], p))
            out[peer].append((layer, expert))
    return dict(out)


def moves(old: Layout, new: Layout) -> list[dict]:
    """Per (layer, worker), the experts a switch loads there and the ones it drops."""
    out = []
    for layer in range(new.num_layers):
        before, after = old.holders(layer), new.holders(layer)
        for action, pairs in (("load", after - before), ("drop", before - after)):
            for expert, worker in sorted(pairs, key=lambda p: (p[1], p[0])):
                out.append({"layer": layer, "expert": expert, "worker": worker, "action": action})
    return out


def same_slots(a: Layout, b: Layout) -> bool:
    """The same layout slot for slot (a switch between them would change nothing)."""
    return torch.equal(a.phy2log_LP, b.phy2log_LP) and torch.equal(a.slot_worker_LP, b.slot_worker_LP)


def reported_layout(infos: list[dict | None], num_layers: int, num_experts: int) -> Layout | None:
    """The layout the workers' infos describe (None for a dead worker), or None when it is not complete: some
    expert without a replica, or layers with different slot counts (a switch left half done)."""
    replicas = [[[] for _ in range(num_experts)] for _ in range(num_layers)]
    for w, info in enumerate(infos):
        for l, experts in enumerate(info["experts_per_layer"] if info else []):
            for e in experts:
                replicas[l][e].append(w)
    complete = all(replicas[l][e] for l in range(num_layers) for e in range(num_experts)) and \
        len({sum(map(len, layer)) for layer in replicas}) == 1
    return Layout.from_replicas(replicas, num_workers=len(infos)) if complete else None
