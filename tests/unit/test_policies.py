"""Load-based placement policies (greedy, replicated, replicated_hierarchical, migration_aware, optimal): golden
cases checked by hand, invariants over a grid of awkward shapes and over random ones (hypothesis), optimal's
bound against every policy and against a brute-force search, and replicated's node spreading and relabelling."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeray.placement.algorithms.balanced import greedy, replicated, replicated_hierarchical
from moeray.placement.algorithms.load import imbalance_L, worker_load_LW
from moeray.placement.algorithms.migration import migration_aware
from moeray.placement.algorithms.optimal import optimal, optimal_bound
from moeray.placement.algorithms.packing import relabel_workers, spread_ok
from moeray.placement.algorithms.plan import Layout, Plan
from moeray.placement.algorithms.policies import resolve_policy, static_plan
from moeray.placement.algorithms.topology import Budget, Topology
from moeray.placement.traces import synthesize

POLICIES = {"greedy": greedy, "replicated": replicated, "replicated_hierarchical": replicated_hierarchical,
            "migration_aware": migration_aware, "optimal": optimal}


def _load(layers: int, experts: int, seed: int = 0, s: float = 1.2) -> torch.Tensor:
    """Zipf-like tokens with ranks permuted per layer, one all-zero layer, and a few zero experts."""
    rng = np.random.default_rng(seed)
    out = np.stack([rng.multinomial(50 * experts, (w := np.arange(1, experts + 1.0) ** -s)[rng.permutation(experts)]
                                    / w.sum()) for _ in range(layers)])
    out[-1] = 0 if layers > 1 else out[-1]
    return torch.tensor(out, dtype=torch.float64)


def _check(plan: Layout, load_LE: torch.Tensor, topology: Topology, budget: Budget) -> None:
    L, E = load_LE.shape
    assert type(plan) is Layout, "a policy returns a layout; only the controller numbers it as a plan"
    assert (plan.num_layers, plan.num_experts, plan.num_workers) == (L, E, topology.num_workers)
    assert plan.num_slots == E + budget.redundant, "replicas fill the slots"
    assert (plan.replica_count_LE >= 1).all(), "every expert has a replica"
    per_worker_LW = torch.zeros(L, topology.num_workers, dtype=torch.long).scatter_add_(
        1, plan.slot_worker_LP, torch.ones_like(plan.slot_worker_LP))
    assert (per_worker_LW <= topology.slots_per_worker).all(), "capacity respected"
    for l in range(L):
        assert len(plan.holders(l)) == plan.num_slots, "no two replicas of one expert on one worker"


def _same(a: Plan, b: Plan) -> bool:
    return torch.equal(a.phy2log_LP, b.phy2log_LP) and torch.equal(a.slot_worker_LP, b.slot_worker_LP)


def _max_load(load_E: torch.Tensor, plan: Plan) -> float:
    """The busiest worker's tokens under a one-layer plan."""
    return float(worker_load_LW(load_E[None], plan).max())


# --- golden cases ---------------------------------------------------------------------------------------------------

def test_greedy_golden_lpt_is_perfect_here():
    topology = Topology.uniform(num_workers=2, slots_per_worker=4)
    plan = greedy(torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1]]), topology, None, Budget())
    assert plan.replica_workers()[0] == [[0], [1], [1], [0], [0], [1], [1], [0]]
    assert worker_load_LW(torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1]]), plan).tolist() == [[18, 18]]


def test_greedy_golden_refinement_fixes_lpt_worst_case():
    # LPT: 3 -> w0, 3 -> w1, 2 -> w0, 2 -> w1, 2 -> w0 = 7 vs 5; one swap (3 <-> 2) reaches 6 vs 6.
    load, topology = torch.tensor([[3.0, 3, 2, 2, 2]]), Topology.uniform(num_workers=2, slots_per_worker=3)
    lpt = greedy(load, topology, None, Budget(), refine=False)
    assert lpt.experts_of(0) == [[0, 2, 4]] and worker_load_LW(load, lpt).tolist() == [[7, 5]]
    plan = greedy(load, topology, None, Budget())
    assert plan.experts_of(0) == [[2, 3, 4]] and worker_load_LW(load, plan).tolist() == [[6, 6]]


def test_replicated_golden():
    # Redundant slots: 10 -> 2 x 5, then 6 -> 2 x 3. Packing: 5, 5 | 3, 3 | 2 | 2 = 10 vs 10.
    load = torch.tensor([[10.0, 6, 2, 2]])
    plan = replicated(load, Topology.uniform(num_workers=2, slots_per_worker=3), None, Budget(redundant=2))
    assert plan.replica_workers()[0] == [[0, 1], [0, 1], [0], [1]]
    assert plan.replica_count_LE.tolist() == [[2, 2, 1, 1]]
    assert worker_load_LW(load, plan).tolist() == [[10, 10]]


def test_replicated_never_stacks_replicas_and_completes_the_packing():
    # Tight: 3 experts + 12 redundant slots fill 5 workers x 3 slots only with every expert on every worker.
    topology = Topology.uniform(num_workers=5, slots_per_worker=3)
    plan = replicated(torch.tensor([[100.0, 1, 0]]), topology, None, Budget(redundant=12))
    assert plan.replica_workers()[0] == [[0, 1, 2, 3, 4]] * 3


def test_hierarchical_golden():
    # Nodes {0, 1}, {2, 3}, 2 experts each: 9 and 1 on node 0 (4.5 vs 1 per worker) is all the balance there is.
    # Redundant: 9 -> 2 replicas, then the tie 1, 1, 1 goes to the lowest index, expert 1 (node 1).
    load = torch.tensor([[9.0, 1, 1, 1]])
    topology = Topology.uniform(num_workers=4, num_nodes=2, slots_per_worker=2)
    plan = replicated_hierarchical(load, topology, None, Budget(redundant=2))
    assert plan.replica_workers()[0] == [[0, 1], [2, 3], [2], [0]]
    assert worker_load_LW(load, plan).tolist() == [[5.5, 4.5, 1.5, 0.5]]


def test_hierarchical_groups_stay_together():
    topology = Topology.uniform(num_workers=4, num_nodes=2, slots_per_worker=6)
    load = _load(3, 16, seed=3)
    plan = replicated_hierarchical(load, topology, None, Budget(redundant=4), num_groups=4)
    for l, experts in enumerate(plan.replica_workers()):
        for g in range(4):
            nodes = {topology.worker_node[w] for e in range(4 * g, 4 * g + 4) for w in experts[e]}
            assert len(nodes) == 1, f"layer {l} group {g} spans nodes {nodes}"


def test_migration_golden_move():
    load, topology = torch.tensor([[4.0, 4, 4, 4]]), Topology.uniform(num_workers=2, slots_per_worker=3)
    current = Plan.from_replicas([[[0], [0], [0], [1]]], epoch=7, num_workers=2)
    plan = migration_aware(load, topology, current, Budget())
    assert plan.replica_workers()[0] == [[1], [0], [0], [1]]
    assert current.moved_slots(plan) == 1


def test_migration_golden_repoint():
    # Expert 1's spare replica on worker 1 is worth more as a second copy of the hot expert 0: 11 vs 3 -> 7 vs 7.
    load, topology = torch.tensor([[10.0, 2, 2]]), Topology.uniform(num_workers=2, slots_per_worker=2)
    current = Plan.from_replicas([[[0], [0, 1], [1]]], epoch=0, num_workers=2)
    plan = migration_aware(load, topology, current, Budget(redundant=1))
    assert plan.replica_workers()[0] == [[0, 1], [0], [1]]
    assert current.moved_slots(plan) == 1 and worker_load_LW(load, plan).tolist() == [[7, 7]]


def test_migration_moves_nothing_when_balanced():
    topology, budget = Topology.uniform(num_workers=8, num_nodes=2, slots_per_worker=10), Budget(redundant=16)
    load = _load(4, 64, seed=1)
    current = replicated(load, topology, None, budget)
    plan = migration_aware(load, topology, current, budget)
    assert current.moved_slots(plan) == 0


@pytest.mark.parametrize("limit", [dict(max_moved_slots=0), dict(max_moved_slots=5),
                                   dict(max_moved_bytes=7 * 100 + 99, expert_bytes=100)])
def test_migration_respects_the_move_budget(limit):
    topology = Topology.uniform(num_workers=8, num_nodes=2, slots_per_worker=10)
    current = static_plan("round_robin", num_layers=4, num_experts=64, num_workers=8, redundant=16)
    load, budget = _load(4, 64, seed=2, s=1.5), Budget(redundant=16, **limit)
    plan = migration_aware(load, topology, current, budget)
    allowed = limit.get("max_moved_slots", 7)
    assert 0 < current.moved_slots(plan) <= allowed if allowed else current.moved_slots(plan) == 0
    unlimited = migration_aware(load, topology, current, Budget(redundant=16))
    assert current.moved_slots(unlimited) > allowed
    assert imbalance_L(worker_load_LW(load, unlimited)).mean() < imbalance_L(worker_load_LW(load, current)).mean()


def test_migration_falls_back_to_replicated_without_a_usable_plan():
    topology, budget, load = Topology.uniform(num_workers=3, slots_per_worker=4), Budget(redundant=2), _load(2, 8)
    other = static_plan("contiguous", num_layers=2, num_experts=8, num_workers=2, redundant=2, epoch=4)
    for current in (None, other):
        plan = migration_aware(load, topology, current, budget)
        assert _same(plan, replicated(load, topology, None, budget))


def test_registry_finds_every_policy():
    for name, fn in POLICIES.items():
        assert resolve_policy(name) is fn


# --- invariants over a grid of shapes -------------------------------------------------------------------------------

GRID = [  # experts, workers, nodes, redundant, slots per worker
    (8, 1, 1, 0, 8), (8, 3, 1, 0, 3), (8, 3, 1, 5, 5), (16, 4, 2, 16, 8), (3, 5, 1, 2, 1), (3, 5, 2, 6, 3),
    (3, 5, 1, 12, 3), (33, 4, 2, 7, 11), (64, 8, 2, 16, 10), (10, 6, 3, 4, 3), (1, 2, 1, 1, 1),
]


def _expected_error(name: str, E: int, W: int, N: int, R: int) -> str | None:
    if name == "greedy" and R:
        return "use the 'replicated' policy"
    if name == "replicated_hierarchical" and (E, W, N, R) == (3, 5, 1, 12):
        return None
    if name == "optimal" and E * W * min(W, R + 1) + E * min(W, R + 1) > 2048:
        return "binary variables per layer, over the limit of 2048"
    return None


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("E,W,N,R,S", GRID)
def test_invariants(name, E, W, N, R, S):
    topology, budget = Topology.uniform(num_workers=W, num_nodes=N, slots_per_worker=S), Budget(redundant=R)
    load = _load(3, E, seed=E * W + R)
    kwargs = {"time_limit_s": 1.5} if name == "optimal" else {}
    error = _expected_error(name, E, W, N, R)
    if error:
        with pytest.raises(ValueError, match=error):
            POLICIES[name](load, topology, None, budget, **kwargs)
        return
    current = static_plan("round_robin", num_layers=3, num_experts=E, num_workers=W, redundant=R, epoch=2)
    plan = POLICIES[name](load, topology, current, budget, **kwargs)
    _check(plan, load, topology, budget)
    if name == "replicated_hierarchical":
        for experts in plan.replica_workers():
            assert all(len({topology.worker_node[w] for w in ws}) == 1 for ws in experts), "replicas on one node"
    if name != "optimal":  # optimal's solver is deterministic too, but a time limit is not
        assert _same(plan, POLICIES[name](load, topology, current, budget, **kwargs)), "deterministic"


def test_hierarchical_redundancy_limit_names_the_values():
    # Node 1 holds 1 worker: its experts cannot be replicated, so 1 node x 4 workers x 2 slots is all there is.
    topology = Topology(worker_node=(0, 0, 0, 0, 1), slots_per_worker=2)
    with pytest.raises(ValueError, match=r"at most 6 redundant slots; got 7"):
        replicated_hierarchical(_load(1, 3), topology, None, Budget(redundant=7))
    replicated_hierarchical(_load(1, 3), topology, None, Budget(redundant=6))


def test_errors_name_the_value_and_limit():
    topology = Topology.uniform(num_workers=2, slots_per_worker=4)
    with pytest.raises(ValueError, match=r"8 experts \+ 1 redundant = 9 slots per layer exceed .* = 8"):
        replicated(_load(1, 8), topology, None, Budget(redundant=1))
    with pytest.raises(ValueError, match=r"load must hold finite, non-negative token counts; got min -1"):
        replicated(torch.tensor([[1.0, -1.0]]), topology, None, Budget())
    with pytest.raises(ValueError, match=r"load must be \[layers >= 1, experts >= 1\].*got shape \(4,\)"):
        replicated(torch.ones(4), topology, None, Budget())
    with pytest.raises(ValueError, match="num_groups must divide the 8 experts into equal groups; got 3"):
        replicated_hierarchical(_load(1, 8), topology, None, Budget(), num_groups=3)
    with pytest.raises(ValueError, match="got threshold=-1, target=1.0"):
        migration_aware(_load(1, 8), topology, None, Budget(), threshold=-1, target=1.0)
    big = Topology.uniform(num_workers=8, slots_per_worker=10)
    with pytest.raises(ValueError, match=r"64 experts x 8 workers needs 4608 binary variables .* limit of 2048"):
        optimal(_load(1, 64), big, None, Budget(redundant=16))


# --- optimal: against brute force and as a bound ----------------------------------------------------------------------

def _brute_force_max(load_E: list[float], W: int, S: int, R: int) -> float:
    """Smallest max worker load over every plan (each expert on a non-empty set of workers), even splitting."""
    subsets = [c for k in range(1, W + 1) for c in itertools.combinations(range(W), k)]
    best = float("inf")
    for choice in itertools.product(subsets, repeat=len(load_E)):
        if sum(map(len, choice)) != len(load_E) + R:
            continue
        load_W, fill_W = [0.0] * W, [0] * W
        for e, ws in enumerate(choice):
            for w in ws:
                load_W[w] += load_E[e] / len(ws)
                fill_W[w] += 1
        if max(fill_W) <= S:
            best = min(best, max(load_W))
    return best


@pytest.mark.parametrize("load_E,W,S,R", [([7.0, 5, 4, 3, 1], 3, 2, 1), ([9.0, 2, 2, 1], 3, 2, 2),
                                          ([5.0, 4, 3, 3, 3], 2, 3, 0), ([1.0, 1, 6], 2, 2, 1),
                                          ([1090.0, 261, 456, 193], 4, 4, 2)])  # replicated: 624 vs 545
def test_optimal_matches_brute_force_and_bounds_it(load_E, W, S, R):
    topology, budget = Topology.uniform(num_workers=W, slots_per_worker=S), Budget(redundant=R)
    load = torch.tensor([load_E])
    best = _brute_force_max(load_E, W, S, R)
    plan = optimal(load, topology, None, budget, time_limit_s=5)
    assert _max_load(load[0], plan) == pytest.approx(best, rel=1e-6)
    replicas, bound, proven = optimal_bound(load[0], topology, budget, time_limit_s=5)
    assert proven and bound <= best * (1 + 1e-6)
    if R == 0:  # one replica each: no flow can split, so the flow model is the exact problem
        assert bound == pytest.approx(best, rel=1e-6)
    Plan.from_replicas([replicas], epoch=0, num_workers=W)  # the flow model's own placement is a valid plan


@pytest.mark.parametrize("E,W,N,R,S", [(8, 3, 1, 5, 5), (16, 4, 2, 16, 8), (33, 4, 2, 7, 11), (64, 8, 2, 16, 10)])
def test_optimal_bound_is_below_every_policy(E, W, N, R, S):
    topology, budget = Topology.uniform(num_workers=W, num_nodes=N, slots_per_worker=S), Budget(redundant=R)
    load = _load(1, E, seed=E + R, s=1.5)
    _, bound, _ = optimal_bound(load[0], topology, budget, time_limit_s=2)
    assert bound >= load.sum().item() / W * (1 - 1e-9), "never below the mean"
    current = static_plan("round_robin", num_layers=1, num_experts=E, num_workers=W, redundant=R)
    for name, fn in POLICIES.items():
        if _expected_error(name, E, W, N, R) is None:
            kwargs = {"time_limit_s": 2} if name == "optimal" else {}
            plan = fn(load, topology, current, Budget(redundant=0) if name == "greedy" else budget, **kwargs)
            assert bound <= _max_load(load[0], plan) * (1 + 1e-6), name


def test_optimal_bound_under_a_time_limit_is_the_dual_bound():
    # One replica per expert on 8 x 5 slots is bin packing: the search rarely finishes in 0.2 s.
    topology, budget = Topology.uniform(num_workers=8, slots_per_worker=5), Budget()
    load = _load(1, 40, seed=5, s=0.8)
    replicas, bound, _ = optimal_bound(load[0], topology, budget, time_limit_s=0.2)
    plan = Plan.from_replicas([replicas], epoch=0, num_workers=8)
    assert max(load[0].tolist()) <= bound <= _max_load(load[0], greedy(load, topology, None, budget))
    assert (plan.replica_count_LE == 1).all()


# --- invariants on random instances -----------------------------------------------------------------------------------

@st.composite
def _instances(draw):
    W = draw(st.integers(1, 6))
    N = draw(st.integers(1, W))
    E = draw(st.integers(1, 12))
    S = draw(st.integers(-(-E // W), E + 2))
    R = draw(st.integers(0, min(W * S - E, E * (W - 1))))
    L = draw(st.integers(1, 3))
    load = draw(st.lists(st.lists(st.integers(0, 1000) | st.just(0), min_size=E, max_size=E), min_size=L, max_size=L))
    return E, W, N, R, S, torch.tensor(load, dtype=torch.float64), draw(st.integers(0, 3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_instances())
def test_random_instances_keep_the_invariants(instance):
    E, W, N, R, S, load, limit = instance
    topology = Topology.uniform(num_workers=W, num_nodes=N, slots_per_worker=S)
    budget = Budget(redundant=R, max_moved_slots=limit)
    plans = {"replicated": replicated(load, topology, None, budget)}
    if R == 0:
        plans["greedy"] = greedy(load, topology, None, budget)
    try:
        plans["replicated_hierarchical"] = replicated_hierarchical(load, topology, None, budget)
    except ValueError as e:  # only when a node's workers cannot hold that many replicas of its experts
        assert "keeps an expert's replicas on its node" in str(e)
    else:
        for experts in plans["replicated_hierarchical"].replica_workers():
            assert all(len({topology.worker_node[w] for w in ws}) == 1 for ws in experts)
    for name, plan in plans.items():
        _check(plan, load, topology, budget)
        moved = migration_aware(load, topology, plan, budget)
        _check(moved, load, topology, budget)
        assert plan.moved_slots(moved) <= limit
        assert (imbalance_L(worker_load_LW(load, moved)) <= imbalance_L(worker_load_LW(load, plan)) + 1e-9).all()


# --- replicated: replicas spread over nodes, slots kept in place -------------------------------------------------------

def _unspread(plan: Plan, topology: Topology) -> list[tuple[int, int]]:
    """(layer, expert) of every expert whose >= 2 replicas all sit on one node."""
    return [(l, e) for l, experts in enumerate(plan.replica_workers()) for e, ws in enumerate(experts)
            if not spread_ok(ws, topology.worker_node)]


def test_replicated_golden_spreading_forces_a_choice():
    # Workers {0, 1} on node 0, {2, 3} on node 1, 2 slots each. Replicas: 4 -> 2 x 2, 4 -> 2 x 2, 3, 3.
    # Unspread, LPT puts 3 on w0, 3 on w1, then both 2-replica experts on the idle w2, w3: node 1 alone holds
    # experts 0 and 1. Spread: the second 3 goes to the other node (w2, a tie on worker load broken by node
    # load), and each 2-replica expert takes w1 and then a worker on the node it lacks, w3. Same max load.
    load, topology = torch.tensor([[4.0, 4, 3, 3]]), Topology.uniform(num_workers=4, num_nodes=2, slots_per_worker=2)
    packed = replicated(load, topology, None, Budget(redundant=2), spread_nodes=False)
    assert packed.replica_workers()[0] == [[2, 3], [2, 3], [0], [1]] and _unspread(packed, topology) == [(0, 0), (0, 1)]
    spread = replicated(load, topology, None, Budget(redundant=2))
    assert spread.replica_workers()[0] == [[1, 3], [1, 3], [0], [2]] and not _unspread(spread, topology)
    assert worker_load_LW(load, spread).tolist() == [[3, 4, 3, 4]] and worker_load_LW(load, packed).max() == 4


def test_replicated_spreads_what_the_slots_allow():
    # Node 1 is one worker of 2 slots, but all three experts have 2 replicas: one of them must stay on node 0.
    load, topology = torch.tensor([[1.0, 1, 1]]), Topology(worker_node=(0, 0, 1), slots_per_worker=2)
    plan = replicated(load, topology, None, Budget(redundant=3))
    assert plan.replica_workers()[0] == [[0, 2], [1, 2], [0, 1]] and _unspread(plan, topology) == [(0, 2)]
    assert worker_load_LW(load, plan).tolist() == [[1, 1, 1]]


@st.composite
def _two_node_instances(draw):
    W = draw(st.sampled_from([2, 4, 6, 8]))
    E = draw(st.integers(2, 12))
    R = draw(st.integers(1, min(2 * E, E * (W - 1))))
    S = -(-(E + R) // W) + draw(st.integers(0, 2))
    L = draw(st.integers(1, 2))
    load = draw(st.lists(st.lists(st.integers(0, 1000), min_size=E, max_size=E), min_size=L, max_size=L))
    return E, W, R, S, torch.tensor(load, dtype=torch.float64), draw(st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_two_node_instances())
def test_replicated_spreads_replicas_over_two_nodes(instance):
    # Two nodes of equal size: slots always allow a spread here, even when the replicas fill every slot.
    E, W, R, S, load, with_current = instance
    topology, budget = Topology.uniform(num_workers=W, num_nodes=2, slots_per_worker=S), Budget(redundant=R)
    # A current plan (replicated's own, for the experts' loads reversed) makes it relabel within each node too.
    current = replicated(load.flip(1), topology, None, budget) if with_current else None
    plan = replicated(load, topology, current, budget)
    _check(plan, load, topology, budget)
    assert not _unspread(plan, topology), "losing one node loses an expert that had a spare copy"


def _drifting(num_experts: int, windows: int = 8) -> list[torch.Tensor]:
    return synthesize("drifting", num_layers=4, num_experts=num_experts, num_windows=windows, tokens=2048, top_k=4,
                      seed=1, s=1.0, drift_every=2, drift_experts=2)


@pytest.mark.parametrize("name", ["replicated", "greedy"])
def test_relabelling_moves_fewer_slots_and_keeps_the_balance(name):
    topology = Topology.uniform(num_workers=4, num_nodes=2, slots_per_worker=6)
    budget = Budget(redundant=8 if name == "replicated" else 0)
    fn = POLICIES[name]
    current = static_plan("round_robin", num_layers=4, num_experts=16, num_workers=4, redundant=budget.redundant)
    moved = {"relabelled": 0, "unrelabelled": 0, "before": 0}
    for load in _drifting(16):
        plan, fresh = fn(load, topology, current, budget), fn(load, topology, current, budget, relabel=False)
        _check(plan, load, topology, budget)
        assert current.moved_slots(plan) <= current.moved_slots(fresh)
        # A relabelling permutes each layer's workers: the same loads, so the same imbalance.
        load_LW, fresh_LW = worker_load_LW(load, plan), worker_load_LW(load, fresh)
        assert torch.equal(load_LW.sort(dim=1).values, fresh_LW.sort(dim=1).values)
        assert torch.allclose(imbalance_L(load_LW), imbalance_L(fresh_LW), rtol=1e-12, atol=0)
        if name == "replicated":
            assert not _unspread(plan, topology), "relabelling within nodes keeps the spread"
        before = fn(load, topology, current, budget, relabel=False,
                    **({"spread_nodes": False} if name == "replicated" else {}))
        moved["relabelled"] += current.moved_slots(plan)
        moved["unrelabelled"] += current.moved_slots(fresh)
        moved["before"] += current.moved_slots(before)
        current = plan
    # The whole trace, against the same policy without relabelling and as it was before spreading and relabelling.
    assert moved["relabelled"] < moved["unrelabelled"] and moved["relabelled"] < moved["before"], moved


def test_relabelling_needs_a_plan_of_the_same_shape():
    topology, load = Topology.uniform(num_workers=4, num_nodes=2, slots_per_worker=6), _load(2, 16, seed=4)
    fresh = replicated(load, topology, None, Budget(redundant=8))
    for other in (static_plan("round_robin", num_layers=2, num_experts=16, num_workers=4, redundant=7),
                  static_plan("round_robin", num_layers=3, num_experts=16, num_workers=4, redundant=8),
                  static_plan("round_robin", num_layers=2, num_experts=16, num_workers=3, redundant=8)):
        assert _same(replicated(load, topology, other, Budget(redundant=8)), fresh)
    # The same plan as current: relabelling finds it again, so nothing moves.
    assert fresh.moved_slots(replicated(load, topology, fresh, Budget(redundant=8))) == 0


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_relabel_workers_is_a_permutation_within_groups(data):
    W = data.draw(st.integers(1, 6))
    E = data.draw(st.integers(1, 8))
    node_W = sorted(data.draw(st.lists(st.integers(0, 2), min_size=W, max_size=W)))
    groups = data.draw(st.sampled_from([None, [[w for w in range(W) if node_W[w] == n] for n in set(node_W)]]))
    replicas = st.lists(st.sets(st.integers(0, W - 1), min_size=1).map(sorted), min_size=E, max_size=E)
    new, current = data.draw(replicas), data.draw(replicas)
    out = relabel_workers(new, current, W, groups)
    assert all(len(set(ws)) == len(ws) for ws in out), "two replicas of one expert on one worker"
    held = [{e for e, ws in enumerate(new) if w in ws} for w in range(W)]
    out_held = [{e for e, ws in enumerate(out) if w in ws} for w in range(W)]
    to = {}
    for w in range(W):  # the worker that now holds exactly what w held
        to[w] = next(v for v in range(W) if out_held[v] == held[w] and v not in to.values())
        if groups is not None:
            assert node_W[to[w]] == node_W[w], "relabelled across nodes"
    in_place = [sum(len(set(a) & set(b)) for a, b in zip(x, current)) for x in (out, new)]
    assert in_place[0] >= in_place[1], "keeps at least as many slots in place as no relabelling"
