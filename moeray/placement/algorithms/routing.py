"""Which replica of its expert each (token, expert) pair of a layer goes to: the rules live dispatch follows, which the
load model (load.py ``worker_load_LW``), the triggers and the simulator's pair-level replay follow too.

Each expert deals its pairs to its live replicas in turn, continuing where its previous call stopped (a cursor per
expert). So within every call each replica gets its equal share of that expert's pairs within one, over any run of
calls the shares stay within one in total, and which replica a pair gets depends on how many pairs of its expert
came before it, not on its token's rank or position in the batch: a hot expert that is every token's first choice
is spread as evenly as one that is every token's last.

``route_pairs_least_loaded`` is the load-aware alternative (``ControllerConfig.replica_rule = "least_loaded"``, as
SGLang's dynamic dispatch): it starts from ``route_pairs``' split of the call, then moves replicated experts' pairs
off the busiest worker onto a less loaded worker holding another replica of the same expert, while that lowers the
busiest one, so a replica on a worker already busy with other experts gets fewer pairs. Starting from the even
split, a call never ends less balanced than it; with equal loads it is the even split.

Shape legend: N pairs, E logical experts, R replicas (the most any expert has), W workers.
"""

from __future__ import annotations

import numpy as np


def route_pairs(pair_expert_N: np.ndarray, replicas_E: np.ndarray, log2phy_ER: np.ndarray,
                cursor_E: np.ndarray, slot_worker_P: np.ndarray | None = None,
                num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The slot of each pair, and the cursors after this call (a new array; ``cursor_E`` is not changed).

    ``replicas_E``: each expert's live replica count (every expert of ``pair_expert_N`` must have one);
    ``log2phy_ER``: their slots, the first ``replicas_E[e]`` entries of each row; ``cursor_E``: where each
    expert's turn stands (zeros for a fresh layer). ``slot_worker_P`` and ``num_workers`` are not needed here: they
    make the signature the load-aware rule's (``RULES``)."""
    pair_expert_N = np.asarray(pair_expert_N, dtype=np.int64)
    count_E = np.bincount(pair_expert_N, minlength=len(replicas_E))
    # each pair's rank among its expert's pairs, in order: a stable sort groups them, ranks count within a group
    order_N = np.argsort(pair_expert_N, kind="stable")
    starts_E = np.cumsum(count_E) - count_E
    rank_N = np.empty_like(pair_expert_N)
    rank_N[order_N] = np.arange(len(pair_expert_N)) - starts_E[pair_expert_N[order_N]]
    replicas_N = replicas_E[pair_expert_N]
    replica_N = (cursor_E[pair_expert_N] + rank_N) % replicas_N
    cursor_after_E = (cursor_E + count_E) % np.maximum(replicas_E, 1)
    return log2phy_ER[pair_expert_N, replica_N], cursor_after_E


def _rebalance_shares(load_W: np.ndarray, shares: dict[int, np.ndarray], workers: dict[int, np.ndarray]) -> None:
    """Move replicated experts' pairs off the busiest worker onto the least loaded worker holding another replica of
    the same expert, while that lowers the busiest worker without making the other one busier than it was; in
    place. It starts from the even split, so it never ends above it."""
    for _ in range(4 * sum(len(w) for w in workers.values())):  # a bound: each move lowers the top or ends the loop
        top = int(load_W.argmax())
        best = None  # (target load, expert, from replica, to replica)
        for e, share_R in shares.items():
            workers_R = workers[e]
            for src in np.flatnonzero((workers_R == top) & (share_R > 0)).tolist():
                dst = int(np.argmin(np.where(workers_R == top, np.iinfo(np.int64).max, load_W[workers_R])))
                if workers_R[dst] != top and load_W[workers_R[dst]] + 1 < load_W[top] and \
                        (best is None or load_W[workers_R[dst]] < best[0]):
                    best = (int(load_W[workers_R[dst]]), e, src, dst)
        if best is None:
            return
        _, e, src, dst = best
        moved = min(int(shares[e][src]), int(load_W[top] - best[0]) // 2)
        shares[e][src] -= moved
        shares[e][dst] += moved
        load_W[top] -= moved
        load_W[workers[e][dst]] += moved


def route_pairs_least_loaded(pair_expert_N: np.ndarray, replicas_E: np.ndarray, log2phy_ER: np.ndarray,
                             cursor_E: np.ndarray, slot_worker_P: np.ndarray,
                             num_workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Like ``route_pairs``, but the replicated experts' shares are then moved toward less loaded workers in this
    call (module docstring); ``slot_worker_P``: each slot's worker. Returns the slots and the cursors after."""
    pair_expert_N = np.asarray(pair_expert_N, dtype=np.int64)
    count_E = np.bincount(pair_expert_N, minlength=len(replicas_E))
    slot_N, cursor_after_E = route_pairs(pair_expert_N, replicas_E, log2phy_ER, cursor_E)
    multi = np.flatnonzero((replicas_E > 1) & (count_E > 0)).tolist()
    if not multi:
        return slot_N, cursor_after_E
    load_W = np.bincount(slot_worker_P[slot_N], minlength=num_workers).astype(np.int64)
    workers = {e: slot_worker_P[log2phy_ER[e, :replicas_E[e]]] for e in multi}
    even = replica_shares(count_E[multi], replicas_E[multi], cursor_E[multi])
    shares = {e: share_R.copy() for e, share_R in zip(multi, even)}
    _rebalance_shares(load_W, shares, workers)
    for e, share_R, even_R in zip(multi, shares.values(), even):
        if np.array_equal(share_R, even_R):
            continue  # route_pairs' slots stand
        # deal the expert's pairs out interleaved by share (replica r's j-th pair at (j + 0.5) / share), not in
        # blocks, so consecutive tokens (one sequence's prompt) do not all land on one replica
        keys = np.concatenate([(np.arange(n) + 0.5) / n for n in share_R.tolist() if n])
        owners = np.concatenate([np.full(n, r) for r, n in enumerate(share_R.tolist()) if n])
        slot_N[pair_expert_N == e] = log2phy_ER[e, owners[np.argsort(keys, kind="stable")]]
    return slot_N, cursor_after_E


def replica_shares(count_E: np.ndarray, replicas_E: np.ndarray, cursor_E: np.ndarray) -> list[np.ndarray]:
    """How many of ``count_E[e]`` pairs each of expert e's replicas gets from ``route_pairs`` (in replica order):
    the rule in closed form, for the load model and tests."""
    shares = []
    for count, replicas, cursor in zip(count_E.tolist(), replicas_E.tolist(), cursor_E.tolist()):
        share_R = np.full(max(replicas, 1), count // max(replicas, 1), dtype=np.int64)
        extra = count % max(replicas, 1)
        share_R[(cursor + np.arange(extra)) % max(replicas, 1)] += 1
        shares.append(share_R)
    return shares


RULES = {"even": route_pairs, "least_loaded": route_pairs_least_loaded}  # ControllerConfig.replica_rule
