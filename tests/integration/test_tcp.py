"""The TCP data path on a Ray engine against transformers and against the object-store path: same tokens, same
logits, the same layer outputs bit for bit; with two routers through a rebalance, a scale 2 -> 3 -> 2 and a router
Ray restarted; with micro-batches sending at once. tcp is the default transport, so the other Ray tests run it too
(a worker killed mid-generation: tests/integration/test_failures.py).

Few actors: 2 workers per engine (3 while scaled); short generations, as each engine start costs the most here."""

from __future__ import annotations

import pytest
import ray
import torch
from ray._common.test_utils import wait_for_condition

from conftest import PROMPTS, _ray_start, assert_logits_close
from moeray import Engine, EngineConfig, SamplingParams
from moeray.transport import WorkerCall, unpack
from moeray.transport.object_store import ObjectStoreTransport
from moeray.transport.tcp import TcpTransport, WorkerFailed

pytestmark = pytest.mark.ray
TOKENS = 6
SAMPLING = SamplingParams(max_new_tokens=TOKENS)


@pytest.fixture(scope="module")
def cluster():
    with _ray_start():
        yield


def _tcp(path: str, **kwargs) -> Engine:
    return Engine(EngineConfig(model=path, workers=2, transport="tcp", **kwargs))


def _opened(engine: Engine, router: int = 0) -> int:
    """Connections this router opened (reported as the compiled graph's counter)."""
    return ray.get(engine.routers[router].stats.remote())["graph_compiles"]


def _connections(engine: Engine) -> list[int]:
    return ray.get([w.tcp_connections.remote() for w in engine.workers])


def _outputs(engine: Engine, sampling: SamplingParams = SAMPLING, router: int = 0) -> list[list[int]]:
    return [r.output_ids for r in ray.get([engine.submit(p, sampling, router=router) for p in PROMPTS], timeout=300)]


def _layer_calls(engine: Engine, epoch: int, tokens: int = 5) -> dict[int, WorkerCall]:
    """One call per worker for MoE layer 0: random tokens, each pair on one of the worker's slots."""
    plan, hidden = engine.plan, engine.spec.moe_layers[0].hidden_size
    g = torch.Generator().manual_seed(epoch)
    calls = {}
    for w in range(plan.num_workers):
        slots = len(plan.experts_of(w)[0])
        token_N = torch.arange(tokens).repeat_interleave(2)
        slot_N = torch.randint(slots, token_N.shape, generator=g)
        calls[w] = WorkerCall.of(epoch, 0, torch.randn(tokens, hidden, generator=g), token_N, slot_N,
                                 torch.rand(token_N.shape, generator=g))
    return calls


@pytest.mark.parametrize("arch", ["gpt_oss"])  # the default path: test_engine.py runs the six architectures on it
def test_tcp_matches_transformers_and_the_object_store_path(arch, cluster, checkpoints, oracle):
    ref = oracle(arch)
    with _tcp(checkpoints[arch], replicas=2) as engine:
        assert_logits_close(engine.score([PROMPTS[1]])[0], ref.logits(PROMPTS[1]))
        assert _outputs(engine) == [ref.greedy(p, TOKENS) for p in PROMPTS]
        assert ray.get(engine.routers[0].stats.remote())["transport"] == "TcpTransport"
        assert _connections(engine) == [1, 1], "one connection per worker: the router's steps run one at a time"
        # A second transport from this process beside the router's: one layer's outputs equal the object store's.
        tcp, store = TcpTransport(engine.workers), ObjectStoreTransport(engine.workers)
        try:
            calls = _layer_calls(engine, engine.plan.epoch)
            sent, expected = tcp.send(calls), store.send(calls)
            assert sent.lost == expected.lost == frozenset() and sorted(sent.results) == [0, 1]
            for w in (0, 1):
                assert torch.equal(unpack(sent.results[w]), unpack(expected.results[w]))
            assert _connections(engine) == [2, 2]
            with pytest.raises(WorkerFailed, match=r"worker 1: StaleEpoch: worker 1 holds plan epochs \[0\]"):
                tcp.send({1: _layer_calls(engine, 99)[1]})
            again = tcp.send(calls)
            assert torch.equal(unpack(again.results[1]), unpack(expected.results[1])) and tcp.compiles == 2
        finally:
            tcp.close()
        wait_for_condition(lambda: _connections(engine) == [1, 1], timeout=30)
        assert _outputs(engine) == [ref.greedy(p, TOKENS) for p in PROMPTS], "the router's own are untouched"


def test_two_routers_and_micro_batches_through_rebalance_scale_and_a_restart(cluster, checkpoints, oracle):
    """Connections per router (and per micro-batch sending at once); a plan switch keeps them, a new worker list
    reopens them, and a router Ray restarted opens its own while its old ones close with its process."""
    ref = oracle("mixtral")
    expected = [ref.greedy(p, TOKENS) for p in PROMPTS]
    with _tcp(checkpoints["mixtral"], routers=2, replicas=2, micro_batches=2) as engine:
        both = ray.get([engine.submit(p, SAMPLING, router=r) for r in (0, 1) for p in PROMPTS], timeout=300)
        assert [r.output_ids for r in both] == expected * 2, "both routers at once, each step in two micro-batches"
        assert all(ray.get(r.stats.remote())["micro_batch_steps"] > 0 for r in engine.routers)
        opened = [_opened(engine, r) for r in (0, 1)]
        assert all(2 <= n <= 4 for n in opened), "per worker, one connection per micro-batch in flight at once"
        assert engine.rebalance(policy="round_robin")["applied"]
        assert _outputs(engine, router=0) == _outputs(engine, router=1) == expected
        for workers in (3, 2):
            assert engine.scale(workers)["applied"]
            assert _outputs(engine, router=0) == _outputs(engine, router=1) == expected
            # the old list's connections closed: each worker serves only the current routers' connections
            wait_for_condition(lambda: sum(_connections(engine)) <= 2 * 2 * workers, timeout=30)

        ray.kill(engine.routers[1], no_restart=False)

        def restarted() -> bool:  # a fresh incarnation (the old one may still answer right after the kill)
            try:
                return ray.get(engine.routers[1].stats.remote(), timeout=5)["steps"] == 0
            except ray.exceptions.RayError:
                return False

        wait_for_condition(restarted, timeout=120)
        assert _outputs(engine, router=1) == _outputs(engine, router=0) == expected

