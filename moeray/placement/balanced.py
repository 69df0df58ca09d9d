"""Load-balanced placement policies: ``greedy`` (no replication), ``replicated`` and ``replicated_hierarchical``.

Shape legend: L MoE layers, E logical experts, W workers, N nodes, G expert groups.

Like DeepSeek's EPLB (``eplb.py``), each layer is solved on its own, in steps:

1. replica counts: the redundant slots go one at a time to the expert with the highest load per replica;
2. packing: replicas, heaviest first, onto the least-loaded worker with a free slot. Unlike EPLB we never put two
   replicas of one expert on one worker (such a slot would add memory and no bandwidth), and we keep the packing
   completable: an expert with many replicas needs that many workers with a free slot;
3. refinement: move or swap replicas off the most-loaded worker while that lowers it, else re-point a spare
   replica to another expert (a change of replica counts). With many experts per worker LPT is already within
   0.3% of the mean (64 Zipf experts on 8 workers); with a few per worker it can miss by 10%, most of which
   these steps recover.

``replicated_hierarchical`` first packs experts (or groups of contiguous experts) onto nodes, so that an expert's
replicas and its traffic stay inside one node, then runs the steps above inside each node.

The dispatcher splits an expert's tokens evenly over its replicas: a replica weighs ``load[e] / replicas[e]``.
"""

from __future__ import annotations

import heapq
import math

import torch

from moeray.placement.plan import Plan
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


def next_epoch(current: Plan | None) -> int:
    return 0 if current is None else current.epoch + 1


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


def pack_replicas(weight_E: list[float], counts_E: list[int], num_workers: int,
                  slots_per_worker: int) -> list[list[int]]:
    """Workers of each expert's replicas: experts by decreasing replica weight, each replica onto the least-loaded
    worker that has a free slot and lacks that expert. Needs sum(counts) <= workers x slots, counts <= workers."""
    order = sorted(range(len(weight_E)), key=lambda e: (-weight_E[e], e))
    free_W, load_W = [slots_per_worker] * num_workers, [0.0] * num_workers
    pending = [counts_E[e] for e in order]
    replicas_E: list[list[int]] = [[] for _ in weight_E]
    for i, e in enumerate(order):
        # 1. Least-loaded workers first; on ties the emptier one, so that slots stay spread.
        open_W = sorted((w for w in range(num_workers) if free_W[w] > 0), key=lambda w: (load_W[w], -free_W[w], w))
        chosen = open_W[:counts_E[e]]
        if len(chosen) < counts_E[e]:
            raise RuntimeError(f"packing stuck: expert {e} needs {counts_E[e]} workers, {len(chosen)} have room")
        # 2. If that choice strands a later many-replica expert, take the emptiest workers instead: by Havel-Hakimi
        # that choice completes whenever any does.
        rest = pending[i + 1:]
        after = list(free_W)
        for w in chosen:
            after[w] -= 1
        if rest and max(rest) > 1 and not _completable(rest, after):
            chosen = sorted(open_W, key=lambda w: (-free_W[w], load_W[w], w))[:counts_E[e]]
        for w in chosen:
            free_W[w] -= 1
            load_W[w] += weight_E[e]
            replicas_E[e].append(w)
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
                   slots_per_worker: int, *, max_steps: int | None = None) -> list[list[int]]:
    """Local search, in place, on the most-loaded worker: move one of its replicas to a worker with room, or swap
    it for a lighter replica of another expert, choosing the step that leaves the pair's larger load smallest;
    when none helps, re-point a spare replica (``repoint_steps``). Stops when nothing lowers the maximum."""
    items_W: list[set[int]] = [set() for _ in range(num_workers)]
    for e, workers in enumerate(replicas_E):
        for w in workers:
            items_W[w].add(e)

    def weight(e: int) -> float:
        return load_E[e] / len(replicas_E[e])

    eps = 1e-12 * max(sum(load_E), 1e-300)
    for _ in range(max_steps if max_steps is not None else 8 * sum(map(len, replicas_E)) + 16):
        load_W = [sum(weight(e) for e in items) for items in items_W]
        hi = max(range(num_workers), key=lambda w: (load_W[w], -w))
        best, step = load_W[hi] - eps, None
        for e in sorted(items_W[hi]):
            for w in range(num_workers):
                if w == hi or e in items_W[w]:
                    continue
                if len(items_W[w]) < slots_per_worker and max(load_W[hi] - weight(e), load_W[w] + weight(e)) < best:
                    best, step = max(load_W[hi] - weight(e), load_W[w] + weight(e)), (e, w, None)
                for e2 in sorted(items_W[w] - items_W[hi]):
                    d = weight(e) - weight(e2)
                    if d > eps and max(load_W[hi] - d, load_W[w] + d) < best:
                        best, step = max(load_W[hi] - d, load_W[w] + d), (e, w, e2)
        if step is not None:
            # NOTE: both touched workers end below the old maximum, so the sorted loads fall and the loop ends.
            e, w, e2 = step
            for a, src, dst in ((e, hi, w),) + (((e2, w, hi),) if e2 is not None else ()):
                items_W[src].remove(a)
                items_W[dst].add(a)
                replicas_E[a][replicas_E[a].index(src)] = dst
            continue
        repoint = min(repoint_steps(load_E, replicas_E, items_W, load_W, hi), default=None)
        if repoint is None:
            break
        _, d, e, w = repoint
        replicas_E[d].remove(w)
        replicas_E[e].append(w)
        items_W[w].remove(d)
        items_W[w].add(e)
    return replicas_E


def _replicate_and_pack(load_E: list[float], redundant: int, num_workers: int, slots_per_worker: int,
                        counts_E: list[int] | None = None, refine: bool = True) -> list[list[int]]:
    if counts_E is None:
        counts_E = replica_counts(load_E, redundant, [num_workers] * len(load_E))
    weight_E = [load_E[e] / counts_E[e] for e in range(len(load_E))]
    replicas_E = pack_replicas(weight_E, counts_E, num_workers, slots_per_worker)
    return refine_packing(load_E, replicas_E, num_workers, slots_per_worker) if refine else replicas_E


def greedy(load_LE: torch.Tensor, topology: Topology, current: Plan | None, budget: Budget, *,
           refine: bool = True) -> Plan:
    """One replica per expert, balanced by longest-processing-time: experts by decreasing load onto the
    least-loaded worker with a free slot, then refined by moves and swaps. load_LE [L, E] -> plan with E slots."""
    load_LE = check_load(load_LE)
    E = load_LE.shape[1]
    budget.check_fits(E, topology)
    if budget.redundant:
        raise ValueError(f"greedy places one replica per expert, but the budget asks for {budget.redundant} "
                         "redundant slots; use the 'replicated' policy (or redundant=0)")
    W, S = topology.num_workers, topology.slots_per_worker
    layers = [_replicate_and_pack(load_E, 0, W, S, refine=refine) for load_E in load_LE.tolist()]
    return Plan.from_replicas(layers, epoch=next_epoch(current), num_workers=W)


def replicated(load_LE: torch.Tensor, topology: Topology, current: Plan | None, budget: Budget, *,
               refine: bool = True) -> Plan:
    """Replicate hot experts into the redundant slots, then pack all replicas (see the module docstring).
    load_LE [L, E] -> plan with E + budget.redundant slots per layer; no expert has more than W replicas."""
    load_LE = check_load(load_LE)
    E = load_LE.shape[1]
    budget.check_fits(E, topology)
    W, S = topology.num_workers, topology.slots_per_worker
    layers = [_replicate_and_pack(load_E, budget.redundant, W, S, refine=refine) for load_E in load_LE.tolist()]
    return Plan.from_replicas(layers, epoch=next_epoch(current), num_workers=W)


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
                            num_groups: int | None = None, refine: bool = True) -> Plan:
    """Experts onto nodes first, then ``replicated`` inside each node; every replica of an expert stays on its node.

    ``num_groups``: split the experts into that many contiguous groups (DeepSeek-V3's routing groups) and keep a
    group on one node; default: every expert is its own group. load_LE [L, E] -> plan with E + redundant slots."""
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
    return Plan.from_replicas(layers, epoch=next_epoch(current), num_workers=topology.num_workers)
