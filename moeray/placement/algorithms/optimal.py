"""Exact placement for small instances, and a lower bound for any size the solver can take, by mixed-integer
programming (scipy.optimize.milp, i.e. HiGHS), one layer at a time.

Shape legend: E logical experts, W workers, K possible replica counts (1..K).

Two models of one layer, both minimising the most-loaded worker's tokens M:

- ``optimal_bound`` (flow model): binaries x[e, w] (a replica of e on w) and flows f[e, w] in [0, load[e] x[e, w]]
  with sum_w f[e, w] = load[e]. Flows may split an expert's tokens unevenly, so every plan under the dispatcher's
  even split is a feasible point, and the optimum (or the solver's dual bound when time runs out) is a LOWER
  BOUND on the max worker load of every plan. The simulator reports it next to the heuristics.
- ``optimal`` (even-split model, the policy): binaries y[e, k] (e has k replicas) and z[e, w, k] (e has k replicas,
  one of them on w); worker w carries sum load[e] / k z[e, w, k]. This is the exact objective the heuristics
  approximate, so its plan is never worse than theirs: ``replicated``'s max load caps M, and stands in where the
  solver finds nothing in time.

Both ignore nodes (a flat topology), and are for offline evaluation rather than serving: the solve time grows
fast with E x W.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from moeray.placement.algorithms.balanced import check_load, replicated
from moeray.placement.algorithms.plan import Layout, Plan
from moeray.placement.algorithms.topology import Budget, Topology

log = logging.getLogger(__name__)

MAX_BOUND_BINARIES = 8192  # x[e, w] of the flow model: 64 experts x 128 workers
MAX_EXACT_BINARIES = 2048  # z[e, w, k] + y[e, k] of the even-split model: e.g. 16 experts x 8 workers x 8 counts


class _Rows:
    """Sparse constraint rows lo <= A v <= hi, built one row at a time."""

    def __init__(self, num_vars: int) -> None:
        self.num_vars, self.i, self.j, self.v, self.lo, self.hi = num_vars, [], [], [], [], []

    def add(self, cols, coefs, lo: float, hi: float) -> None:
        row = len(self.lo)
        cols = np.atleast_1d(cols)
        self.i.extend([row] * len(cols))
        self.j.extend(cols.tolist())
        self.v.extend(np.broadcast_to(coefs, cols.shape).tolist())
        self.lo.append(lo)
        self.hi.append(hi)

    def constraint(self) -> LinearConstraint:
        a = coo_array((self.v, (self.i, self.j)), shape=(len(self.lo), self.num_vars)).tocsr()
        return LinearConstraint(a, self.lo, self.hi)


def _solve(c, rows: _Rows, integrality, lb, ub, time_limit_s: float):
    return milp(c, constraints=rows.constraint(), integrality=integrality, bounds=Bounds(lb, ub),
                options={"time_limit": max(time_limit_s, 0.05), "mip_rel_gap": 1e-6, "disp": False})


def _check_size(what: str, binaries: int, limit: int, E: int, W: int) -> None:
    if binaries > limit:
        raise ValueError(f"{what}: {E} experts x {W} workers needs {binaries} binary variables per layer, over the "
                         f"limit of {limit}; use a heuristic policy ('replicated') for instances this large")


def _best_flows(ell_E: np.ndarray, replicas_E: list[list[int]], num_workers: int) -> float:
    """The least max worker load of a fixed placement when tokens may split unevenly over replicas (an LP)."""
    pairs = [(e, w) for e, ws in enumerate(replicas_E) for w in ws]
    rows = _Rows(len(pairs) + 1)
    for e in range(len(replicas_E)):
        rows.add([i for i, (x, _) in enumerate(pairs) if x == e], 1.0, ell_E[e], ell_E[e])
    for w in range(num_workers):
        rows.add([i for i, (_, v) in enumerate(pairs) if v == w] + [len(pairs)],
                 [1.0] * sum(v == w for _, v in pairs) + [-1.0], -np.inf, 0)
    c = np.zeros(len(pairs) + 1)
    c[-1] = 1.0
    res = _solve(c, rows, np.zeros(len(pairs) + 1), np.zeros(len(pairs) + 1), np.full(len(pairs) + 1, np.inf), 10.0)
    return float(res.x[-1]) if res.x is not None else float("inf")


def optimal_bound(load_E: torch.Tensor, topology: Topology, budget: Budget,
                  time_limit_s: float = 10.0) -> tuple[list[list[int]], float, bool]:
    """Flow model of one layer. load_E [E] -> (replica workers of each expert, lower bound on any plan's max
    worker load in tokens, whether the solver proved its optimum). The replicas are the best placement found
    (``replicated``'s when it already reaches the bound or the solver finds none in time); the bound is the
    solver's dual bound, so it holds when the time limit cuts the search short too."""
    load_E = check_load(torch.as_tensor(load_E).reshape(1, -1))[0]
    E, W, S, R = load_E.numel(), topology.num_workers, topology.slots_per_worker, budget.redundant
    budget.check_fits(E, topology)
    _check_size("optimal_bound", E * W, MAX_BOUND_BINARIES, E, W)
    mean = load_E.sum().item() / W
    fallback = replicated(load_E[None], topology, None, budget).replica_workers()[0]
    if mean == 0:
        return fallback, 0.0, True
    # 1. Scale to mean worker load 1, so tolerances mean the same at any token count.
    ell_E = (load_E / mean).numpy()
    x = np.arange(E * W).reshape(E, W)
    f, m = x + E * W, 2 * E * W
    # 2. An expert split over at most min(W, R + 1) workers leaves one of them >= its share: a free cut.
    floor = max(1.0, float(ell_E.max()) / min(W, R + 1))
    # 3. The heuristic's placement with its best flows: when those reach the cut, that is the optimum, no search
    # needed (the common case with a few redundant slots); otherwise their max caps the search.
    heuristic_M = _best_flows(ell_E, fallback, W)
    if heuristic_M <= floor * (1 + 1e-9):
        return fallback, floor * mean, True
    rows = _Rows(2 * E * W + 1)
    for e in range(E):
        rows.add(f[e], 1.0, ell_E[e], ell_E[e])  # all of e's tokens go somewhere
        rows.add(x[e], 1.0, 1, W)  # every expert keeps a replica, even one with no tokens
        for w in range(W):
            rows.add([f[e, w], x[e, w]], [1.0, -ell_E[e]], -np.inf, 0)  # flow only where a replica is
    for w in range(W):
        rows.add(x[:, w], 1.0, 0, S)
        rows.add(np.append(f[:, w], m), np.append(np.ones(E), -1.0), -np.inf, 0)
    rows.add(x.ravel(), 1.0, E + R, E + R)
    lb = np.zeros(2 * E * W + 1)
    lb[m] = floor
    ub = np.concatenate([np.ones(E * W), np.repeat(ell_E, W), [heuristic_M * (1 + 1e-9)]])
    c = np.zeros(2 * E * W + 1)
    c[m] = 1.0
    integrality = np.concatenate([np.ones(E * W), np.zeros(E * W + 1)])
    res = _solve(c, rows, integrality, lb, ub, time_limit_s)
    # 4. The dual bound holds whether or not the search finished; without one, the free cut still does.
    dual = getattr(res, "mip_dual_bound", None)
    bound = max(floor, dual if dual is not None and np.isfinite(dual) else floor)
    bound = min(bound, heuristic_M, res.x[m] if res.x is not None else np.inf)  # dual <= optimum, up to tolerance
    replicas = fallback
    if res.x is not None:
        taken = res.x[: E * W].reshape(E, W) > 0.5
        replicas = [np.flatnonzero(taken[e]).tolist() for e in range(E)]
    return replicas, bound * mean, res.status == 0


def _exact_layer(load_E: torch.Tensor, topology: Topology, budget: Budget, time_limit_s: float,
                 heuristic: list[list[int]]) -> tuple[list[list[int]], bool]:
    """Even-split model of one layer: (replica workers of each expert, whether proven optimal)."""
    E, W, S, R = load_E.numel(), topology.num_workers, topology.slots_per_worker, budget.redundant
    K = min(W, R + 1)
    mean = load_E.sum().item() / W
    if mean == 0:
        return heuristic, True
    ell_E = (load_E / mean).numpy()
    # 1. The heuristic's max load caps M: the solver only looks for better plans, and always has one to find.
    counts = [len(ws) for ws in heuristic]
    heuristic_M = max(sum(ell_E[e] / counts[e] for e in range(E) if w in heuristic[e]) for w in range(W))
    z = np.arange(E * W * K).reshape(E, W, K)
    y = E * W * K + np.arange(E * K).reshape(E, K)
    m = E * W * K + E * K
    k_K = np.arange(1, K + 1, dtype=float)
    rows = _Rows(m + 1)
    for e in range(E):
        rows.add(y[e], 1.0, 1, 1)  # exactly one replica count
        for k in range(K):  # k replicas means k workers
            rows.add(np.append(z[e, :, k], y[e, k]), np.append(np.ones(W), -k_K[k]), 0, 0)
    for w in range(W):
        rows.add(z[:, w, :].ravel(), 1.0, 0, S)
        rows.add(np.append(z[:, w, :].ravel(), m), np.append((ell_E[:, None] / k_K).ravel(), -1.0), -np.inf, 0)
    rows.add(y.ravel(), np.tile(k_K, E), E + R, E + R)
    lb = np.zeros(m + 1)
    lb[m] = max(1.0, float(ell_E.max()) / K)
    ub = np.ones(m + 1)
    ub[m] = heuristic_M * (1 + 1e-9)
    c = np.zeros(m + 1)
    c[m] = 1.0
    res = _solve(c, rows, np.append(np.ones(m), 0), lb, ub, time_limit_s)
    proven = res.status in (0, 2)  # 2: infeasible under the cap, i.e. nothing beats the heuristic
    if res.x is None or res.x[m] >= heuristic_M:
        return heuristic, proven
    taken = res.x[: E * W * K].reshape(E, W, K).sum(axis=2) > 0.5
    return [np.flatnonzero(taken[e]).tolist() for e in range(E)], proven


def optimal(load_LE: torch.Tensor, topology: Topology, current: Plan | None, budget: Budget, *,
            time_limit_s: float = 10.0, max_binaries: int = MAX_EXACT_BINARIES) -> Layout:
    """The plan with the smallest max worker load under even splitting, layer by layer, within ``time_limit_s``
    seconds in all (split evenly over the layers); a layer the solver does not finish keeps the best plan found
    (never worse than ``replicated``'s). load_LE [L, E] -> layout with E + budget.redundant slots per layer."""
    load_LE = check_load(load_LE)
    L, E = load_LE.shape
    W = topology.num_workers
    budget.check_fits(E, topology)
    K = min(W, budget.redundant + 1)
    _check_size("optimal", E * W * K + E * K, max_binaries, E, W)
    if time_limit_s <= 0:
        raise ValueError(f"time_limit_s must be > 0; got {time_limit_s}")
    heuristic = replicated(load_LE, topology, None, budget).replica_workers()
    layers, unproven = [], []
    for l in range(L):
        replicas, proven = _exact_layer(load_LE[l], topology, budget, time_limit_s / L, heuristic[l])
        layers.append(replicas)
        if not proven:
            unproven.append(l)
    if unproven:
        log.warning("optimal: layers %s hit the %.3g s time limit; their plans are the best found, not proven "
                    "optimal", unproven, time_limit_s / L)
    return Layout.from_replicas(layers, num_workers=W)
