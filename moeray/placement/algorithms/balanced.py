"""Load-balanced placement policies: ``greedy`` (no replication), ``replicated`` and ``replicated_hierarchical``.

Shape legend: L MoE layers, E logical experts, W workers, N nodes, G expert groups.

Like DeepSeek's EPLB (``eplb.py``), each layer is solved on its own, in steps:

1. replica counts: the redundant slots go one at a time to the expert with the highest load per replica;
2. packing: replicas, heaviest first, onto the least-loaded worker with a free slot. Unlike EPLB we never put two
   replicas of one expert on one worker (such a slot would add memory and no bandwidth), and we keep the packing
   completable: an expert with many replicas needs that many workers with a free slot. ``replicated`` also
   spreads by default (``spread_nodes``): each further replica of an expert goes to a node that lacks the expert
   while one has room, and a repair pass moves or swaps any expert still on one node off it, so losing a node
   never loses an expert that had a spare copy;
3. refinement: move or swap replicas off the most-loaded worker while that lowers it, else re-point a spare
   replica to another expert (a change of replica counts); with spreading, no step leaves an expert with >= 2
   replicas on one node. With many experts per worker LPT is already within 0.3% of the mean (64 Zipf experts on
   8 workers); with a few per worker it can miss by 10%, most of which these steps recover;
4. relabelling: workers are interchangeable for balance, so when a current plan of the same shape is given, the
   new layer's workers are renumbered (within each node when spreading) to keep the most slots where they are
   (``relabel_workers``, a linear assignment; ``migration_aware``'s adopt step uses it too).

``replicated_hierarchical`` first packs experts (or groups of contiguous experts) onto nodes, so that an expert's
replicas and its traffic stay inside one node, then runs steps 1-3 inside each node (no spreading, by design).

The dispatcher splits an expert's tokens evenly over its replicas: a replica weighs ``load[e] / replicas[e]``.
Steps 1-4 work on one layer's lists and live in moeray.placement.algorithms.packing; here are the policies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moeray.placement.algorithms.packing import relabel_workers, replica_counts, replicate_and_pack
from moeray.placement.algorithms.plan import Layout, Plan
from moeray.placement.algorithms.topology import Budget, Topology


def check_load(load_LE: torch.Tensor) -> torch.Tensor:
    """``load_LE`` as a float64 [L, E] tensor; raises on a bad shape or a negative / non-finite entry."""
    load_LE = torch.as_tensor(load_LE, dtype=torch.float64)
    if load_LE.dim() != 2 or load_LE.shape[0] < 1 or load_LE.shape[1] < 1:
        raise ValueError(f"load must be [layers >= 1, experts >= 1] tokens; got shape {tuple(load_LE.shape)}")
    if not torch.isfinite(load_LE).all() or (load_LE < 0).any():
        raise ValueError("load must hold finite, non-negative token counts; "
                         f"got min {load_LE.min().item()}, max {load_LE.max().item()}")
    return load_LE


def _keep_in_place(layers: list[list[list[int]]], current: Plan | None, num_workers: int,
                   groups: Sequence[Sequence[int]] | None) -> list[list[list[int]]]:
    """Each layer relabelled against ``current``'s (``relabel_workers``) when ``current`` has the same layers,
    experts, workers and slots per layer; else ``layers`` as they are."""
    slots = sum(len(ws) for ws in layers[0])
    if current is None or (current.num_layers, current.num_experts, current.num_workers, current.num_slots) != (
            len(layers), len(layers[0]), num_workers, slots):
        return layers
    current_layers = current.replica_workers()
    return [relabel_workers(new, cur, num_workers, groups) for new, cur in zip(layers, current_layers)]


def greedy(load_LE: torch.Tensor, topology: Topology, current: Plan | None, budget: Budget, *,
           refine: bool = True, relabel: bool = True) -> Layout:
    """One replica per expert, balanced by longest-processing-time: experts by decreasing load onto the
    least-loaded worker with a free slot, then refined by moves and swaps. ``relabel``: renumber workers to keep
    ``current``'s slots in place (step 4). load_LE [L, E] -> layout with E slots."""
    load_LE = check_load(load_LE)
    E = load_LE.shape[1]
    budget.check_fits(E, topology)
    if budget.redundant:
        raise ValueError(f"greedy places one replica per expert, but the budget asks for {budget.redundant} "
                         "redundant slots; use the 'replicated' policy (or redundant=0)")
    W, S = topology.num_workers, topology.slots_per_worker
    layers = [replicate_and_pack(load_E, 0, W, S, refine=refine) for load_E in load_LE.tolist()]
    if relabel:  # one replica per expert: nothing to spread, so workers may trade labels across nodes
        layers = _keep_in_place(layers, current, W, None)
    return Layout.from_replicas(layers, num_workers=W)


def replicated(load_LE: torch.Tensor, topology: Topology, current: Plan | None, budget: Budget, *,
               refine: bool = True, spread_nodes: bool = True, relabel: bool = True) -> Layout:
    """Replicate hot experts into the redundant slots, then pack all replicas (see the module docstring).

    ``spread_nodes``: put the replicas of an expert with >= 2 on >= 2 nodes wherever the slots allow (a
    preference while packing, a repair pass after it, a constraint on refinement). ``relabel``: renumber each
    layer's workers to keep ``current``'s slots in place, within each node when spreading (step 4).
    load_LE [L, E] -> layout with E + budget.redundant slots per layer; no expert has more than W replicas."""
    load_LE = check_load(load_LE)
    E = load_LE.shape[1]
    budget.check_fits(E, topology)
    W, S = topology.num_workers, topology.slots_per_worker
    node_W = list(topology.worker_node) if spread_nodes and topology.num_nodes > 1 else None
    layers = [replicate_and_pack(load_E, budget.redundant, W, S, refine=refine, worker_node=node_W)
              for load_E in load_LE.tolist()]
    if relabel:
        groups = None if node_W is None else [ws for n in range(topology.num_nodes)
                                              if (ws := topology.workers_on(n))]
        layers = _keep_in_place(layers, current, W, groups)
    return Layout.from_replicas(layers, num_workers=W)


def _node_quotas(num_groups: int, group_size: int, redundant: int, workers_N: list[int], slots: int) -> list[int]:
    """Groups per node: in proportion to the node's slots (largest remainder), so its share of redundant slots
    follows too; if that leaves too little room for ``redundant``, the split with the most room for them."""
    cap_N = [n * slots for n in workers_N]

    def room(n: int, q: int) -> int:  # redundant slots node n can take while holding q groups
        return min(cap_N[n] - q * group_size, q * group_size * (workers_N[n] - 1))

    if sum(c // group_size for c in cap_N) < num_groups:
        raise ValueError(f"{num_groups} groups of {group_size} experts do not fit nodes of {workers_N} workers x "
                         f"{slots} slots without splitting a group; use fewer, smaller groups")
    ideal_N = [num_groups * c / sum(cap_N) for c in cap_N]
    quota_N = [min(math.floor(x), cap_N[n] // group_size) for n, x in enumerate(ideal_N)]
    for n in sorted(range(len(cap_N)), key=lambda n: (-(ideal_N[n] - quota_N[n]), n)):
        if sum(quota_N) < num_groups and (quota_N[n] + 1) * group_size <= cap_N[n]:
            quota_N[n] += 1
    while sum(quota_N) < num_groups:  # remainders went to full nodes: fill any node with room
        quota_N[next(n for n in range(len(cap_N)) if (quota_N[n] + 1) * group_size <= cap_N[n])] += 1
    if sum(room(n, q) for n, q in enumerate(quota_N)) >= redundant:
        return quota_N
    # room(n, q) is concave in q: handing groups out one at a time by best marginal room maximises the total.
    quota_N = [0] * len(cap_N)
    for _ in range(num_groups):
        n = max((n for n in range(len(cap_N)) if (quota_N[n] + 1) * group_size <= cap_N[n]),
                key=lambda n: (room(n, quota_N[n] + 1) - room(n, quota_N[n]), -quota_N[n], -n))
        quota_N[n] += 1
    most = sum(room(n, q) for n, q in enumerate(quota_N))
    if most < redundant:
        raise ValueError(f"replicated_hierarchical keeps an expert's replicas on its node: {len(cap_N)} nodes of "
                         f"{workers_N} workers x {slots} slots take at most {most} redundant slots; got {redundant} "
                         "(use 'replicated', or fewer redundant slots)")
    return quota_N


def _pack_groups(group_load_G: list[float], quota_N: list[int], workers_N: list[int]) -> list[int]:
    """Node of each group: LPT on load per worker under the quotas, then swaps off the busiest node."""
    node_G, load_N, left_N = [0] * len(group_load_G), [0.0] * len(quota_N), list(quota_N)
    for g in sorted(range(len(group_load_G)), key=lambda g: (-group_load_G[g], g)):
        n = min((n for n in range(len(quota_N)) if left_N[n] > 0), key=lambda n: (load_N[n] / workers_N[n], n))
        node_G[g], left_N[n], load_N[n] = n, left_N[n] - 1, load_N[n] + group_load_G[g]
    eps = 1e-12 * max(sum(group_load_G), 1e-300)
    for _ in range(4 * len(group_load_G) + 16):
        hi = max(range(len(quota_N)), key=lambda n: (load_N[n] / workers_N[n], -n))
        best, step = load_N[hi] / workers_N[hi] - eps, None
        for a in (g for g in range(len(node_G)) if node_G[g] == hi):
            for b in (g for g in range(len(node_G)) if node_G[g] != hi):
                n, d = node_G[b], group_load_G[a] - group_load_G[b]
                new = max((load_N[hi] - d) / workers_N[hi], (load_N[n] + d) / workers_N[n])
                if d > 0 and new < best:
                    best, step = new, (a, b)
        if step is None:
            break
        a, b = step
        n, d = node_G[b], group_load_G[a] - group_load_G[b]
        node_G[a], node_G[b], load_N[hi], load_N[n] = n, hi, load_N[hi] - d, load_N[n] + d
    return node_G


def replicated_hierarchical(load_LE: torch.Tensor, topology: Topology, current: Plan | None, budget: Budget, *,
                            num_groups: int | None = None, refine: bool = True) -> Layout:
    """Experts onto nodes first, then ``replicated`` inside each node; every replica of an expert stays on its node.

    NOTE: deliberately the opposite of ``replicated``'s ``spread_nodes``: keeping an expert's replicas and its
    traffic inside one node trades node-loss tolerance (losing a node loses every copy of its experts) for
    intra-node dispatch. It also ignores ``current`` (no relabelling).

    ``num_groups``: split the experts into that many contiguous groups (DeepSeek-V3's routing groups) and keep a
    group on one node; default: every expert is its own group. load_LE [L, E] -> layout with E + redundant slots."""
    load_LE = check_load(load_LE)
    E = load_LE.shape[1]
    budget.check_fits(E, topology)
    G = E if num_groups is None else num_groups
    if G < 1 or E % G:
        raise ValueError(f"num_groups must divide the {E} experts into equal groups; got {num_groups}")
    S = topology.slots_per_worker
    node_workers = [ws for ws in (topology.workers_on(n) for n in range(topology.num_nodes)) if ws]
    workers_N = [len(ws) for ws in node_workers]
    # 1. How many groups each node holds (the same in every layer): in proportion to its slots, which leaves each
    # node room for its share of the redundant slots.
    quota_N = _node_quotas(G, E // G, budget.redundant, workers_N, S)
    layers = []
    for load_E in load_LE.tolist():
        # 2. Groups onto nodes, balancing load per worker.
        group_load_G = [sum(load_E[g * E // G:(g + 1) * E // G]) for g in range(G)]
        node_E = [n for n in _pack_groups(group_load_G, quota_N, workers_N) for _ in range(E // G)]
        # 3. Redundant slots over all nodes by load per replica, within each node's room and worker count.
        held_N = [node_E.count(n) for n in range(len(workers_N))]
        counts_E = replica_counts(load_E, budget.redundant, [workers_N[n] for n in node_E], node_E,
                                  [workers_N[n] * S - held_N[n] for n in range(len(workers_N))])
        # 4. Inside each node, pack its replicas onto its workers.
        replicas_E: list[list[int]] = [[] for _ in range(E)]
        for n, workers in enumerate(node_workers):
            mine = [e for e in range(E) if node_E[e] == n]
            if not mine:
                continue
            local = replicate_and_pack([load_E[e] for e in mine], 0, len(workers), S,
                                        counts_E=[counts_E[e] for e in mine], refine=refine)
            for e, ws in zip(mine, local):
                replicas_E[e] = [workers[w] for w in ws]
        layers.append(replicas_E)
    return Layout.from_replicas(layers, num_workers=topology.num_workers)
