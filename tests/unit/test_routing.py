"""The replica rule (moeray/placement/algorithms/routing.py): every call splits each expert's pairs over its live
replicas within one, runs of calls stay within one in total, and the rule is deterministic and its closed form
(``replica_shares``) agrees with it. Live dispatch on this rule: test_dispatch.py."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moeray.placement.algorithms.routing import replica_shares, route_pairs


@st.composite
def layers(draw):
    """A layer's live replicas (some experts with none, as after a death) and a run of calls' pair experts."""
    experts = draw(st.integers(1, 12))
    replicas_E = np.array(draw(st.lists(st.integers(0, 4), min_size=experts, max_size=experts)))
    replicas_E[draw(st.integers(0, experts - 1))] = draw(st.integers(1, 4))  # at least one expert is served
    slots = np.cumsum(replicas_E) - replicas_E
    log2phy_ER = np.full((experts, max(1, replicas_E.max())), -1)
    for e, (start, r) in enumerate(zip(slots, replicas_E)):
        log2phy_ER[e, :r] = start + np.arange(r)  # slot numbers unique to each (expert, replica)
    served = np.flatnonzero(replicas_E)
    top_k = draw(st.integers(1, 8))
    calls = draw(st.lists(st.integers(0, 64), min_size=1, max_size=6))  # tokens per call
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.full(len(served), 0.3))  # a few hot experts
    pairs = [rng.choice(served, size=t * top_k, p=skew) for t in calls]
    return replicas_E, log2phy_ER, pairs


@settings(max_examples=300, deadline=None)
@given(layers())
def test_each_call_and_each_run_of_calls_splits_an_expert_within_one(layer):
    replicas_E, log2phy_ER, pairs = layer
    cursor_E = np.zeros_like(replicas_E)
    total_P = np.zeros(log2phy_ER.size, dtype=np.int64)
    for pair_expert_N in pairs:
        slot_N, after_E = route_pairs(pair_expert_N, replicas_E, log2phy_ER, cursor_E)
        again_N, again_E = route_pairs(pair_expert_N, replicas_E, log2phy_ER, cursor_E)
        assert np.array_equal(slot_N, again_N) and np.array_equal(after_E, again_E), "deterministic"
        count_P = np.bincount(slot_N, minlength=log2phy_ER.size) if len(slot_N) else np.zeros(log2phy_ER.size, int)
        shares = replica_shares(np.bincount(pair_expert_N, minlength=len(replicas_E)), replicas_E, cursor_E)
        for e, r in enumerate(replicas_E.tolist()):
            assert np.isin(slot_N[pair_expert_N == e], log2phy_ER[e, :r]).all(), "only the expert's live slots"
            got_R = count_P[log2phy_ER[e, :r]] if r else np.zeros(0, int)
            if r:
                assert got_R.max() - got_R.min() <= 1, (e, got_R)
                assert np.array_equal(got_R, shares[e]), (e, got_R, shares[e])
        total_P += count_P
        cursor_E = after_E
    for e, r in enumerate(replicas_E.tolist()):
        if r:
            run_R = total_P[log2phy_ER[e, :r]]
            assert run_R.max() - run_R.min() <= 1, (e, run_R)


def test_a_hot_first_choice_spreads_over_its_replicas():
    """The bug this rule replaced: a replica picked by the pair's position t*K + rank is the token's rank whenever
    the replica count divides K, so an expert that is every token's first choice stayed on its first replica."""
    tokens = 678  # top-2: pairs (token, 0) and (token, 1 + token % 3)
    pair_expert_N = np.stack([np.zeros(tokens, int), 1 + np.arange(tokens) % 3], axis=1).reshape(-1)
    replicas_E, log2phy_ER = np.array([2, 1, 1, 1]), np.array([[0, 1], [2, -1], [3, -1], [4, -1]])
    old_N = log2phy_ER[pair_expert_N, np.arange(len(pair_expert_N)) % replicas_E[pair_expert_N]]
    assert (old_N == 0).sum() == tokens and (old_N == 1).sum() == 0  # the old rule: every pair on replica 0
    slot_N, _ = route_pairs(pair_expert_N, replicas_E, log2phy_ER, np.zeros(4, int))
    assert (slot_N == 0).sum() == (slot_N == 1).sum() == tokens // 2


def test_one_token_steps_take_the_replicas_in_turn():
    replicas_E, log2phy_ER = np.array([3]), np.array([[5, 6, 7]])
    cursor_E, seen = np.zeros(1, int), []
    for _ in range(9):  # decode: one pair of the expert per call
        slot_N, cursor_E = route_pairs(np.array([0]), replicas_E, log2phy_ER, cursor_E)
        seen += slot_N.tolist()
    assert seen == [5, 6, 7] * 3


def test_the_load_model_expects_what_the_rule_routes():
    """Dispatch (route_pairs over a run of calls) and the load model (worker_load_LW: each expert's pairs over its
    replicas) give the same per-worker numbers, within one pair per replicated slot; routing_gap_L measures it."""
    import torch

    from moeray.placement.algorithms.load import routing_gap_L, worker_load_LW
    from moeray.placement.algorithms.plan import Layout

    phy2log_P, slot_worker_P = [0, 1, 2, 0, 3, 4, 0, 5, 1], [0, 0, 0, 1, 1, 1, 2, 2, 2]
    layout = Layout(num_workers=3, num_experts=6, phy2log_LP=torch.tensor([phy2log_P]),
                    slot_worker_LP=torch.tensor([slot_worker_P]))
    replicas_E = layout.replica_count_LE[0].numpy()
    log2phy_ER = np.full((6, 3), -1)
    for e in range(6):
        slots = [p for p, x in enumerate(phy2log_P) if x == e]
        log2phy_ER[e, :len(slots)] = slots
    rng, cursor_E, realized_W = np.random.default_rng(3), np.zeros(6, int), np.zeros(3)
    expert_E = np.zeros(6, int)
    for tokens in rng.integers(1, 40, size=50):  # decode-sized and prefill-sized calls, top-2, expert 0 hot
        pair_expert_N = np.stack([np.zeros(tokens, int), rng.integers(1, 6, size=tokens)], axis=1).reshape(-1)
        slot_N, cursor_E = route_pairs(pair_expert_N, replicas_E, log2phy_ER, cursor_E)
        realized_W += np.bincount(np.array(slot_worker_P)[slot_N], minlength=3)
        expert_E += np.bincount(pair_expert_N, minlength=6)
    expected_W = worker_load_LW(torch.tensor(np.array([expert_E])), layout)[0].numpy()
    assert (np.abs(realized_W - expected_W) < 2).all(), (realized_W, expected_W)  # 2 replicated slots a worker
    assert routing_gap_L([realized_W], [expected_W])[0] < 2 / expected_W.mean()
    assert routing_gap_L([[0, 0, 0]], [[0.0, 0.0, 0.0]]).tolist() == [0.0], "no tokens, no gap"


@settings(max_examples=200, deadline=None)
@given(layers(), st.integers(1, 4))
def test_the_load_aware_rule_routes_every_pair_to_its_experts_live_slots(layer, num_workers):
    from moeray.placement.algorithms.routing import route_pairs_least_loaded

    replicas_E, log2phy_ER, pairs = layer
    slot_worker_P = np.arange(log2phy_ER.size) % num_workers
    cursor_E = np.zeros_like(replicas_E)
    for pair_expert_N in pairs:
        slot_N, after_E = route_pairs_least_loaded(pair_expert_N, replicas_E, log2phy_ER, cursor_E, slot_worker_P,
                                                   num_workers)
        again = route_pairs_least_loaded(pair_expert_N, replicas_E, log2phy_ER, cursor_E, slot_worker_P, num_workers)
        assert np.array_equal(slot_N, again[0]) and np.array_equal(after_E, again[1]), "deterministic"
        for e, r in enumerate(replicas_E.tolist()):
            assert np.isin(slot_N[pair_expert_N == e], log2phy_ER[e, :r]).all(), "only the expert's live slots"
        even_N, _ = route_pairs(pair_expert_N, replicas_E, log2phy_ER, cursor_E)
        busiest = lambda s_N: np.bincount(slot_worker_P[s_N], minlength=num_workers).max() if len(s_N) else 0
        assert busiest(slot_N) <= busiest(even_N), "never less balanced than the even split"
        cursor_E = after_E


def test_the_load_aware_rule_spares_a_busy_worker_and_splits_even_loads_as_route_pairs():
    from moeray.placement.algorithms.routing import route_pairs_least_loaded

    # expert 0 on workers 0 and 1; expert 1 (one copy) on worker 0 takes 6 of this call's pairs
    replicas_E, log2phy_ER, slot_worker_P = np.array([2, 1]), np.array([[0, 1], [2, -1]]), np.array([0, 1, 0])
    pair_expert_N = np.array([0] * 10 + [1] * 6)
    slot_N, _ = route_pairs_least_loaded(pair_expert_N, replicas_E, log2phy_ER, np.zeros(2, int), slot_worker_P, 2)
    assert np.bincount(slot_worker_P[slot_N], minlength=2).tolist() == [8, 8]  # even: [11, 5]
    assert slot_N[:10].tolist() == [1, 1, 0, 1, 1, 1, 1, 0, 1, 1], "interleaved, not in blocks"
    # equal loads: the same slots as the even rule, call after call
    rng, cursor_a, cursor_b = np.random.default_rng(0), np.zeros(2, int), np.zeros(2, int)
    replicas_E, log2phy_ER, slot_worker_P = np.array([3, 3]), np.array([[0, 1, 2], [3, 4, 5]]), np.arange(6)
    for _ in range(20):
        pair_expert_N = rng.integers(0, 2, size=int(rng.integers(1, 9)))
        even_N, cursor_a = route_pairs(pair_expert_N, replicas_E, log2phy_ER, cursor_a)
        aware_N, cursor_b = route_pairs_least_loaded(pair_expert_N, replicas_E, log2phy_ER, cursor_b, slot_worker_P, 6)
        assert np.array_equal(even_N, aware_N)
