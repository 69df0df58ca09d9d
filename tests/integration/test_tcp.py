"""The TCP data path on a Ray engine against transformers (same tokens, same logits) and one layer's outputs against
the object-store path's, bit for bit; with two routers and micro-batches sending at once, through a rebalance, a
scale 2 -> 3 -> 2 and a router Ray restarted. tcp is the default transport, so the other Ray tests run it too
(a worker killed mid-generation: tests/integration/test_failures.py).

Few actors: 2 workers per engine (3 while scaled); short generations, as each engine start costs the most here."""

from __future__ import annotations

import pytest
import ray
import torch
from ray._common.test_utils import wait_for_condition

from conftest import PROMPTS, _ray_start, assert_logits_close, layer_calls, router_outputs
from moeray import Engine, EngineConfig, SamplingParams
from moeray.transport import unpack
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
    return router_outputs(engine, sampling, router)


def test_two_routers_and_micro_batches_match_transformers_through_rebalance_scale_and_a_restart(
        cluster, checkpoints, oracle):
    """Connections per router (and per micro-batch sending at once); a plan switch keeps them, a new worker list
    reopens them, and a router Ray restarted opens its own while its old ones close with its process. One layer's
    outputs equal the object store's bit for bit. (The default path: test_engine.py runs the six architectures.)"""
    ref = oracle("gpt_oss")
    expected = [ref.greedy(p, TOKENS) for p in PROMPTS]
    with _tcp(checkpoints["gpt_oss"], routers=2, replicas=2, micro_batches=2) as engine:
        assert_logits_close(engine.score([PROMPTS[1]])[0], ref.logits(PROMPTS[1]))
        both = ray.get([engine.submit(p, SAMPLING, router=r) for r in (0, 1) for p in PROMPTS], timeout=300)
        assert [r.output_ids for r in both] == expected * 2, "both routers at once, each step in two micro-batches"
        stats = [ray.get(r.stats.remote()) for r in engine.routers]
        assert all(s["transport"] == "TcpTransport" and s["micro_batch_steps"] > 0 for s in stats)
        assert all(2 <= _opened(engine, r) <= 4 for r in (0, 1)), "per worker, one per micro-batch in flight"

        # A transport from this process beside the routers': one layer's outputs equal the object store's.
        tcp, store = TcpTransport(engine.workers), ObjectStoreTransport(engine.workers)
        try:
            calls = layer_calls(engine, engine.plan.epoch)
            sent, by_store = tcp.send(calls), store.send(calls)
            assert sent.lost == by_store.lost == frozenset() and sorted(sent.results) == [0, 1]
            for w in (0, 1):
                assert torch.equal(unpack(sent.results[w]), unpack(by_store.results[w]))
            with pytest.raises(WorkerFailed, match=r"worker 1: StaleEpoch: worker 1 holds plan epochs \[0\]"):
                tcp.send({1: layer_calls(engine, 99)[1]})
            again = tcp.send(calls)
            assert torch.equal(unpack(again.results[1]), unpack(by_store.results[1])) and tcp.compiles == 2
        finally:
            tcp.close()

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
