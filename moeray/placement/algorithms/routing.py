"""Which replica of its expert each (token, expert) pair of a layer goes to: the one rule live dispatch follows and the
load model assumes (load.py: an expert's load divided evenly over its replicas).

Each expert deals its pairs to its live replicas in turn, continuing where its previous call stopped (a cursor per
expert). So within every call each replica gets its equal share of that expert's pairs within one, over any run of
calls the shares stay within one in total, and which replica a pair gets depends on how many pairs of its expert
came before it, not on its token's rank or position in the batch: a hot expert that is every token's first choice
is spread as evenly as one that is every token's last.

Shape legend: N pairs, E logical experts, R replicas (the most any expert has).
"""

from __future__ import annotations

import numpy as np


def route_pairs(pair_expert_N: np.ndarray, replicas_E: np.ndarray, log2phy_ER: np.ndarray,
                cursor_E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The slot of each pair, and the cursors after this call (a new array; ``cursor_E`` is not changed).

    ``replicas_E``: each expert's live replica count (every expert of ``pair_expert_N`` must have one);
    ``log2phy_ER``: their slots, the first ``replicas_E[e]`` entries of each row; ``cursor_E``: where each
    expert's turn stands (zeros for a fresh layer)."""
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
