"""Live placement on a local Ray cluster with 4 expert workers: rebalancing under a skewed request mix lowers the
routers' measured imbalance, requests running through several plan switches finish exactly as a static run, the
controller's own triggers under a drifting load make the decisions the simulator replays from its trace, and an
engine restarted from an exported plan starts on it, with outputs equal to transformers'."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import ray
from ray._common.test_utils import wait_for_condition

from conftest import Oracle, _ray_start, held_bytes_per_expert
from moeray import Engine, EngineConfig, SamplingParams
from moeray.cli import main
from moeray.model.tiny import save_tiny_checkpoint
from moeray.placement.algorithms.policies import static_layout
from moeray.placement.config import ControllerConfig
from moeray.placement.initial import read_layout
from moeray.placement.traces import read_trace_windows

pytestmark = pytest.mark.ray

# A skewed mix: prompts that repeat a few token ids route most of their tokens to a few experts.
SKEWED = [[7] * 12, [7, 7, 7, 9] * 3, [9] * 10, [7] * 6 + [9] * 6, [7] * 20, [9, 7] * 7]
SAMPLING = SamplingParams(max_new_tokens=8, ignore_eos=True)


def measured_imbalance(worker_LW: np.ndarray) -> float:
    """Mean over MoE layers of max/mean worker tokens, from the routers' real counts."""
    return float((worker_LW.max(axis=1) / worker_LW.mean(axis=1)).mean())


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    # top-1 routing over 16 experts (Switch-style): a repeated token keeps hitting the same expert.
    path = save_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("skew") / "mixtral16", seed=0,
                                num_local_experts=16, num_experts_per_tok=1)
    with _ray_start():
        config = EngineConfig(model=str(path), workers=4, replicas=8, placement="round_robin",
                              controller=ControllerConfig(policy="replicated", poll_interval_s=0.2))
        with Engine(config) as engine:
            yield engine


def test_rebalancing_lowers_measured_imbalance(engine):
    static = engine.generate(SKEWED, SAMPLING)
    engine.take_load()  # the static run's load: drained so the next figures are the rebalanced run's alone
    static_again = engine.generate(SKEWED, SAMPLING)
    expert_LE, static_LW = engine.take_load()
    assert [r.output_ids for r in static_again] == [r.output_ids for r in static]
    record = engine.rebalance()
    assert record["applied"] and record["moved_slots"] > 0
    assert record["expected_imbalance_after"] < record["expected_imbalance_before"]
    rebalanced = engine.generate(SKEWED, SAMPLING)
    _, rebalanced_LW = engine.take_load()
    assert [r.output_ids for r in rebalanced] == [r.output_ids for r in static]
    before, after = measured_imbalance(static_LW), measured_imbalance(rebalanced_LW)
    print(f"measured imbalance: static round-robin {before:.3f}, rebalanced {after:.3f}, {before / after:.2f}x")
    assert before / after >= 2.0, (before, after)
    assert engine.plan.epoch == record["epoch"]
    info = engine.workers_info()
    assert all(w["epoch"] == record["epoch"] for w in info), "every worker committed the new epoch"
    assert sum(w["fetched_slots"] for w in info) > 0, "moved slots came from peers, not the checkpoint"
    assert [w["experts_per_layer"] for w in info] == [engine.plan.experts_of(w) for w in range(4)]


def test_requests_survive_several_rebalances(engine):
    prompts = [p[: 4 + i] for i, p in enumerate(SKEWED * 2)]
    sampling = SamplingParams(max_new_tokens=24, ignore_eos=True)
    expected = [r.output_ids for r in engine.generate(prompts, sampling)]
    refs = [engine.submit(p, sampling, router=i) for i, p in enumerate(prompts)]
    records, failures = [], []

    def switch_plans():
        # Alternate policies so that every switch really moves slots while the requests decode.
        for policy in ["round_robin", "replicated", "contiguous", "replicated"]:
            try:
                records.append(engine.rebalance(policy=policy))
            except Exception as e:  # surfaced below
                failures.append(e)

    switcher = threading.Thread(target=switch_plans)
    switcher.start()
    results = ray.get(refs, timeout=300)
    switcher.join(timeout=300)
    assert not failures, failures
    assert [r.output_ids for r in results] == expected, "outputs identical to a run that never rebalanced"
    assert all(r.finish_reason == "length" for r in results)
    applied = [r for r in records if r["applied"] and r["moved_slots"] > 0]
    assert len(applied) >= 3, records
    assert engine.plan.epoch == records[-1]["epoch"]
    # After the switches, only the last epoch's slots are resident.
    report = engine.memory_report()
    slots = engine.plan.num_layers * engine.plan.num_slots
    assert sum(report["worker_resident_bytes"]) == slots * held_bytes_per_expert(engine.spec.moe_layers[0])


# The hot set drifts: first the SKEWED mix (tokens 7 and 9), then prompts that hit other experts.
DRIFTED = [[3] * 12, [3, 3, 11] * 4, [11] * 10, [3] * 6 + [11] * 6, [3] * 20, [11, 3] * 7]
# The schedule makes sure the trace holds triggers whatever the plan the restart inherits already balances (the
# module engine's rebalance depends on how its earlier steps were batched); the threshold fires on top of it.
TRIGGERS = {"policy": "replicated", "poll_interval_s": 0.2, "window_steps": 4, "imbalance_threshold": 1.3,
            "consecutive_windows": 2, "cooldown_windows": 1, "min_gain": 0.05, "rebalance_every_windows": 3}


@pytest.fixture(scope="module")
def restarted(engine, tmp_path_factory):
    """An engine restarted from the plan the module's engine exported after a rebalance, its controller deciding
    with its own triggers (the settings `moeray serve --placement-config` reads) and writing a trace of them."""
    tmp = tmp_path_factory.mktemp("restart")
    engine.generate(SKEWED, SAMPLING)
    engine.rebalance()
    saved = engine.plan
    engine.save_plan(str(tmp / "plan.json"))
    (tmp / "placement.yaml").write_text(json.dumps(TRIGGERS))
    controller = ControllerConfig.from_file(str(tmp / "placement.yaml"), trace_path=str(tmp / "trace.jsonl"))
    config = EngineConfig(model=engine.config.model, workers=4, replicas=8, initial_plan=str(tmp / "plan.json"),
                          controller=controller)
    with Engine(config) as restarted:
        yield restarted, saved, tmp


def test_a_restart_from_the_exported_plan_starts_on_it(restarted):
    engine, saved, tmp = restarted
    static = static_layout("round_robin", num_layers=saved.num_layers, num_experts=16, num_workers=4, redundant=8)
    assert saved.epoch > 0 and not saved.same_holders(static), "a rebalanced plan, not the static default"
    assert read_layout(tmp / "plan.json").same_holders(saved)
    started = engine.plan
    assert started.epoch == 0 and started.same_holders(saved), "the same plan, with no rebalance needed"
    assert ray.get(engine.controller.history.remote()) == []
    assert [w["experts_per_layer"] for w in engine.workers_info()] == [started.experts_of(w) for w in range(4)]
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [30], [7] * 12]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=8))
    oracle = Oracle(engine.config.model)
    assert [r.output_ids for r in results] == [oracle.greedy(p, 8) for p in prompts]


def test_the_simulator_replays_the_live_controllers_decisions(restarted, capsys):
    engine, _, tmp = restarted
    trace = tmp / "trace.jsonl"
    for prompts in (SKEWED, SKEWED, DRIFTED, DRIFTED):
        engine.generate(prompts, SAMPLING)
    def settled() -> bool:
        """The controller has pulled every step record the routers closed, and every window closed from them is
        decided on and written (its loop does both, between polls)."""
        closed = sum(s["load_steps"] for s in ray.get([r.stats.remote() for r in engine.routers]))
        pulled = ray.get(engine.controller.describe.remote())["total_steps"]
        return pulled == closed and len(trace.read_text().splitlines()) == pulled // 4

    wait_for_condition(settled, timeout=60)
    history = ray.get(engine.controller.history.remote())
    decided = [(w.recorded["epoch"], w.recorded["trigger"], w.recorded["applied"]) for w in read_trace_windows(trace)]
    applied = [d for d in decided if d[2]]
    assert any(trigger for _, trigger, _ in decided), decided
    assert len(applied) == len(history) == engine.plan.epoch, decided
    assert all(r["reason"].startswith(("imbalance", "schedule")) for r in history)
    # The simulator, from the same plan file, with the same settings file and the controller's trace.
    assert main(["placement", "simulate", "--trace", str(trace), "--config", str(tmp / "placement.yaml"),
                 "--initial-plan", str(tmp / "plan.json"), "--redundant", "8", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    replayed = [(r["epoch"], r["trigger"], r["rebalanced"]) for r in lines if r["type"] == "window"]
    assert replayed == decided, "the same decisions at the same windows"
    assert lines[-1]["rebalances"] == len(history)
