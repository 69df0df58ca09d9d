"""The compiled-graph data path against transformers: same tokens, same logits, through a rebalance, a scale
2 -> 3 -> 2, a worker killed mid-generation, an idle teardown, and a router Ray restarted.

Ray's compiled-graph actors poll their channels: 2 workers per engine (3 while scaled), one thread each."""

from __future__ import annotations

import pytest
import ray
from ray._common.test_utils import wait_for_condition

from conftest import PROMPTS, _ray_start, assert_logits_close
from moeray import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.ray
SAMPLING = SamplingParams(max_new_tokens=16)
KILL_SAMPLING = SamplingParams(max_new_tokens=24)


@pytest.fixture(scope="module")
def cluster():
    with _ray_start():
        yield


def _compiled(path: str, **kwargs) -> Engine:
    return Engine(EngineConfig(model=path, workers=2, transport="compiled_graph", **kwargs))


def _stats(engine: Engine) -> dict:
    return ray.get(engine.routers[0].stats.remote())


def _builds(engine: Engine) -> int:
    """Graphs compiled, less those rebuilt after an idle teardown (slow steps on a loaded machine may see one)."""
    stats = _stats(engine)
    return stats["graph_compiles"] - stats["graph_idle_releases"]


def _outputs(engine: Engine, sampling: SamplingParams = SAMPLING) -> list[list[int]]:
    return [r.output_ids for r in engine.generate(PROMPTS, sampling)]


def test_config_names_a_bad_transport_and_the_router_count():
    with pytest.raises(ValueError, match=r"transport 'nccl' is not one of \('object_store', 'compiled_graph', "):
        EngineConfig(model="m", transport="nccl")
    with pytest.raises(ValueError, match=r"'compiled_graph' serves a single router.*routers=2"):
        EngineConfig(model="m", transport="compiled_graph", routers=2)
    assert EngineConfig(model="m").transport == "tcp"


@pytest.mark.parametrize("arch", ["qwen3_moe"])  # mixtral: the rebalance and restart tests below
def test_compiled_graph_matches_transformers(arch, cluster, checkpoints, oracle):
    ref = oracle(arch)
    expected = [ref.greedy(p) for p in PROMPTS]
    with _compiled(checkpoints[arch], replicas=2) as engine:
        for prompt in PROMPTS[:2]:
            assert_logits_close(engine.score([prompt])[0], ref.logits(prompt))
        assert _outputs(engine) == expected
        assert _stats(engine)["transport"] == "CompiledGraphTransport" and _builds(engine) == 1
        # Workers in the graph still answer their ordinary methods (the graph runs on Ray's system thread).
        assert [info["worker"] for info in engine.workers_info()] == [0, 1]


def test_rebalance_and_scale_keep_outputs_and_rebuild_only_on_membership(cluster, checkpoints, oracle):
    ref = oracle("mixtral")
    expected = [ref.greedy(p) for p in PROMPTS]
    with _compiled(checkpoints["mixtral"], replicas=2) as engine:
        assert _outputs(engine) == expected
        record = engine.rebalance(policy="round_robin")  # prepare and commit reach workers that are in the graph
        assert record["applied"]
        assert _outputs(engine) == expected
        assert _builds(engine) == 1, "a plan switch alone keeps the graph; the epoch is in the payload"
        for workers, builds in [(3, 2), (2, 3)]:
            assert engine.scale(workers)["applied"]
            assert len(engine.workers_info()) == workers
            assert _outputs(engine) == expected
            assert _builds(engine) == builds, "a new worker list recompiles"


def test_a_worker_dies_mid_generation_and_its_replicas_take_over(cluster, checkpoints, oracle):
    ref = oracle("mixtral")
    expected = [ref.greedy(p, 24) for p in PROMPTS] + [ref.greedy(PROMPTS[1], 24)]
    with _compiled(checkpoints["mixtral"], replicas=8) as engine:  # every expert on both workers
        assert all(sorted(ws) == [0, 1] for layer in engine.plan.replica_workers() for ws in layer)
        stream = engine.stream(PROMPTS[1], KILL_SAMPLING, request_id="watched")
        refs = [engine.submit(p, KILL_SAMPLING) for p in PROMPTS]
        watched = list(next(stream).token_ids)  # generation is under way
        ray.kill(engine.workers[1])
        watched += [t for chunk in stream for t in chunk.token_ids]
        assert [r.output_ids for r in ray.get(refs, timeout=300)] + [watched] == expected
        assert _builds(engine) >= 2, "recompiled over the live worker"
        wait_for_condition(lambda: engine.plan.experts_of(1) == [[]] * len(engine.spec.moe_layers), timeout=60)
        assert _outputs(engine, KILL_SAMPLING) == expected[:-1]


def test_an_idle_graph_is_torn_down_and_a_restarted_router_takes_the_workers_back(cluster, checkpoints, oracle):
    """An idle worker in a compiled graph keeps polling its channel (most of a core here): the router tears an idle
    graph down and compiles a new one when requests come back. A router Ray restarted first takes its workers back
    from the graph its previous incarnation left running."""
    ref = oracle("mixtral")
    expected = [ref.greedy(p) for p in PROMPTS]
    with _compiled(checkpoints["mixtral"]) as engine:
        assert _outputs(engine) == expected
        wait_for_condition(lambda: _stats(engine)["graph_idle_releases"] == 1, timeout=60)
        assert _outputs(engine) == expected
        assert _stats(engine)["graph_compiles"] == 2
        ray.kill(engine.routers[0], no_restart=False)  # its graph's loops stay on the workers

        def restarted() -> bool:  # a fresh incarnation (the old one may still answer right after the kill)
            try:
                return ray.get(engine.routers[0].stats.remote(), timeout=5)["steps"] == 0
            except ray.exceptions.RayError:
                return False

        wait_for_condition(restarted, timeout=120)
        assert _outputs(engine) == expected
        assert _builds(engine) == 1, "the new incarnation compiled its own graph"
