"""Migration-aware rebalancing: fix the current plan with a few cheap moves instead of recomputing it.

Shape legend: L MoE layers, E logical experts, W workers.

A full ``replicated`` rebalance reaches near-perfect balance but lays the slots out afresh, so most of them load
new weights. Here the current plan is kept and changed one step at a time, each step one of:

- move: a replica leaves the most-loaded worker for a worker with a free slot (loads 1 slot);
- swap: a replica on the most-loaded worker trades places with a lighter one elsewhere (loads 2 slots);
- re-point: a slot of an expert with spare replicas now holds another expert, which gains a replica: a hot expert
  of the most-loaded worker elsewhere, or anything lighter on the most-loaded worker itself (loads 1 slot);
- adopt: the layer becomes ``replicated``'s plan of it, its workers renumbered to keep as many slots in place as
  possible (``relabel_workers``, a linear assignment); the step of last resort when local steps are stuck.

Steps are taken greedily, across all layers, by gain per loaded slot, where the gain is the fall in the layer's
imbalance (max / mean worker load); the cost counts slots the result holds that ``current`` did not, so a step
that undoes an earlier one is free. A layer is left alone once its imbalance is within ``target`` times what
``replicated`` reaches on it, and the round stops when the best gain per slot is below ``threshold`` or the next
step would exceed ``budget.max_moved_slots`` / ``max_moved_bytes`` (every slot weighs ``budget.expert_bytes``, so
gain per byte ranks steps as gain per slot does). Unlike ``replicated`` (whose ``spread_nodes`` keeps an expert's
replicas on >= 2 nodes), it ignores nodes: its local steps, and the adopt step's renumbering over all workers, may
leave an expert's replicas on one node.
"""

from __future__ import annotations

import torch

from moeray.placement.algorithms.balanced import check_load, replicated
from moeray.placement.algorithms.load import imbalance_L, worker_load_LW
from moeray.placement.algorithms.packing import relabel_workers, repoint_steps
from moeray.placement.algorithms.plan import Layout, Plan
from moeray.placement.algorithms.topology import Budget, Topology


class _Layer:
    """One layer's replicas under change: ``replicas_E[e]`` the workers of e, and the loads they give."""

    def __init__(self, load_E: list[float], replicas_E: list[list[int]], num_workers: int, slots: int,
                 original: set[tuple[int, int]] | None = None) -> None:
        self.load_E, self.W, self.S = load_E, num_workers, slots
        self.mean = sum(load_E) / num_workers
        # (expert, worker) pairs resident before this round: loading any other pair costs a slot.
        self.original = original if original is not None else {(e, w) for e, ws in enumerate(replicas_E) for w in ws}
        self.set_replicas(replicas_E)

    def set_replicas(self, replicas_E: list[list[int]]) -> None:
        self.replicas_E = [list(ws) for ws in replicas_E]
        self.items_W: list[set[int]] = [set() for _ in range(self.W)]
        for e, ws in enumerate(self.replicas_E):
            for w in ws:
                self.items_W[w].add(e)
        self.load_W = [sum(self.weight(e) for e in items) for items in self.items_W]
        self.moved = sum((e, w) not in self.original for e, ws in enumerate(self.replicas_E) for w in ws)

    def weight(self, e: int) -> float:
        return self.load_E[e] / len(self.replicas_E[e])

    def imbalance(self) -> float:
        return max(self.load_W) / self.mean if self.mean > 0 else 1.0

    def new(self, e: int, w: int) -> int:
        return (e, w) not in self.original

    def steps(self, max_cost: int):
        """Yield (new max load, cost in slots, step) for every local step that lowers the most-loaded worker."""
        hi = max(range(self.W), key=lambda w: (self.load_W[w], -w))
        top, eps = self.load_W[hi], 1e-12 * max(self.mean, 1e-300)
        order = sorted(range(self.W), key=lambda w: -self.load_W[w])

        def rest_max(skip: set[int]) -> float:  # the largest load among workers a step leaves alone
            return next((self.load_W[w] for w in order if w not in skip), 0.0)

        for e in sorted(self.items_W[hi]):
            x = self.weight(e)
            for w in range(self.W):
                if w == hi or e in self.items_W[w]:
                    continue
                cost = self.new(e, w) - self.new(e, hi)
                if len(self.items_W[w]) < self.S and x > eps and cost <= max_cost:
                    yield max(top - x, self.load_W[w] + x, rest_max({hi, w})), cost, ("move", e, hi, w)
                for e2 in sorted(self.items_W[w] - self.items_W[hi]):
                    d = x - self.weight(e2)
                    cost2 = cost + self.new(e2, hi) - self.new(e2, w)
                    if d > eps and cost2 <= max_cost:
                        yield max(top - d, self.load_W[w] + d, rest_max({hi, w})), cost2, ("swap", e, hi, w, e2)
        for new_max, d, e, w in repoint_steps(self.load_E, self.replicas_E, self.items_W, self.load_W, hi):
            cost = self.new(e, w) - self.new(d, w)
            if cost <= max_cost:
                yield new_max, cost, ("repoint", d, e, w)

    def apply(self, step: tuple) -> None:
        replicas = [list(ws) for ws in self.replicas_E]
        if step[0] == "move":
            _, e, src, dst = step
            replicas[e][replicas[e].index(src)] = dst
        elif step[0] == "swap":
            _, e, src, dst, e2 = step
            replicas[e][replicas[e].index(src)] = dst
            replicas[e2][replicas[e2].index(dst)] = src
        else:
            _, d, e, w = step
            replicas[d].remove(w)
            replicas[e].append(w)
        self.set_replicas(replicas)


def _fits(current: Plan, L: int, E: int, topology: Topology, budget: Budget) -> bool:
    """Whether ``current`` can be edited into a plan for this load, topology and budget."""
    if (current.num_layers, current.num_experts, current.num_workers) != (L, E, topology.num_workers):
        return False
    if current.num_slots != budget.slots_per_layer(E):
        return False
    per_worker = torch.zeros(L, topology.num_workers, dtype=torch.long)
    per_worker.scatter_add_(1, current.slot_worker_LP, torch.ones_like(current.slot_worker_LP))
    return bool((per_worker <= topology.slots_per_worker).all())


def migration_aware(load_LE: torch.Tensor, topology: Topology, current: Plan | None, budget: Budget, *,
                    threshold: float = 0.002, target: float = 1.02) -> Layout:
    """Edit ``current`` by greedy moves, swaps and re-points (module docstring). ``threshold``: least fall in
    a layer's imbalance worth loading one slot; ``target``: a layer is balanced enough at ``target`` times
    ``replicated``'s imbalance on it. Without a usable ``current`` (None, or other workers, experts or slot count),
    returns ``replicated``'s plan. load_LE [L, E] -> layout with E + budget.redundant slots per layer."""
    load_LE = check_load(load_LE)
    L, E = load_LE.shape
    budget.check_fits(E, topology)
    if threshold < 0 or target < 1:
        raise ValueError(f"threshold must be >= 0 and target >= 1; got threshold={threshold}, target={target}")
    if current is None or not _fits(current, L, E, topology, budget):
        return replicated(load_LE, topology, current, budget)
    W, S = topology.num_workers, topology.slots_per_worker
    # 1. What a full rebalance would reach, per layer: the goal.
    reference = replicated(load_LE, topology, None, budget)
    goal_L = (imbalance_L(worker_load_LW(load_LE, reference)) * target).tolist()
    current_replicas, reference_replicas = current.replica_workers(), reference.replica_workers()
    layers = [_Layer(load_E, current_replicas[l], W, S) for l, load_E in enumerate(load_LE.tolist())]
    limits = [x for x in (budget.max_moved_slots,
                          None if budget.max_moved_bytes is None else budget.max_moved_bytes // budget.expert_bytes)
              if x is not None]
    limit = min(limits) if limits else None
    # 2. The adopt step of each layer: the reference, renumbered to keep slots in place; its max load and cost.
    adopt = [relabel_workers(reference_replicas[l], current_replicas[l], W) for l in range(L)]
    adopt_max_L, adopt_moved_L = [], []
    for l in range(L):
        probe = _Layer(layers[l].load_E, adopt[l], W, S, original=layers[l].original)
        adopt_max_L.append(max(probe.load_W))
        adopt_moved_L.append(probe.moved)

    def spare() -> int:
        return 10**9 if limit is None else limit - sum(layer.moved for layer in layers)

    def best_step(l: int):
        """(gain per slot, new max load, cost, step) of the best step on layer l, or None."""
        layer, budget_left = layers[l], spare()
        if layer.mean == 0 or layer.imbalance() <= goal_L[l]:
            return None
        top, best = max(layer.load_W), None
        candidates = list(layer.steps(budget_left))
        if adopt_max_L[l] < top and adopt_moved_L[l] - layer.moved <= budget_left:
            candidates.append((adopt_max_L[l], adopt_moved_L[l] - layer.moved, ("adopt",)))
        for new_max, cost, step in candidates:
            gain = (top - new_max) / layer.mean
            if gain <= 1e-12:  # a step must lower the layer's maximum, else the greedy could cycle
                continue
            score = gain / cost if cost > 0 else gain * 1e9  # a step that undoes an earlier one is free
            if best is None or score > best[0] or (score == best[0] and new_max < best[1]):
                best = (score, new_max, cost, step)
        return best

    # 3. Greedy over all layers: the best gain per slot first, until it falls below the threshold.
    best_L, left = [best_step(l) for l in range(L)], spare()
    for _ in range(64 * L * (E + budget.redundant)):
        options = [(b[0], -l) for l, b in enumerate(best_L) if b is not None]
        if not options or max(options)[0] < threshold:
            break
        l = -max(options)[1]
        step = best_L[l][3]
        if step[0] == "adopt":
            layers[l].set_replicas(adopt[l])
        else:
            layers[l].apply(step)
        # NOTE: while the budget left shrinks, a stored best step that still fits stays the best of its layer; a
        # step that undoes an earlier one frees budget, and then every layer may have a better step.
        grew, left = spare() > left, spare()
        best_L = [best_step(k) if k == l or grew or (b is not None and b[2] > left) else b
                  for k, b in enumerate(best_L)]
    return Layout.from_replicas([layer.replicas_E for layer in layers], num_workers=W)
