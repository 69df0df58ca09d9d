"""Static placement policies: golden cases and invariants."""

import pytest
import torch

from moeray.placement.algorithms.plan import Plan
from moeray.placement.algorithms.policies import static_plan


def _check_invariants(plan: Plan, num_experts: int, redundant: int) -> None:
    assert plan.num_slots == num_experts + redundant
    counts = plan.replica_count_LE
    assert (counts >= 1).all(), "every logical expert has a replica"
    assert counts.sum(dim=1).tolist() == [plan.num_slots] * plan.num_layers, "replicas fill the slots"
    log2phy = plan.log2phy_LER
    for l in range(plan.num_layers):
        for e in range(num_experts):
            slots = log2phy[l, e][log2phy[l, e] >= 0]
            assert (plan.phy2log_LP[l, slots] == e).all()
            workers = plan.slot_worker_LP[l, slots].tolist()
            assert len(set(workers)) == len(workers), "no two replicas of one expert on one worker"
    local = plan.local_slot_LP
    cap = -(-(num_experts + redundant) // plan.num_workers)
    for w in range(plan.num_workers):
        mine = plan.slot_worker_LP == w
        assert int(mine.sum(1).max()) <= cap, "no worker holds more than the slots an engine gives it"
        assert sorted(local[mine].tolist()) == sorted(sum([list(range(int(n))) for n in mine.sum(1)], []))


def test_contiguous_golden():
    plan = static_plan("contiguous", num_layers=2, num_experts=8, num_workers=3)
    assert plan.slot_worker_LP[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert plan.experts_of(2) == [[6, 7], [6, 7]]


def test_contiguous_with_replicas_fits_each_workers_slots():
    # Experts 0 and 1 both live on worker 0, so both their copies could only go to worker 1 (6 of 5 slots): the
    # second copy goes to the next expert that fits.
    plan = static_plan("contiguous", num_layers=1, num_experts=8, num_workers=2, redundant=2)
    assert plan.replica_workers()[0] == [[0, 1], [0], [0], [0], [1, 0], [1], [1], [1]]
    assert plan.experts_of(0) == [[0, 1, 2, 3, 4]] and plan.experts_of(1) == [[4, 5, 6, 7, 0]]


def test_round_robin_golden_with_replicas():
    plan = static_plan("round_robin", num_layers=1, num_experts=4, num_workers=2, redundant=2)
    assert plan.phy2log_LP[0].tolist() == [0, 1, 2, 3, 0, 1]
    assert plan.slot_worker_LP[0].tolist() == [0, 1, 0, 1, 1, 0]
    assert plan.replica_count_LE[0].tolist() == [2, 2, 1, 1]
    assert torch.equal(plan.log2phy_LER[0], torch.tensor([[0, 4], [1, 5], [2, -1], [3, -1]]))


@pytest.mark.parametrize("policy", ["contiguous", "round_robin"])
@pytest.mark.parametrize("experts,workers,redundant", [(8, 1, 0), (8, 3, 0), (8, 3, 5), (16, 4, 16), (3, 5, 2), (64, 8, 16)])
def test_invariants(policy, experts, workers, redundant):
    _check_invariants(static_plan(policy, num_layers=3, num_experts=experts, num_workers=workers,
                                  redundant=redundant), experts, redundant)


def test_errors_name_the_value_and_limit():
    with pytest.raises(ValueError, match=r"redundant slots must lie in \[0, 0\].*got 1"):
        static_plan("contiguous", num_layers=1, num_experts=8, num_workers=1, redundant=1)
    with pytest.raises(ValueError, match="9 workers but only 8 slots"):
        static_plan("contiguous", num_layers=1, num_experts=8, num_workers=9)
    with pytest.raises(ValueError, match="placement policy 'nope'"):
        static_plan("nope", num_layers=1, num_experts=8, num_workers=2)
    with pytest.raises(ValueError, match="two replicas of one expert on the same worker"):
        Plan(epoch=0, num_workers=2, num_experts=2, phy2log_LP=torch.tensor([[0, 1, 0]]),
             slot_worker_LP=torch.tensor([[0, 1, 0]]))
    with pytest.raises(ValueError, match=r"experts \[1\] have no replica"):
        Plan(epoch=0, num_workers=1, num_experts=2, phy2log_LP=torch.tensor([[0]]), slot_worker_LP=torch.tensor([[0]]))
