"""The offline placement simulator: trace format, synthetic traces, replay, CLI, plots (no Ray)."""

import json
import sys
import types

import numpy as np
import pytest
import sim_fake_policies
import torch

from moeray.cli import main
from moeray.placement.algorithms.topology import Budget, Topology
from moeray.placement.offline.cli import policy_params
from moeray.placement.offline.simulator import optimal_bounds, simulate
from moeray.placement.traces import TraceError, read_trace, synthesize, top_share, write_trace

# Window 0 sends all tokens to experts 0 and 2, which round_robin puts on worker 0; contiguous splits them.
GOLDEN = [torch.tensor([[10, 0, 10, 0]]), torch.tensor([[10, 0, 10, 0]])]
TWO_WORKERS = Topology.uniform(num_workers=2, slots_per_worker=2)


def _synth(kind="zipf", seed=0, **kw):
    args = dict(num_layers=3, num_experts=16, num_windows=5, tokens=1000, top_k=2, seed=seed)
    return synthesize(kind, **{**args, **kw})


# --- trace format -------------------------------------------------------------------------------------------------

def test_trace_round_trip(tmp_path):
    windows = _synth("bursty", num_windows=4)
    path = tmp_path / "t.jsonl"
    assert write_trace(path, windows) == 4
    back = read_trace(path)
    assert len(back) == 4 and all(torch.equal(a, b) for a, b in zip(windows, back))
    first = json.loads(path.read_text().splitlines()[0])
    assert first["window"] == 0 and len(first["load"]) == 3 and len(first["load"][0]) == 16


@pytest.mark.parametrize("bad_line, match", [
    ('{"window": 1, "load": [[1, -2]]}', r"line 3: .*layer 0, expert 1: token count -2 is negative"),
    ('{"window": 1, "load": [[1, 2.5]]}', r"line 3: .*token count 2.5 is not an integer"),
    ('{"window": 1, "load": [[1, true]]}', r"line 3: .*token count True is not an integer"),
    ('{"window": 1, "load": [[1, 2, 3]]}', r"line 3: 1 layers x 3 experts, but earlier lines have 1 layers x 2"),
    ('{"window": 1, "load": [[1, 2], [3, 4]]}', r"line 3: 2 layers x 2 experts, but earlier lines have 1 layers"),
    ('{"window": 1, "load": [[1, 2], [3]]}', r"line 3: layer 1 has 1 experts but layer 0 has 2"),
    ('{"window": 1, "load": [[1, 2]', r"line 3: not valid JSON"),
    ('{"window": 1}', r"line 3: expected an object with a 'load' key"),
    ('{"window": "one", "load": [[1, 2]]}', r"line 3: 'window' 'one' is not an integer"),
])
def test_trace_validation_names_the_line(tmp_path, bad_line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"window": 0, "load": [[1, 2]]}\n\n' + bad_line + "\n")  # a blank line 2 still counts
    with pytest.raises(TraceError, match=match):
        read_trace(path)


def test_empty_trace_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(TraceError, match="no window"):
        read_trace(tmp_path / "e.jsonl")


# --- synthetic traces ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["zipf", "drifting", "bursty"])
def test_synth_is_deterministic_per_seed(kind):
    a, b, c = _synth(kind, seed=7), _synth(kind, seed=7), _synth(kind, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert len(a) == 5 and all(w.shape == (3, 16) and w.dtype == torch.long for w in a)
    assert all((w.sum(dim=1) == 1000 * 2).all() for w in a), "tokens x top_k pairs per layer"


@pytest.mark.parametrize("s", [0.0, 1.0, 1.5])
def test_zipf_top_expert_share(s):
    law = np.arange(1, 65, dtype=np.float64) ** -s
    expected = law[0] / law.sum()  # 1/64, 0.211, 0.423
    windows = _synth(num_layers=8, num_experts=64, num_windows=3, tokens=20000, top_k=4, s=s)
    assert top_share(torch.stack(windows).sum(0)) == pytest.approx(expected, rel=0.05)
    # Ranks are permuted per layer: the hottest expert differs between layers.
    assert s == 0.0 or len(set(windows[0].argmax(dim=1).tolist())) > 1


def test_drifting_moves_the_hot_set_and_zipf_does_not():
    def hot_sets(windows):
        return [frozenset(torch.topk(w[0].double(), 4).indices.tolist()) for w in windows]

    kw = dict(num_layers=1, num_experts=32, num_windows=9, tokens=50000, top_k=2, s=1.2)
    assert len(set(hot_sets(_synth("zipf", **kw)))) == 1
    drifting = hot_sets(_synth("drifting", drift_every=4, drift_experts=2, **kw))
    assert drifting[0] == drifting[3] and drifting[3] != drifting[4] and drifting[4] != drifting[8]


def test_bursty_multiplies_a_random_expert_set():
    kw = dict(num_layers=2, num_experts=32, num_windows=6, tokens=20000, top_k=2, s=0.0, burst_experts=3)
    calm = _synth("bursty", burst_prob=0.0, **kw)
    storm = _synth("bursty", burst_prob=1.0, burst_len=1, burst_factor=20.0, **kw)  # one burst a window
    assert max(top_share(w) for w in calm) < 2.0 / 32
    assert all(top_share(w) > 5.0 / 32 for w in storm)


def test_synth_rejects_bad_arguments():
    with pytest.raises(ValueError, match="trace kind 'pareto'"):
        _synth("pareto")
    with pytest.raises(ValueError, match="top_k 20 exceeds the 16 experts"):
        _synth(top_k=20)


# --- replay -------------------------------------------------------------------------------------------------------

def test_simulate_golden():
    result = simulate(GOLDEN, "contiguous", TWO_WORKERS, Budget(expert_bytes=100))
    first, second = result.records
    assert torch.equal(first.worker_load_LW, torch.tensor([[20.0, 0.0]], dtype=torch.float64))
    assert first.imbalance_L.tolist() == [2.0] and first.epoch == 0
    assert first.rebalanced and first.moved_slots == 2  # experts 1 and 2 change worker
    assert second.imbalance_L.tolist() == [1.0] and second.epoch == 1 and not second.rebalanced
    summary = result.summary()
    assert summary["policy"] == "contiguous"
    assert (summary["mean_imbalance"], summary["p50_imbalance"], summary["max_imbalance"]) == (1.5, 1.5, 2.0)
    assert (summary["moved_slots"], summary["rebalances"], summary["moved_bytes"]) == (2, 1, 200)


def test_plans_are_judged_on_load_they_have_not_seen():
    # The hot expert alternates; a policy that balances the last window perfectly is always one window behind.
    # Placed on its own window, [90 | 10 10 10] would be 90/60; judged on the next one it is 110/60.
    windows = [torch.tensor([[90, 10, 10, 10]]), torch.tensor([[10, 90, 10, 10]])] * 2
    topology = Topology.uniform(num_workers=2, slots_per_worker=3)
    result = simulate(windows, sim_fake_policies.lpt, topology, Budget())
    assert [r.imbalance_L.item() for r in result.records] == pytest.approx([100 / 60] + [110 / 60] * 3)


def test_rebalance_every_and_decay_set_what_the_policy_sees():
    windows = [torch.full((1, 4), float(t + 1)).long() for t in range(5)]  # window t: every expert t + 1 tokens
    sim_fake_policies.SEEN.clear()
    result = simulate(windows, "sim_fake_policies:recording", TWO_WORKERS, Budget(), rebalance_every=2)
    assert [r.window for r in result.records if r.rebalanced] == [1, 3]  # none after the last window
    assert [int(x[0, 0]) for x in sim_fake_policies.SEEN] == [1 + 2, 3 + 4]
    sim_fake_policies.SEEN.clear()
    simulate(windows, "sim_fake_policies:recording", TWO_WORKERS, Budget(), decay=0.5)
    assert [float(x[0, 0]) for x in sim_fake_policies.SEEN] == [1.0, 2.5, 4.25, 6.125]


def test_warmup_builds_the_first_plan_from_unjudged_windows():
    result = simulate(GOLDEN, "contiguous", TWO_WORKERS, Budget(), warmup=1)
    assert [r.window for r in result.records] == [1]
    assert result.summary()["mean_imbalance"] == 1.0 and result.summary()["moved_slots"] == 0


def test_simulate_rejects_a_plan_over_capacity():
    with pytest.raises(ValueError, match="policy 'crowded' put 4 slots of layer 0 on worker 0, which holds 2"):
        simulate(GOLDEN, sim_fake_policies.crowded, TWO_WORKERS, Budget())


def test_bounds_from_optimal(monkeypatch):
    fake = types.ModuleType("moeray.placement.algorithms.optimal")
    fake.optimal_bound = lambda load_E, topology, budget, time_limit_s: (None, float(load_E.max()), True)
    monkeypatch.setitem(sys.modules, "moeray.placement.algorithms.optimal", fake)
    bounds = optimal_bounds(GOLDEN, TWO_WORKERS, Budget())
    assert bounds.cells == ((0, 0), (1, 0)) and bounds.ratio == (1.0, 1.0) and bounds.layers_solved() == 1
    summary = simulate(GOLDEN, "contiguous", TWO_WORKERS, Budget(), bounds=bounds).summary()
    assert (summary["bound_imbalance"], summary["vs_bound"], summary["bound_cells"]) == (1.0, 1.5, 2)


# --- command line -------------------------------------------------------------------------------------------------

def _trace(tmp_path, windows=GOLDEN):
    path = tmp_path / "trace.jsonl"
    write_trace(path, windows)
    return str(path)


def test_cli_json_last_line_is_the_summary(tmp_path, capsys):
    rc = main(["placement", "simulate", "--trace", _trace(tmp_path), "--policy", "contiguous", "--workers", "2",
               "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    last = json.loads(out[-1])
    assert {"policy", "mean_imbalance", "max_imbalance", "moved_slots"} <= last.keys()
    assert (last["policy"], last["mean_imbalance"], last["max_imbalance"], last["moved_slots"]) == \
        ("contiguous", 1.5, 2.0, 2)
    assert [json.loads(line)["type"] for line in out] == ["window", "window", "summary"]


def test_cli_synth_then_simulate_several_policies_with_plots(tmp_path, capsys):
    trace = tmp_path / "zipf.jsonl"
    assert main(["placement", "synth", "--kind", "zipf", "--experts", "16", "--layers", "4", "--windows", "3",
                 "--tokens", "500", "--top-k", "2", "--seed", "3", "--out", str(trace)]) == 0
    assert len(read_trace(trace)) == 3
    capsys.readouterr()
    rc = main(["placement", "simulate", "--trace", str(trace), "--policy", "round_robin,sim_fake_policies:lpt",
               "--workers", "4", "--nodes", "2", "--redundant", "0", "--plot", str(tmp_path / "png"), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    summaries = [json.loads(line) for line in out[-2:]]
    assert [s["policy"] for s in summaries] == ["round_robin", "sim_fake_policies:lpt"]
    assert summaries[0]["moved_slots"] == 0 and summaries[1]["mean_imbalance"] < summaries[0]["mean_imbalance"]
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == ["heatmap_round_robin.png", "heatmap_sim_fake_policies_lpt.png", "imbalance.png"]
    for p in (tmp_path / "png").iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000


def test_cli_policy_params_and_config(tmp_path, capsys):
    config = tmp_path / "policies.yaml"
    config.write_text("policies:\n  sim_fake_policies:lpt: {lazy: true}\n")
    argv = ["placement", "simulate", "--trace", _trace(tmp_path), "--policy", "sim_fake_policies:lpt",
            "--workers", "2", "--json"]

    def imbalances():
        return [json.loads(line)["mean_imbalance"] for line in capsys.readouterr().out.splitlines()[:2]]

    assert main(argv + ["--config", str(config)]) == 0
    assert imbalances() == [2.0, 2.0], "lazy: the round-robin layout stays"
    assert main(argv + ["--config", str(config), "--policy-params", '{"lazy": false}']) == 0
    assert imbalances() == [2.0, 1.0]


def test_policy_params_global_or_per_policy():
    assert policy_params(["a", "b"], '{"x": 1}', None) == {"a": {"x": 1}, "b": {"x": 1}}
    assert policy_params(["a", "b"], '{"a": {"x": 1}}', None) == {"a": {"x": 1}, "b": {}}
    with pytest.raises(ValueError, match="must be a JSON object"):
        policy_params(["a"], "[1]", None)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"load": [[1, 2]]}\n{"load": [[1, -1]]}\n')
    assert main(["placement", "simulate", "--trace", str(bad), "--policy", "round_robin", "--workers", "2"]) == 2
    assert "bad.jsonl, line 2: layer 0, expert 1: token count -1 is negative" in capsys.readouterr().err
    assert main(["placement", "simulate", "--trace", _trace(tmp_path), "--policy", "no_such_policy",
                 "--workers", "2"]) == 2
    assert "placement policy 'no_such_policy'" in capsys.readouterr().err
    assert main(["placement", "simulate", "--trace", _trace(tmp_path), "--policy", "round_robin",
                 "--workers", "2", "--slots-per-worker", "1"]) == 2
    assert "exceed the capacity of 2 workers x 1 slots" in capsys.readouterr().err


def test_bench_targets_verdicts():
    from moeray.bench.placement import _targets

    def row(mean, moved=100.0, vs_bound=None):
        return {"mean_imbalance": mean, "moved_slots_per_rebalance": moved, "vs_bound": vs_bound,
                "in_sample_vs_bound": vs_bound, "bound_cells": 3}

    summaries = {"zipf s=1.0": {"replicated": row(1.03, vs_bound=1.01), "replicated_hierarchical": row(1.05)},
                 "zipf s=1.5": {"replicated": row(1.05, vs_bound=1.03)},
                 "drifting s=1.0": {"replicated": row(1.20, moved=1000.0),
                                    "migration_aware": row(1.25, moved=200.0)}}
    verdicts = dict(_targets(summaries))
    assert verdicts["replicated on zipf s=1.0: mean imbalance 1.030 <= 1.04"] is True
    assert verdicts["replicated_hierarchical on zipf s=1.0: mean imbalance 1.050 <= 1.04"] is False
    assert verdicts["replicated_hierarchical on zipf s=1.5: mean imbalance — <= 1.22"] is None
    assert verdicts["replicated on zipf s=1.5: replay imbalance / optimal bound 1.0300 <= 1.02 (on 3 solved layers)"] \
        is False
    assert verdicts["migration_aware on drifting: moved slots 20.0% of replicated's (<= 25%)"] is True
    assert verdicts["migration_aware on drifting: mean imbalance 1.0417x replicated's (<= 1.05)"] is True


def test_bounds_on_warmup_windows_are_left_out(monkeypatch):
    fake = types.ModuleType("moeray.placement.algorithms.optimal")
    fake.optimal_bound = lambda load_E, topology, budget, time_limit_s: (None, float(load_E.max()), False)
    monkeypatch.setitem(sys.modules, "moeray.placement.algorithms.optimal", fake)
    bounds = optimal_bounds(GOLDEN, TWO_WORKERS, Budget())
    summary = simulate(GOLDEN, "contiguous", TWO_WORKERS, Budget(), warmup=1, bounds=bounds).summary()
    assert (summary["bound_cells"], summary["bound_proven"], summary["vs_bound"]) == (1, 0, 1.0)


def test_cli_replays_controller_settings_from_an_initial_plan(tmp_path, capsys):
    from moeray.placement.algorithms.policies import static_layout
    from moeray.placement.initial import write_plan

    config = tmp_path / "placement.yaml"
    config.write_text("policy: sim_fake_policies:lpt\nmin_gain: 0.05\n")  # what `moeray serve --placement-config` reads
    argv = ["placement", "simulate", "--trace", _trace(tmp_path), "--config", str(config), "--rebalance-every", "1",
            "--json"]

    def windows():
        return [(r["epoch"], r["trigger"], r["rebalanced"], r["mean_imbalance"])
                for r in map(json.loads, capsys.readouterr().out.splitlines()) if r["type"] == "window"]

    assert main(argv + ["--workers", "2"]) == 0  # from round_robin: experts 0 and 2 share worker 0
    assert windows() == [(0, "schedule", True, 2.0), (1, "schedule", False, 1.0)], "the second moves nothing"
    write_plan(tmp_path / "plan.json", static_layout("contiguous", num_layers=1, num_experts=4, num_workers=2))
    assert main(argv + ["--initial-plan", str(tmp_path / "plan.json")]) == 0  # its 2 workers
    assert windows() == [(0, "schedule", False, 1.0)] * 2, "already balanced: no rebalance pays"
    write_plan(tmp_path / "plan.json", static_layout("contiguous", num_layers=1, num_experts=4, num_workers=4))
    assert main(argv + ["--initial-plan", str(tmp_path / "plan.json"), "--workers", "2"]) == 2
    assert "the initial plan is for 4 expert workers; workers is 2" in capsys.readouterr().err
    assert main(argv + ["--workers", "2", "--decay", "0.5"]) == 2
    assert "--decay and --warmup do not apply to controller settings" in capsys.readouterr().err


def test_a_pair_level_replay_realizes_what_the_load_model_predicts():
    """gate_choices picks distinct experts per token, the hottest most often first; realized_load_LW (the replica rule
    dispatch runs, call after call) lands within one pair per replicated slot of worker_load_LW's prediction."""
    from moeray.placement.algorithms.load import worker_load_LW
    from moeray.placement.algorithms.policies import resolve_policy, static_plan
    from moeray.placement.offline.simulator import realized_load_LW
    from moeray.placement.traces import gate_choices

    L, E, W, K, tokens = 3, 16, 4, 4, 3000
    load = synthesize("zipf", num_layers=L, num_experts=E, num_windows=1, tokens=tokens, top_k=K, s=1.5)[0]
    pairs_LTK = gate_choices(load, tokens, K, seed=1)
    assert pairs_LTK.shape == (L, tokens, K)
    assert all(len(set(row)) == K for row in pairs_LTK.reshape(-1, K).tolist()), "distinct experts per token"
    hottest_L = load.argmax(dim=1).numpy()
    for l in range(L):
        ranks = np.flatnonzero(pairs_LTK[l] == hottest_L[l]) % K
        assert np.bincount(ranks, minlength=K).argmax() == 0, "the hottest expert is most often a first choice"
    topology = Topology.uniform(num_workers=W, num_nodes=1, slots_per_worker=6)
    budget = Budget(redundant=W * 6 - E)
    plan = resolve_policy("replicated")(load, topology, static_plan("round_robin", num_layers=L, num_experts=E,
                                                                    num_workers=W, redundant=budget.redundant), budget)
    calls = [pairs_LTK[:, t:t + 100].reshape(L, -1) for t in range(0, tokens, 100)]
    realized_LW = realized_load_LW(calls, plan).sum(axis=0)
    expert_LE = torch.from_numpy(np.stack([np.bincount(pairs_LTK[l].reshape(-1), minlength=E) for l in range(L)]))
    predicted_LW = worker_load_LW(expert_LE, plan).numpy()
    replicated_LW = np.zeros((L, W))
    for l in range(L):
        for p in range(plan.num_slots):
            if plan.replica_count_LE[l, plan.phy2log_LP[l, p]] > 1:
                replicated_LW[l, plan.slot_worker_LP[l, p]] += 1
    assert (np.abs(realized_LW - predicted_LW) < np.maximum(replicated_LW, 1)).all(), (realized_LW, predicted_LW)
