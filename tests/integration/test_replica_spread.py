"""Replicas share a hot expert's tokens as the plan expects: a checkpoint whose gate makes expert 0 nearly every
token's first choice, a plan that gives it a copy on every worker, greedy generation on the in-process engine and
the Ray engine. Each worker's realized tokens (the routers' load counters) match what the load model expected of the
plan (moeray/placement/algorithms/load.py), and outputs equal transformers. The rule itself: tests/unit/test_routing.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import PROMPTS, Oracle
from moeray import EngineConfig, LocalEngine, SamplingParams
from moeray.model.tiny import save_tiny_checkpoint
from moeray.placement.algorithms.load import worker_load_LW
from moeray.placement.algorithms.plan import Layout
from moeray.placement.initial import write_plan

WORKERS, EXPERTS, LAYERS, HOT = 2, 8, 2, 0
GREEDY = SamplingParams(max_new_tokens=24)


def replicated_layout() -> Layout:
    """Expert HOT on every worker, the other experts dealt round the workers; every worker holds as many slots."""
    others = [e for e in range(EXPERTS) if e != HOT]
    extra = -len(others) % WORKERS  # pad with second copies of the first experts, so the slot counts are equal
    phy2log = [HOT] * WORKERS + others + others[:extra]
    slot_worker = list(range(WORKERS)) + [i % WORKERS for i in range(len(others) + extra)]
    return Layout(num_workers=WORKERS, num_experts=EXPERTS, phy2log_LP=torch.tensor([phy2log] * LAYERS),
                  slot_worker_LP=torch.tensor([slot_worker] * LAYERS))


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """(checkpoint, plan file, its layout, transformers' greedy outputs for PROMPTS)."""
    root = tmp_path_factory.mktemp("skewed")
    path = str(save_tiny_checkpoint("gpt_oss", root / "ckpt", seed=5, hot_expert=HOT))
    layout = replicated_layout()
    write_plan(root / "plan.json", layout)
    ref = Oracle(path)
    return path, str(root / "plan.json"), layout, [ref.greedy(p, GREEDY.max_new_tokens) for p in PROMPTS]


def config(skewed, **kwargs) -> EngineConfig:
    path, plan, layout, _ = skewed
    return EngineConfig(model=path, workers=WORKERS, replicas=layout.num_slots - EXPERTS, initial_plan=plan,
                        **kwargs)


def check_spread(engine, skewed) -> None:
    _, _, layout, expected_ids = skewed
    results = engine.generate(PROMPTS, GREEDY)
    assert [r.output_ids for r in results] == expected_ids
    expert_LE, worker_LW = engine.take_load()
    pairs_L = expert_LE.sum(axis=1)
    assert (expert_LE[:, HOT] >= 0.9 * pairs_L / 2).all(), f"expert {HOT} is not hot: {expert_LE}"
    expected_LW = worker_load_LW(torch.tensor(expert_LE), layout).numpy()
    assert np.allclose(worker_LW.sum(axis=1), expected_LW.sum(axis=1))
    gap_LW = np.abs(worker_LW - expected_LW) / expected_LW
    assert (gap_LW <= 0.05).all(), f"realized {worker_LW.tolist()} vs expected {expected_LW.tolist()}"
    # the rule's own bound: an expert's run of calls splits within one pair, so a worker is off by less than one
    # pair per replicated slot it holds
    replicated_W = np.array([sum(1 for p in range(layout.num_slots) if layout.slot_worker_LP[0, p] == w
                                 and int(layout.replica_count_LE[0, layout.phy2log_LP[0, p]]) > 1)
                             for w in range(WORKERS)])
    assert (np.abs(worker_LW - expected_LW) < np.maximum(replicated_W, 1)).all(), (worker_LW, expected_LW)


def test_in_process_replicas_share_the_hot_expert(skewed):
    with LocalEngine(config(skewed, backend="local")) as engine:
        check_spread(engine, skewed)


@pytest.mark.ray
def test_ray_engine_replicas_share_the_hot_expert(skewed, ray_local):
    from moeray import Engine

    with Engine(config(skewed)) as engine:
        check_spread(engine, skewed)


def test_bench_spread_realizes_the_replicated_plan(capsys):
    """`moeray bench spread`: after a rebalance with the replicated policy, the workers realize what it predicted."""
    from moeray.bench.spread import run_spread_bench

    rows = run_spread_bench(requests=6, max_new_tokens=12, rules=("even",))["even"]["rows"]
    assert "| mean |" in capsys.readouterr().out
    assert all(r["hot_replicas"] > 1 and r["hot_share"] > 0.2 for r in rows), rows
    assert all(r["gap"] <= 0.05 for r in rows), rows


def test_the_load_aware_rule_balances_steps_and_keeps_outputs(skewed):
    """replica_rule least_loaded: the hot expert's pairs move toward the worker its other experts load less, so the
    workers' realized imbalance drops below the even rule's on the same requests; outputs still equal transformers."""
    from moeray.placement.algorithms.load import imbalance_L
    from moeray.placement.config import ControllerConfig

    _, _, _, expected_ids = skewed
    realized = {}
    for rule in ("even", "least_loaded"):
        with LocalEngine(config(skewed, backend="local", controller=ControllerConfig(replica_rule=rule))) as engine:
            assert [r.output_ids for r in engine.generate(PROMPTS, GREEDY)] == expected_ids
            realized[rule] = float(imbalance_L(torch.tensor(engine.take_load()[1])).mean())
    assert realized["least_loaded"] < realized["even"], realized
    with pytest.raises(ValueError, match="replica_rule 'busiest' is not one of"):
        ControllerConfig(replica_rule="busiest")
