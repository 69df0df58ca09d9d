"""The dispatcher over a fake transport, no Ray: combine against a direct computation, replica spread, a dead
worker's pairs re-routed, ExpertsUnavailable when an expert has no live replica left, plan switches.

Expert ``e`` of layer ``l`` is the linear map ``x -> x @ A_LEHH[l, e]``: a wrong slot, token or weight anywhere
between dispatch and combine changes the output.

Shape legend: L MoE layers, E experts, T tokens, H hidden, K top-k, N pairs.
"""

import pickle

import pytest
import torch

from moeray.placement.algorithms.plan import Plan
from moeray.router.dispatch import ExpertDispatcher, ExpertsUnavailable
from moeray.transport import Sent, WorkerCall
from moeray.transport.wire import pack, pairs_on, unpack

L, E, H, K = 2, 4, 8, 2
A_LEHH = torch.randn(L, E, H, H, generator=torch.Generator().manual_seed(0)) / H**0.5
# [layer][expert] -> the workers holding it: expert 0 twice, expert 1 on worker 1 only, expert 3 on every worker
REPLICAS = [[[0, 1], [1], [2, 0], [0, 1, 2]], [[2], [0, 1], [1, 2], [0, 1, 2]]]


class FakeWorker:
    """``ExpertWorker.forward`` on one worker's slots of ``plan``; records the (layer, expert) of every pair."""

    def __init__(self, plan: Plan, index: int) -> None:
        self.experts_per_layer = plan.experts_of(index)
        self.seen: list[tuple[int, int]] = []

    def forward(self, epoch, layer, x_TH, pair_token_N, pair_slot_N, pair_weight_N):
        x_TH = unpack(x_TH)
        token_N, slot_N, weight_N = pairs_on(torch.device("cpu"), pair_token_N, pair_slot_N, pair_weight_N)
        expert_N = torch.tensor(self.experts_per_layer[layer])[slot_N]
        self.seen += [(layer, e) for e in expert_N.tolist()]
        y_NH = torch.einsum("nh,nhg->ng", x_TH[token_N], A_LEHH[layer, expert_N]) * weight_N[:, None]
        return pack(torch.zeros_like(x_TH).index_add_(0, token_N, y_NH))


class FakeTransport:
    """Runs each call in place; the workers in ``dying`` are reported lost by the next send that calls them."""

    def __init__(self, workers: list) -> None:
        self.workers = list(workers)
        self.sends: list[dict[int, WorkerCall]] = []
        self.dying: set[int] = set()
        self.new_lists = 0

    def send(self, calls: dict[int, WorkerCall]) -> Sent:
        self.sends.append(calls)
        lost = frozenset(w for w in calls if w in self.dying)
        self.dying -= lost
        return Sent({w: self.workers[w].forward(*call) for w, call in calls.items() if w not in lost}, lost)

    def set_workers(self, workers: list) -> None:
        self.workers = list(workers)
        self.new_lists += 1

    def release_if_idle(self) -> bool:
        return False

    def close(self) -> None:
        pass


def _plan(replicas=REPLICAS, epoch: int = 0) -> Plan:
    return Plan.from_replicas(replicas, epoch=epoch, num_workers=3)


def _dispatcher(plan: Plan | None = None) -> tuple[ExpertDispatcher, FakeTransport]:
    plan = plan or _plan()
    transport = FakeTransport([FakeWorker(plan, w) for w in range(plan.num_workers)])
    return ExpertDispatcher(plan, transport), transport


def _routing(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_TH = torch.randn(tokens, H, generator=g)
    weights_TK, index_TK = torch.topk(torch.rand(tokens, E, generator=g), K, dim=-1)
    return x_TH, index_TK, weights_TK


def _direct(layer: int, x_TH, index_TK, weights_TK) -> torch.Tensor:
    """The layer computed token by token in this process."""
    y_TH = torch.zeros_like(x_TH)
    for t in range(len(x_TH)):
        for k in range(index_TK.shape[1]):
            y_TH[t] += weights_TK[t, k] * (x_TH[t] @ A_LEHH[layer, index_TK[t, k]])
    return y_TH


def test_combine_matches_a_direct_computation_and_counts_each_pair_once():
    dispatch, transport = _dispatcher()
    x_TH, index_TK, weights_TK = _routing(33, seed=1)
    for layer in range(L):
        y_TH = dispatch(layer, x_TH, index_TK, weights_TK)
        torch.testing.assert_close(y_TH, _direct(layer, x_TH, index_TK, weights_TK), rtol=1e-5, atol=1e-5)
    for calls in transport.sends:  # each worker gets only the rows its pairs name, in token order
        for call in calls.values():
            rows = len(unpack(call.x_TH))
            assert sorted(set(call.pair_token_N.tolist())) == list(range(rows))
            assert (call.pair_token_N.dtype, call.pair_slot_N.dtype, call.pair_weight_N.dtype) == ("int32",) * 2 + (
                "float32",)
    dispatch.load.end_step()
    [(expert_LE, worker_LW)] = dispatch.load.take()["steps"]
    expected_E = torch.bincount(index_TK.reshape(-1), minlength=E)
    assert expert_LE.tolist() == [expected_E.tolist()] * L
    assert worker_LW.sum(axis=1).tolist() == [2 * 33] * L


def test_pairs_of_a_replicated_expert_take_its_replicas_in_turn():
    dispatch, transport = _dispatcher()
    x_TH = torch.randn(33, H)
    only_TK = lambda e: torch.full((33, 1), e)  # every token to expert e, top-1
    ones_TK = torch.ones(33, 1)
    dispatch(0, x_TH, only_TK(3), ones_TK)  # layer 0: expert 3 on workers 0, 1, 2
    assert {w: len(call.pair_token_N) for w, call in transport.sends[-1].items()} == {0: 11, 1: 11, 2: 11}
    y_TH = dispatch(0, x_TH, only_TK(0), ones_TK)  # expert 0 on workers 0 and 1
    assert {w: len(call.pair_token_N) for w, call in transport.sends[-1].items()} == {0: 17, 1: 16}
    torch.testing.assert_close(y_TH, x_TH @ A_LEHH[0, 0], rtol=1e-5, atol=1e-5)
    dispatch(1, x_TH, only_TK(0), ones_TK)  # layer 1: expert 0 on worker 2 alone
    assert list(transport.sends[-1]) == [2]


def test_a_hot_first_choice_is_split_over_its_replicas_at_any_top_k():
    """Expert 0 (workers 0 and 1) is every token's first choice at top-2: its pairs split in half every call, and
    one-token steps take the replicas in turn; the combine is unchanged."""
    dispatch, transport = _dispatcher()
    x_TH = torch.randn(40, H)
    index_TK = torch.stack([torch.zeros(40, dtype=torch.long), 1 + torch.arange(40) % 3], dim=1)
    weights_TK = torch.rand(40, 2)
    y_TH = dispatch(0, x_TH, index_TK, weights_TK)
    torch.testing.assert_close(y_TH, _direct(0, x_TH, index_TK, weights_TK), rtol=1e-5, atol=1e-5)
    hot = [sum(1 for seen in w.seen if seen == (0, 0)) for w in transport.workers]
    assert hot == [20, 20, 0]
    for t in range(6):  # decode: one token a step
        dispatch(0, x_TH[t:t + 1], index_TK[t:t + 1], weights_TK[t:t + 1])
    hot = [sum(1 for seen in w.seen if seen == (0, 0)) for w in transport.workers]
    assert hot == [23, 23, 0]


def test_a_dead_workers_pairs_go_again_to_the_other_replicas():
    dispatch, transport = _dispatcher()
    lost = []
    dispatch.on_worker_lost = lost.append
    x_TH = torch.randn(33, H)
    index_TK = torch.tensor([[0, 3], [2, 3], [0, 2]] * 11)  # experts with a replica beside worker 1's
    weights_TK = torch.rand(33, 2)
    transport.dying = {1}
    y_TH = dispatch(0, x_TH, index_TK, weights_TK)
    torch.testing.assert_close(y_TH, _direct(0, x_TH, index_TK, weights_TK), rtol=1e-5, atol=1e-5)
    assert lost == [1] and dispatch.dead_workers == {1}
    first, retry = transport.sends
    pairs = lambda sent: sum(len(call.pair_token_N) for call in sent.values())
    assert set(first) == {0, 1, 2} and retry and set(retry) <= {0, 2}
    assert pairs(retry) == len(first[1].pair_token_N)  # exactly worker 1's pairs, sent again
    # worker 1's share was run exactly once more: every pair computed once by a live worker
    workers = transport.workers
    assert len(workers[0].seen) + len(workers[2].seen) == index_TK.numel()
    # later layers route around it from the start
    dispatch(0, x_TH, index_TK, weights_TK)
    later = transport.sends[-1]
    assert set(later) == {0, 2} and pairs(later) == index_TK.numel()  # every pair, none to worker 1
    dispatch.load.end_step()
    [(_, worker_LW)] = dispatch.load.take()["steps"]  # both calls, each pair counted once, none on worker 1
    assert worker_LW[0, 1] == 0 and worker_LW[0].sum() == 2 * index_TK.numel()


def test_an_expert_without_a_live_replica_raises_experts_unavailable():
    dispatch, transport = _dispatcher()
    transport.dying = {1}
    x_TH = torch.randn(5, H)
    index_TK = torch.tensor([[1, 3]] * 5)  # expert 1 of layer 0 lives on worker 1 only
    with pytest.raises(ExpertsUnavailable, match=r"MoE layer 0: experts \[1\] have no live replica \(dead "
                                                 r"workers \[1\]\)") as err:
        dispatch(0, x_TH, index_TK, torch.ones(5, 2))
    again = pickle.loads(pickle.dumps(err.value))  # it crosses Ray's process boundaries intact
    assert (again.layer, again.experts, again.dead_workers) == (0, [1], [1])
    # the experts that still have a replica keep serving
    other_TK = torch.tensor([[0, 3]] * 5)
    torch.testing.assert_close(dispatch(0, x_TH, other_TK, torch.ones(5, 2)),
                               _direct(0, x_TH, other_TK, torch.ones(5, 2)), rtol=1e-5, atol=1e-5)


def test_a_plan_switch_carries_its_epoch_and_new_workers_forget_old_deaths():
    dispatch, transport = _dispatcher()
    transport.dying = {2}
    x_TH, index_TK, weights_TK = _routing(9, seed=2)
    dispatch(0, x_TH, index_TK, weights_TK)
    assert dispatch.dead_workers == {2}
    moved = [[[1, 2], [0], [0, 1], [0, 1, 2]], REPLICAS[1]]  # layer 0 rebalanced; each expert off worker 2 too
    dispatch.set_plan(_plan(moved, epoch=1))  # same workers
    assert dispatch.dead_workers == {2} and transport.new_lists == 0
    dispatch(0, x_TH, index_TK, weights_TK)
    assert {call.epoch for call in transport.sends[-1].values()} == {1}
    with pytest.raises(ValueError, match="the plan places experts on 3 workers; 2 were given"):
        dispatch.set_plan(_plan(epoch=2), transport.workers[:2])
    plan = _plan(epoch=2)
    dispatch.set_plan(plan, [FakeWorker(plan, w) for w in range(3)])  # the controller replaced the workers
    assert dispatch.dead_workers == set() and transport.new_lists == 1
    y_TH = dispatch(1, x_TH, index_TK, weights_TK)
    assert set(transport.sends[-1]) == {0, 1, 2}
    torch.testing.assert_close(y_TH, _direct(1, x_TH, index_TK, weights_TK), rtol=1e-5, atol=1e-5)
