"""The collective data path (a torch.distributed group per router, gloo here) against transformers (same tokens, same
logits, on four architectures) and one layer's outputs against the object-store path's, bit for bit; through a
rebalance, a scale 2 -> 3 -> 2 and a router Ray restarted with two routers sharing the workers; and a worker killed
mid-generation.

Few actors: 2 workers per engine (3 while scaled); short generations, as each engine start costs the most here."""

from __future__ import annotations

import pytest
import ray
import torch
from ray._common.test_utils import wait_for_condition

from conftest import PROMPTS, _ray_start, assert_logits_close, layer_calls, router_outputs
from moeray import Engine, EngineConfig, SamplingParams
from moeray.transport import make_transport, unpack
from moeray.transport.collective import CollectiveTransport, WorkerFailed
from moeray.transport.object_store import ObjectStoreTransport

pytestmark = pytest.mark.ray
TOKENS = 6
SAMPLING = SamplingParams(max_new_tokens=TOKENS)
KILL_TOKENS = 24
KILL_SAMPLING = SamplingParams(max_new_tokens=KILL_TOKENS)


@pytest.fixture(scope="module")
def cluster():
    with _ray_start():
        yield


def _collective(path: str, **kwargs) -> Engine:
    return Engine(EngineConfig(model=path, workers=2, transport="collective", **kwargs))


def _stats(engine: Engine, router: int = 0) -> dict:
    return ray.get(engine.routers[router].stats.remote())


def _builds(engine: Engine, router: int = 0) -> int:
    """Groups this router built (reported as the compiled graph's counter; a group is never released for idling)."""
    return _stats(engine, router)["graph_compiles"]


def _groups(engine: Engine) -> list[list[str]]:
    """Per worker, the process groups it serves now."""
    return ray.get([w.collective_groups.remote() for w in engine.workers])


def _outputs(engine: Engine, sampling: SamplingParams = SAMPLING, router: int = 0) -> list[list[int]]:
    return router_outputs(engine, sampling, router)


def test_config_takes_collective_with_several_routers_and_names_what_it_cannot_do():
    assert EngineConfig(model="m", transport="collective", routers=2).transport == "collective"
    with pytest.raises(ValueError, match=r"backend 'local' calls its workers directly; transport 'collective'"):
        EngineConfig(model="m", transport="collective", backend="local")
    transport = make_transport("collective", ["w0", "w1"])  # builds nothing until the first send
    assert (transport.workers, transport.backend, transport.group) == (["w0", "w1"], "gloo", None)
    assert transport.release_if_idle() is False
    transport.close()


# NOTE: three architectures (plain, shared experts with MLA, biased gpt_oss experts): the wire is the same for all,
# and every Ray test of the default path runs the six (tests/integration/test_engine.py).
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_collective_matches_transformers(arch, cluster, checkpoints, oracle):
    ref = oracle(arch)
    expected = [ref.greedy(p, TOKENS) for p in PROMPTS]
    with _collective(checkpoints[arch]) as engine:
        assert_logits_close(engine.score([PROMPTS[1]])[0], ref.logits(PROMPTS[1]))
        assert _outputs(engine) == expected
        stats = _stats(engine)
        assert stats["transport"] == "CollectiveTransport" and _builds(engine) == 1
        groups = _groups(engine)
        assert len(groups[0]) == 1 and groups == [groups[0]] * 2, "both workers serve the router's one group"


def test_logits_and_layer_outputs_match_transformers_and_the_object_store_path(cluster, checkpoints, oracle):
    ref = oracle("qwen3_moe")
    expected_outputs = [ref.greedy(p, TOKENS) for p in PROMPTS]
    with _collective(checkpoints["qwen3_moe"], replicas=2) as engine:
        for prompt in PROMPTS[:2]:
            assert_logits_close(engine.score([prompt])[0], ref.logits(prompt))
        assert _outputs(engine) == expected_outputs
        # A second group on the same workers (this process as its router), beside the engine router's: one
        # layer's outputs equal the object store's bit for bit.
        collective, store = CollectiveTransport(engine.workers), ObjectStoreTransport(engine.workers)
        try:
            calls = layer_calls(engine, engine.plan.epoch)
            sent, expected = collective.send(calls), store.send(calls)
            assert sent.lost == expected.lost == frozenset() and sorted(sent.results) == [0, 1]
            for w in (0, 1):
                assert torch.equal(unpack(sent.results[w]), unpack(expected.results[w]))
            assert all(len(g) == 2 for g in _groups(engine)), "each worker serves both routers' groups"
            # A worker's error is raised, naming it; the group stays in step and is not rebuilt.
            with pytest.raises(WorkerFailed, match=r"worker 1: StaleEpoch: worker 1 holds plan epochs \[0\]"):
                collective.send({1: layer_calls(engine, 99)[1]})
            again = collective.send(calls)
            assert torch.equal(unpack(again.results[1]), unpack(expected.results[1])) and collective.compiles == 1
        finally:
            collective.close()
        wait_for_condition(lambda: all(len(g) == 1 for g in _groups(engine)), timeout=30)  # its threads exit
        assert _outputs(engine) == expected_outputs, "the router's own group is untouched"


def test_two_routers_through_rebalance_scale_and_a_restart(cluster, checkpoints, oracle):
    """Each worker serves one group per router; a plan switch keeps the groups, a new worker list rebuilds them,
    and a router Ray restarted builds its own while its old group's threads exit with their sockets."""
    ref = oracle("mixtral")
    expected = [ref.greedy(p, TOKENS) for p in PROMPTS]
    with _collective(checkpoints["mixtral"], routers=2, replicas=2) as engine:
        both = ray.get([engine.submit(p, SAMPLING, router=r) for r in (0, 1) for p in PROMPTS], timeout=300)
        assert [r.output_ids for r in both] == expected * 2, "both routers at once"
        groups = _groups(engine)
        assert all(len(g) == 2 for g in groups) and groups[0] == groups[1], "one group per router on each worker"
        record = engine.rebalance(policy="round_robin")  # prepare and commit reach workers serving groups
        assert record["applied"]
        assert _outputs(engine, router=0) == _outputs(engine, router=1) == expected
        assert [_builds(engine, r) for r in (0, 1)] == [1, 1], "a plan switch keeps the groups"
        for workers, builds in [(3, 2), (2, 3)]:
            assert engine.scale(workers)["applied"]
            assert len(engine.workers_info()) == workers
            assert _outputs(engine, router=0) == _outputs(engine, router=1) == expected
            assert [_builds(engine, r) for r in (0, 1)] == [builds] * 2, "a new worker list rebuilds"
            # The old groups' threads exit (STOP): each worker serves exactly the two current groups.
            wait_for_condition(lambda: all(len(g) == 2 for g in _groups(engine)), timeout=30)
        before = _groups(engine)[0]

        ray.kill(engine.routers[1], no_restart=False)

        def restarted() -> bool:  # a fresh incarnation (the old one may still answer right after the kill)
            try:
                return ray.get(engine.routers[1].stats.remote(), timeout=5)["steps"] == 0
            except ray.exceptions.RayError:
                return False

        wait_for_condition(restarted, timeout=120)
        assert _outputs(engine, router=1) == _outputs(engine, router=0) == expected
        assert [_builds(engine, r) for r in (0, 1)] == [3, 1], "the new incarnation built its own group"
        # The dead incarnation's group left the workers with its sockets; router 0's group stayed.
        wait_for_condition(lambda: all(len(g) == 2 for g in _groups(engine)), timeout=30)
        after = _groups(engine)
        assert after[0] == after[1] and len(set(after[0]) & set(before)) == 1


def test_a_worker_dies_mid_generation_and_its_replicas_take_over(cluster, checkpoints, oracle):
    ref = oracle("mixtral")
    expected = [ref.greedy(p, KILL_TOKENS) for p in PROMPTS] + [ref.greedy(PROMPTS[1], KILL_TOKENS)]
    with _collective(checkpoints["mixtral"], replicas=8) as engine:  # every expert on both workers
        assert all(sorted(ws) == [0, 1] for layer in engine.plan.replica_workers() for ws in layer)
        stream = engine.stream(PROMPTS[1], KILL_SAMPLING, request_id="watched")
        refs = [engine.submit(p, KILL_SAMPLING) for p in PROMPTS]
        watched = list(next(stream).token_ids)  # generation is under way
        ray.kill(engine.workers[1])
        watched += [t for chunk in stream for t in chunk.token_ids]
        assert [r.output_ids for r in ray.get(refs, timeout=300)] + [watched] == expected
        assert _builds(engine) >= 2, "rebuilt over the live worker"
        wait_for_condition(lambda: engine.plan.experts_of(1) == [[]] * len(engine.spec.moe_layers), timeout=60)
        assert _outputs(engine, KILL_SAMPLING) == expected[:-1]
