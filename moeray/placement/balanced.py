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
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moeray.placement.plan import Layout, Plan
from moeray.placement.topology import Budget, Topology


def check_load(load_LE: torch.Tensor) -> torch.Tensor:
    """``load_LE`` as a float64 [L, E] tensor; raises on a bad shape or a negative / non-finite entry."""
    load_LE = torch.as_tensor(load_LE, dtype=torch.float64)
    if load_LE.dim() != 2 or load_LE.shape[0] < 1 or load_LE.shape[1] < 1:
        raise ValueError(f"load must be [layers >= 1, experts >= 1] tokens; got shape {tuple(load_LE.shape)}")
    if not torch.isfinite(load_LE).all() or (load_LE < 0).any():
        raise ValueError("load must hold finite, non-negative token counts; "
                         f"got min {load_LE.min().item()}, max {load_LE.max().item()}")
    return load_LE


def replica_counts(load_E: list[float], redundant: int, max_replicas_E: list[int],
                   node_E: list[int] | None = None, node_room_N: list[int] | None = None) -> list[int]:
    """Replicas per expert: 1 each, plus ``redundant`` extra, each to the expert with the highest load per replica
    (ties: fewer replicas, then lower index) below its ``max_replicas_E`` cap and, when ``node_E`` is given, on a
    node with ``node_room_N`` left."""
    counts_E = [1] * len(load_E)
    room_N = list(node_room_N) if node_room_N is not None else None
    heap = [(-load_E[e], 1, e) for e in range(len(load_E)) if max_replicas_E[e] > 1]
    heapq.heapify(heap)
    for _ in range(redundant):
        while heap and room_N is not None and room_N[node_E[heap[0][2]]] == 0:
            heapq.heappop(heap)  # NOTE: a node's room only shrinks, so its experts never come back
        if not heap:
            raise ValueError(f"{redundant} redundant slots do not fit: every expert is at its replica cap")
        _, count, e = heapq.heappop(heap)
        counts_E[e] = count + 1
        if room_N is not None:
            room_N[node_E[e]] -= 1
        if counts_E[e] < max_replicas_E[e]:
            heapq.heappush(heap, (-load_E[e] / counts_E[e], counts_E[e], e))
    return counts_E


def _completable(demands: list[int], free_W: list[int]) -> bool:
    """Whether experts needing ``demands`` replicas (each on distinct workers) fit workers with ``free_W`` slots:
    the Gale-Ryser condition, sum of the k largest demands <= sum_w min(free_w, k) for every k."""
    demands = sorted(demands, reverse=True)
    top, prefix = max(free_W, default=0), 0
    for k, d in enumerate(demands, 1):
        if k >= top:  # beyond here the right side is sum(free_W): only the total can still fail
            return sum(demands) <= sum(free_W)
        prefix += d
        if prefix > sum(min(c, k) for c in free_W):
            return False
    return True


def spread_ok(workers: Sequence[int], worker_node: Sequence[int]) -> bool:
    """Whether an expert on ``workers`` survives the loss of any one node: one replica, or replicas on >= 2 nodes."""
    return len(workers) < 2 or len({worker_node[w] for w in workers}) >= 2


def _breaks_spread(before: Sequence[int], after: Sequence[int], worker_node: Sequence[int] | None) -> bool:
    """Whether a step takes an expert from spread (``spread_ok``) to not spread; never when nodes are ignored."""
    return worker_node is not None and spread_ok(before, worker_node) and not spread_ok(after, worker_node)


def _pick(candidates: list[int], count: int, worker_node: Sequence[int] | None) -> list[int]:
    """The first ``count`` of ``candidates`` (best first), each next one on a node the earlier picks lack while
    any candidate is on such a node."""
    if worker_node is None:
        return candidates[:count]
    chosen, nodes, rest = [], set(), list(candidates)
    while len(chosen) < count and rest:
        w = next((v for v in rest if worker_node[v] not in nodes), rest[0])
        chosen.append(w)
        nodes.add(worker_node[w])
        rest.remove(w)
    return chosen


def pack_replicas(weight_E: list[float], counts_E: list[int], num_workers: int, slots_per_worker: int,
                  worker_node: Sequence[int] | None = None) -> list[list[int]]:
    """Workers of each expert's replicas: experts by decreasing replica weight, each replica onto the least-loaded
    worker that has a free slot and lacks that expert; with ``worker_node``, on a node that lacks it too while one
    has room. Needs sum(counts) <= workers x slots, counts <= workers."""
    order = sorted(range(len(weight_E)), key=lambda e: (-weight_E[e], e))
    free_W, load_W = [slots_per_worker] * num_workers, [0.0] * num_workers
    pending = [counts_E[e] for e in order]
    replicas_E: list[list[int]] = [[] for _ in weight_E]

    def strands(chosen: list[int], rest: list[int]) -> bool:  # whether a later many-replica expert cannot fit
        after = list(free_W)
        for w in chosen:
            after[w] -= 1
        return bool(rest) and max(rest) > 1 and not _completable(rest, after)

    node_W = list(worker_node) if worker_node is not None else [0] * num_workers
    size_N = [node_W.count(n) for n in range(max(node_W) + 1)]

    for i, e in enumerate(order):
        # 1. Least-loaded workers first; on ties the one on the node with less load per worker (so that heavy single
        # replicas alternate nodes and leave both room for the spread ones), then the emptier one, so that slots
        # stay spread.
        per_worker_N = [0.0] * len(size_N)
        for w in range(num_workers):
            per_worker_N[node_W[w]] += load_W[w] / size_N[node_W[w]]
        open_W = sorted((w for w in range(num_workers) if free_W[w] > 0),
                        key=lambda w: (load_W[w], per_worker_N[node_W[w]], -free_W[w], w))
        chosen = _pick(open_W, counts_E[e], worker_node)
        if len(chosen) < counts_E[e]:
            raise RuntimeError(f"packing stuck: expert {e} needs {counts_E[e]} workers, {len(chosen)} have room")
        # 2. If that choice strands a later many-replica expert, take the emptiest workers instead: by Havel-Hakimi
        # that choice completes whenever any does (spread over nodes if that completes too, else not).
        rest = pending[i + 1:]
        if strands(chosen, rest):
            emptiest = sorted(open_W, key=lambda w: (-free_W[w], load_W[w], w))
            chosen = _pick(emptiest, counts_E[e], worker_node)
            if worker_node is not None and strands(chosen, rest):
                chosen = emptiest[:counts_E[e]]
        for w in chosen:
            free_W[w] -= 1
            load_W[w] += weight_E[e]
            replicas_E[e].append(w)
    return replicas_E


def spread_replicas(weight_E: list[float], replicas_E: list[list[int]], slots_per_worker: int,
                    worker_node: Sequence[int]) -> list[list[int]]:
    """In place, for each expert whose >= 2 replicas share one node (heaviest first): move one replica to a
    worker on another node with a free slot, or swap it with a replica there that may leave, whichever leaves the
    pair's larger load smallest. An expert no move or swap can spread stays as it is."""
    W = len(worker_node)
    items_W: list[set[int]] = [set() for _ in range(W)]
    for e, workers in enumerate(replicas_E):
        for w in workers:
            items_W[w].add(e)
    load_W = [sum(weight_E[e] for e in items) for items in items_W]
    for e in sorted(range(len(weight_E)), key=lambda e: (-weight_E[e], e)):
        if spread_ok(replicas_E[e], worker_node):
            continue
        best, step = math.inf, None
        for a in sorted(replicas_E[e]):
            for b in range(W):
                if worker_node[b] == worker_node[a] or e in items_W[b]:
                    continue
                if len(items_W[b]) < slots_per_worker:
                    new = max(load_W[a] - weight_E[e], load_W[b] + weight_E[e])
                    if new < best:
                        best, step = new, (a, b, None)
                for x in sorted(items_W[b] - items_W[a]):
                    moved = [a if w == b else w for w in replicas_E[x]]
                    d = weight_E[e] - weight_E[x]
                    new = max(load_W[a] - d, load_W[b] + d)
                    if new < best and not _breaks_spread(replicas_E[x], moved, worker_node):
                        best, step = new, (a, b, x)
        if step is None:
            continue
        a, b, x = step
        for y, src, dst in ((e, a, b),) + (((x, b, a),) if x is not None else ()):
            items_W[src].remove(y)
            items_W[dst].add(y)
            replicas_E[y][replicas_E[y].index(src)] = dst
            load_W[src] -= weight_E[y]
            load_W[dst] += weight_E[y]
    return replicas_E


def repoint_steps(load_E: list[float], replicas_E: list[list[int]], items_W: list[set[int]],
                  load_W: list[float], hi: int):
    """Yield (new max worker load, donor d, receiver e, worker w) for each re-point that lowers the max: the slot
    of d (which has a spare replica) on w now holds e. Either e is a hot expert of the busiest worker ``hi``, which
    a new replica elsewhere relieves, or w is ``hi`` and e anything it lacks, lighter there than d's share."""
    top, W = load_W[hi], len(load_W)
    eps = 1e-12 * max(sum(load_W), 1e-300)
    order = sorted(range(W), key=lambda w: -load_W[w])
    off_hi = [e for e in range(len(load_E)) if e not in items_W[hi]]
    for w in [v for v in range(W) if v != hi] + [hi]:
        receivers = sorted(items_W[hi]) if w != hi else off_hi
        for d in sorted(x for x in items_W[w] if len(replicas_E[x]) > 1):
            c_d = len(replicas_E[d])
            for e in receivers:
                if e == d or e in items_W[w]:
                    continue
                c_e = len(replicas_E[e])
                # NOTE: e's holders shed a share, d's holders take up the share w gave up, w swaps d for e.
                delta = {v: load_E[e] / (c_e + 1) - load_E[e] / c_e for v in replicas_E[e]}
                for v in replicas_E[d]:
                    delta[v] = delta.get(v, 0.0) + load_E[d] / (c_d - 1) - load_E[d] / c_d
                delta[w] = delta.get(w, 0.0) + load_E[e] / (c_e + 1) - load_E[d] / (c_d - 1)
                rest = next((load_W[v] for v in order if v not in delta), 0.0)
                new_max = max(rest, max(load_W[v] + dv for v, dv in delta.items()))
                if new_max < top - eps:
                    yield new_max, d, e, w


def refine_packing(load_E: list[float], replicas_E: list[list[int]], num_workers: int,
                   slots_per_worker: int, *, max_steps: int | None = None,
                   worker_node: Sequence[int] | None = None) -> list[list[int]]:
    """Local search, in place, on the most-loaded worker: move one of its replicas to a worker with room, or swap
    it for a lighter replica of another expert, choosing the step that leaves the pair's larger load smallest;
    when none helps, re-point a spare replica (``repoint_steps``). Stops when nothing lowers the maximum. With
    ``worker_node``, no step takes an expert's >= 2 replicas onto one node (``spread_ok``)."""
    items_W: list[set[int]] = [set() for _ in range(num_workers)]
    for e, workers in enumerate(replicas_E):
        for w in workers:
            items_W[w].add(e)

    def weight(e: int) -> float:
        return load_E[e] / len(replicas_E[e])

    def moved(e: int, src: int, dst: int) -> list[int]:
        return [dst if v == src else v for v in replicas_E[e]]

    def breaks(e: int, src: int, dst: int) -> bool:  # whether moving e's replica src -> dst unspreads e
        return _breaks_spread(replicas_E[e], moved(e, src, dst), worker_node)

    def repoint_breaks(d: int, e: int, w: int) -> bool:
        return (_breaks_spread(replicas_E[d], [v for v in replicas_E[d] if v != w], worker_node)
                or _breaks_spread(replicas_E[e], replicas_E[e] + [w], worker_node))

    eps = 1e-12 * max(sum(load_E), 1e-300)
    for _ in range(max_steps if max_steps is not None else 8 * sum(map(len, replicas_E)) + 16):
        load_W = [sum(weight(e) for e in items) for items in items_W]
        hi = max(range(num_workers), key=lambda w: (load_W[w], -w))
        best, step = load_W[hi] - eps, None
        for e in sorted(items_W[hi]):
            for w in range(num_workers):
                if w == hi or e in items_W[w]:
                    continue
                if (len(items_W[w]) < slots_per_worker and max(load_W[hi] - weight(e), load_W[w] + weight(e)) < best
                        and not breaks(e, hi, w)):
                    best, step = max(load_W[hi] - weight(e), load_W[w] + weight(e)), (e, w, None)
                for e2 in sorted(items_W[w] - items_W[hi]):
                    d = weight(e) - weight(e2)
                    if (d > eps and max(load_W[hi] - d, load_W[w] + d) < best
                            and not breaks(e, hi, w) and not breaks(e2, w, hi)):
                        best, step = max(load_W[hi] - d, load_W[w] + d), (e, w, e2)
        if step is not None:
            # NOTE: both touched workers end below the old maximum, so the sorted loads fall and the loop ends.
            e, w, e2 = step
            for a, src, dst in ((e, hi, w),) + (((e2, w, hi),) if e2 is not None else ()):
                items_W[src].remove(a)
                items_W[dst].add(a)
                replicas_E[a][replicas_E[a].index(src)] = dst
            continue
        repoint = min((r for r in repoint_steps(load_E, replicas_E, items_W, load_W, hi)
                       if not repoint_breaks(*r[1:])), default=None)
        if repoint is None:
            break
        _, d, e, w = repoint
        replicas_E[d].remove(w)
        replicas_E[e].append(w)
        items_W[w].remove(d)
        items_W[w].add(e)
    return replicas_E


def _replicate_and_pack(load_E: list[float], redundant: int, num_workers: int, slots_per_worker: int,
                        counts_E: list[int] | None = None, refine: bool = True,
                        worker_node: Sequence[int] | None = None) -> list[list[int]]:
    if counts_E is None:
        counts_E = replica_counts(load_E, redundant, [num_workers] * len(load_E))
    weight_E = [load_E[e] / counts_E[e] for e in range(len(load_E))]
    replicas_E = pack_replicas(weight_E, counts_E, num_workers, slots_per_worker, worker_node)
    if worker_node is not None:
        spread_replicas(weight_E, replicas_E, slots_per_worker, worker_node)
    if refine:
        refine_packing(load_E, replicas_E, num_workers, slots_per_worker, worker_node=worker_node)
    return replicas_E


def relabel_workers(replicas_E: list[list[int]], current_E: list[list[int]], num_workers: int,
                    groups: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
    """``replicas_E`` (one layer: the workers of each expert) with its workers renumbered to share the most
    (expert, worker) pairs with ``current_E``: a maximum-weight matching of new to current workers, weighted by
    the experts both hold (a linear assignment). With ``groups`` (e.g. the workers of each node) a worker is only
    renumbered to one of its own group. A permutation of workers: every worker's set of experts, hence every
    per-layer load and imbalance, is unchanged, and no worker gains a second replica of an expert."""
    overlap_WW = np.zeros((num_workers, num_workers))
    for new_ws, cur_ws in zip(replicas_E, current_E):
        for a in new_ws:
            overlap_WW[a, cur_ws] += 1  # NOTE: cur_ws holds distinct workers, so fancy-index += counts each once
    to: dict[int, int] = {}
    for group in groups if groups is not None else [range(num_workers)]:
        members = list(group)
        rows, cols = linear_sum_assignment(overlap_WW[np.ix_(members, members)], maximize=True)
        to.update({members[r]: members[c] for r, c in zip(rows.tolist(), cols.tolist())})
    return [[to[w] for w in ws] for ws in replicas_E]


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
    layers = [_replicate_and_pack(load_E, 0, W, S, refine=refine) for load_E in load_LE.tolist()]
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
    layers = [_replicate_and_pack(load_E, budget.redundant, W, S, refine=refine, worker_node=node_W)
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
            local = _replicate_and_pack([load_E[e] for e in mine], 0, len(workers), S,
                                        counts_E=[counts_E[e] for e in mine], refine=refine)
            for e, ws in zip(mine, local):
                replicas_E[e] = [workers[w] for w in ws]
        layers.append(replicas_E)
    return Layout.from_replicas(layers, num_workers=topology.num_workers)
