"""Micro-batch ping-pong: steps split in two micro-batches (forced, so that even these small batches split) give
transformers' greedy tokens and logits on every architecture (in process), and on a local Ray cluster with replicas,
after a rebalance, on the compiled graph, and while a worker is killed (its replicas take over, or the step waits
for a restore).

One Ray cluster for the module; 2 expert workers per engine (3 where one is killed)."""

from __future__ import annotations

import pytest
import ray
from ray._common.test_utils import wait_for_condition

from conftest import PROMPTS, _ray_start, assert_logits_close
from moeray import Engine, EngineConfig, SamplingParams
from moeray.model.tiny import ARCHITECTURES

pytestmark = pytest.mark.ray
SAMPLING = SamplingParams(max_new_tokens=16)
KILL_SAMPLING = SamplingParams(max_new_tokens=24)


@pytest.fixture(scope="module")
def cluster():
    with _ray_start():
        yield


def _stats(engine: Engine) -> dict:
    return ray.get(engine.routers[0].stats.remote())


def _outputs(engine: Engine, sampling: SamplingParams = SAMPLING) -> list[list[int]]:
    return [r.output_ids for r in engine.generate(PROMPTS, sampling)]


def test_config_and_flag_refuse_a_bad_count():
    import argparse

    from moeray.cli.common import micro_batches_arg

    with pytest.raises(ValueError, match=r"micro_batches must lie in \[1, 4\] \(or None: automatic\); got 0"):
        EngineConfig(model="m", micro_batches=0)
    assert EngineConfig(model="m").micro_batches is None
    assert micro_batches_arg("auto") is None and micro_batches_arg("2") == 2
    with pytest.raises(argparse.ArgumentTypeError, match=r"--micro-batches 9 must lie in \[1, 4\]"):
        micro_batches_arg("9")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_two_micro_batches_match_transformers(arch, checkpoints, oracle):
    """Every architecture, in process (the same router, scheduler, dispatcher and workers as on Ray, without the
    cluster's start-up per architecture); the Ray path is checked on one below and in the tests that follow."""
    ref = oracle(arch)
    config = EngineConfig(model=checkpoints[arch], workers=2, replicas=2, micro_batches=2, backend="local")
    with Engine(config) as engine:
        assert_logits_close(engine.score([PROMPTS[1]])[0], ref.logits(PROMPTS[1]))
        assert _outputs(engine) == [ref.greedy(p) for p in PROMPTS]
        stats = engine.router.stats()
        assert stats["micro_batch_steps"] > 0 and stats["micro_batches"] == 2
        assert 0 < stats["router_busy_s"] <= stats["forward_s"]
        # Every pair was counted once, into one record per step (micro-batches close none of their own).
        expert_LE, worker_LW = engine.take_load()
        assert (expert_LE.sum(axis=1) == worker_LW.sum(axis=1)).all()


def test_a_rebalance_between_steps_keeps_the_outputs(cluster, checkpoints, oracle):
    ref = oracle("mixtral")
    expected = [ref.greedy(p) for p in PROMPTS]
    with Engine(EngineConfig(model=checkpoints["mixtral"], workers=2, replicas=2, micro_batches=2)) as engine:
        assert _outputs(engine) == expected
        running = [engine.submit(p, SAMPLING) for p in PROMPTS]  # in flight across the switch
        assert engine.rebalance(policy="round_robin")["applied"]
        assert [r.output_ids for r in ray.get(running)] == expected
        assert _outputs(engine) == expected
        # The same server with overlap off (as `moeray bench serve` switches it) gives the same tokens.
        ray.get(engine.routers[0].set_micro_batches.remote(1))
        steps = _stats(engine)["micro_batch_steps"]
        assert _outputs(engine) == expected and _stats(engine)["micro_batch_steps"] == steps


def test_the_compiled_graph_takes_one_micro_batch_at_a_time(cluster, checkpoints, oracle):
    ref = oracle("qwen3_moe")
    config = EngineConfig(model=checkpoints["qwen3_moe"], workers=2, transport="compiled_graph", micro_batches=2)
    with Engine(config) as engine:
        assert _outputs(engine) == [ref.greedy(p) for p in PROMPTS]
        stats = _stats(engine)
        assert stats["micro_batch_steps"] > 0 and stats["graph_compiles"] >= 1


def _run_and_kill(engine: Engine, victim: int) -> list[list[int]]:
    """Start every prompt, kill ``victim`` once tokens flow, and return the outputs."""
    stream = engine.stream(PROMPTS[1], KILL_SAMPLING, request_id="watched")
    refs = [engine.submit(p, KILL_SAMPLING) for p in PROMPTS]
    watched = list(next(stream).token_ids)  # generation is under way
    ray.kill(engine.workers[victim])
    watched += [t for chunk in stream for t in chunk.token_ids]
    return [r.output_ids for r in ray.get(refs, timeout=300)] + [watched]


def test_a_worker_killed_mid_step_its_replicas_take_over(cluster, checkpoints, oracle):
    ref = oracle("mixtral")
    expected = [ref.greedy(p, 24) for p in PROMPTS] + [ref.greedy(PROMPTS[1], 24)]
    config = EngineConfig(model=checkpoints["mixtral"], workers=3, replicas=8, micro_batches=2)  # every expert twice
    with Engine(config) as engine:
        assert _run_and_kill(engine, victim=1) == expected
        assert _stats(engine)["micro_batch_steps"] > 0
        history = ray.get(engine.controller.history.remote())
        assert next(h for h in history if h["reason"].startswith("failure"))["dead_workers"] == [1]


def test_a_worker_killed_with_the_only_copy_the_micro_batches_wait_for_the_restore(cluster, checkpoints, oracle):
    ref = oracle("qwen3_moe")
    expected = [ref.greedy(p, 24) for p in PROMPTS] + [ref.greedy(PROMPTS[1], 24)]
    # No replicas; a memory budget that lets one worker hold every expert once the other is gone.
    config = EngineConfig(model=checkpoints["qwen3_moe"], workers=2, worker_memory="1MB", micro_batches=2)
    with Engine(config) as engine:
        assert _run_and_kill(engine, victim=0) == expected
        wait_for_condition(lambda: any(h["reason"].startswith("failure")
                                       for h in ray.get(engine.controller.history.remote())), timeout=120)
        assert _outputs(engine, KILL_SAMPLING) == expected[:-1]
