"""Expert workers die mid-generation: requests finish with the outputs of a run where nothing died.

With replicas, a dead worker's tokens go to the other copies within the same step; with none, the step waits for
the controller to re-place the lost experts (weights re-read from the checkpoint) and runs again. Either way the
controller then starts a replacement worker (tests/integration/test_self_healing.py: when the live workers cannot
hold every expert, and when no replacement can be placed)."""

from __future__ import annotations

import pytest
import ray
from ray._common.test_utils import wait_for_condition

from conftest import PROMPTS, _ray_start
from moeray import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.ray
SAMPLING = SamplingParams(max_new_tokens=24)  # stops at EOS, as the oracle does


@pytest.fixture(scope="module")
def cluster():
    with _ray_start():
        yield


def _run_and_kill(engine: Engine, victim: int) -> list[list[int]]:
    """Start every prompt, kill ``victim`` once tokens flow, and return the outputs."""
    stream = engine.stream(PROMPTS[1], SAMPLING, request_id="watched")
    refs = [engine.submit(p, SAMPLING) for p in PROMPTS]
    watched = list(next(stream).token_ids)  # generation is under way
    ray.kill(engine.workers[victim])
    watched += [t for chunk in stream for t in chunk.token_ids]
    return [r.output_ids for r in ray.get(refs, timeout=300)] + [watched]


def test_a_worker_dies_and_its_replicas_take_over(cluster, checkpoints, oracle):
    ref = oracle("mixtral")
    expected = [ref.greedy(p, 24) for p in PROMPTS] + [ref.greedy(PROMPTS[1], 24)]
    config = EngineConfig(model=checkpoints["mixtral"], workers=3, replicas=8)  # every expert twice
    with Engine(config) as engine:
        assert _run_and_kill(engine, victim=1) == expected
        # The controller restores redundancy over the two live workers at once, then starts a replacement.
        wait_for_condition(lambda: _healed(engine, 3), timeout=120)
        history = ray.get(engine.controller.history.remote())
        restore = next(h for h in history if h["reason"].startswith("failure"))
        assert restore["dead_workers"] == [1] and restore["read_slots"] == 0, "every slot came from a survivor"
        assert restore["redundant"] == 4, "2 live workers x 6 slots: 8 experts + 4 copies"
        assert history[-1]["reason"] == "replace: workers [1] lost" and engine.plan.num_slots == 8 + 8
        again = engine.generate(PROMPTS, SAMPLING)
        assert [r.output_ids for r in again] == expected[:-1]


def test_a_worker_dies_with_the_only_copy_and_the_step_waits_for_restore(cluster, checkpoints, oracle):
    ref = oracle("qwen3_moe")
    expected = [ref.greedy(p, 24) for p in PROMPTS] + [ref.greedy(PROMPTS[1], 24)]
    # No replicas; a memory budget that lets one worker hold every expert once the other is gone. On the object-store
    # path (the other tests here run the default, tcp): a death is found by a call's RayActorError there.
    config = EngineConfig(model=checkpoints["qwen3_moe"], workers=2, worker_memory="1MB", transport="object_store")
    with Engine(config) as engine:
        assert _run_and_kill(engine, victim=0) == expected
        wait_for_condition(lambda: _healed(engine, 2), timeout=120)
        history = ray.get(engine.controller.history.remote())
        restore = next(h for h in history if h["reason"].startswith("failure"))
        assert restore["dead_workers"] == [0] and restore["read_slots"] > 0, "lost experts re-read"
        assert history[-1]["reason"] == "replace: workers [0] lost", "then a replacement joined"


def test_a_router_dies_its_streams_go_on_elsewhere_and_it_comes_back_on_the_current_plan(cluster, checkpoints,
                                                                                            oracle):
    """Engine.stream: the stream on the killed router continues at the other from the tokens it had, with no token
    repeated or missing, and ends as the undisturbed run does; the restarted router takes the plan in force."""
    ref = oracle("mixtral")
    with Engine(EngineConfig(model=checkpoints["mixtral"], workers=2, routers=2, replicas=2)) as engine:
        record = engine.rebalance(policy="round_robin")  # the plan in force is no longer the routers' first one
        assert record["applied"]
        sampling = SamplingParams(max_new_tokens=64, ignore_eos=True)
        undisturbed = [t for c in engine.stream(PROMPTS[1], sampling, router=1) for t in c.token_ids]
        doomed = engine.stream(PROMPTS[1], sampling, router=0)
        survivor = engine.submit(PROMPTS[3], SamplingParams(max_new_tokens=16), router=1)
        first = next(doomed)
        ray.kill(engine.routers[0], no_restart=False)
        rest = list(doomed)
        assert list(first.token_ids) + [t for c in rest for t in c.token_ids] == undisturbed
        assert rest[-1].finish_reason == "length"
        assert ray.get(survivor, timeout=120).output_ids == ref.greedy(PROMPTS[3]), "the other router carried on"
        wait_for_condition(lambda: _answers(engine.routers[0]), timeout=120)
        assert ray.get(engine.routers[0].epoch.remote()) == record["epoch"], "restarted on the plan in force"
        again = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=16))  # prompt 0 goes to router 0
        assert again[0].output_ids == ref.greedy(PROMPTS[0])


def test_a_router_dies_under_load_and_the_ingress_loses_no_request(cluster, checkpoints, caplog):
    """Through the ingress's handle (what Serve's replica runs; tests/serving/test_grpc.py through a real server):
    greedy and seeded streams spread over both routers; one router is killed once every stream has tokens. Every
    stream ends as its undisturbed run does, with no token repeated or missing."""
    import asyncio

    from moeray.serving.engine_handle import EngineHandle

    samplings = [SamplingParams(max_new_tokens=40, ignore_eos=True),
                 SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=1.0, top_p=0.9, seed=7,
                                frequency_penalty=0.4)]
    jobs = [(p, samplings[i % 2]) for i, p in enumerate(PROMPTS * 2)]
    with Engine(EngineConfig(model=checkpoints["mixtral"], workers=2, routers=2)) as engine:
        handle = EngineHandle.of(engine)

        async def run(kill: bool) -> list[list[int]]:
            started = [asyncio.Event() for _ in jobs]

            async def one(i: int, prompt, sampling) -> list[int]:
                tokens = []
                async for chunk in handle.stream(list(prompt), sampling, f"r{kill}-{i}"):
                    tokens += chunk.token_ids
                    started[i].set()
                return tokens

            tasks = [asyncio.create_task(one(i, p, s)) for i, (p, s) in enumerate(jobs)]
            if kill:
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
                ray.kill(engine.routers[0], no_restart=False)
            return await asyncio.wait_for(asyncio.gather(*tasks), 300)

        undisturbed = asyncio.run(run(kill=False))
        with caplog.at_level("WARNING", logger="moeray.serving.engine_handle"):
            assert asyncio.run(run(kill=True)) == undisturbed
        assert all(len(t) == 40 for t in undisturbed)
        moved = [r for r in caplog.records if "goes on at another router" in r.getMessage()]
        assert moved and all("router 0 died" in r.getMessage() for r in moved), "requests did move"


def _healed(engine: Engine, workers: int) -> bool:
    health = ray.get(engine.controller.health.remote())
    return health["serving"] and health["live_workers"] == workers and health["state"] == "idle" and \
        not health["dead_workers"]


def _answers(actor) -> bool:
    try:
        return ray.get(actor.ping.remote(), timeout=5)
    except ray.exceptions.RayError:
        return False


def test_the_controller_dies_requests_never_notice_and_it_rebuilds_the_plan(cluster, checkpoints, oracle):
    ref = oracle("mixtral")
    expected = [ref.greedy(p, 24) for p in PROMPTS]
    with Engine(EngineConfig(model=checkpoints["mixtral"], workers=2, replicas=2)) as engine:
        record = engine.rebalance(policy="round_robin")
        layout = [engine.plan.holders(l) for l in range(engine.plan.num_layers)]
        refs = [engine.submit(p, SAMPLING) for p in PROMPTS]
        ray.kill(engine.controller, no_restart=False)
        assert [r.output_ids for r in ray.get(refs, timeout=120)] == expected, "the hot path never waits on it"
        wait_for_condition(lambda: _answers(engine.controller), timeout=120)
        plan = engine.plan
        assert plan.epoch > record["epoch"], "a fresh epoch"
        assert [plan.holders(l) for l in range(plan.num_layers)] == layout, "rebuilt from what the workers hold"
        assert ray.get([r.epoch.remote() for r in engine.routers]) == [plan.epoch], "routers moved with it"
        assert engine.rebalance(policy="contiguous")["applied"], "and it places experts again"
        assert [r.output_ids for r in engine.generate(PROMPTS, SAMPLING)] == expected
