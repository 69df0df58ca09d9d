"""The per-layer steps of the load-balanced policies (moeray.placement.algorithms.balanced), on plain lists:
replica counts, packing, spreading over nodes, refinement, and relabelling against the current plan.

Shape legend: E logical experts, W workers, N nodes.

A layer's placement is ``replicas_E``: for each expert, the workers that hold its replicas. The dispatcher splits an
expert's tokens evenly over its replicas, so a replica weighs ``load[e] / replicas[e]``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


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


def replicate_and_pack(load_E: list[float], redundant: int, num_workers: int, slots_per_worker: int,
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
