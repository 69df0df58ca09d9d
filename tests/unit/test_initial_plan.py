"""Starting where a run left off: plan files (export and show --json) read back to the same layout, a first layout
from a recorded trace, and a plan that does not fit the checkpoint or the workers refused, naming the value and
the limit, before any cluster starts (no Ray)."""

from __future__ import annotations

import json

import pytest
import torch

from moeray.cli import main
from moeray.cli import placement as placement_cli
from moeray.config import EngineConfig, plan_placement
from moeray.serving.gen import placement_pb2
from moeray.model.backbone import inspect_checkpoint
from moeray.placement.algorithms.balanced import replicated
from moeray.placement.algorithms.plan import Layout
from moeray.placement.algorithms.policies import static_layout
from moeray.placement.algorithms.topology import Budget, Topology
from moeray.placement.initial import check_fits, initial_layout, read_layout, write_plan
from moeray.placement.traces import synthesize, write_trace

L, E, W = 2, 8, 4  # the tiny mixtral checkpoint: 2 MoE layers of 8 experts


def _layout(redundant: int = 4) -> Layout:
    """A load-aware layout (not a static one), so that reading it back proves more than a default."""
    load_LE = torch.tensor([[50.0, 1, 1, 1, 9, 1, 1, 30], [1.0, 40, 1, 1, 1, 1, 20, 1]])
    return replicated(load_LE, Topology.uniform(num_workers=W, slots_per_worker=3), None, Budget(redundant=redundant))


def _fits(layout: Layout, **limits) -> Layout:
    kwargs = dict(source="initial plan p.json", num_layers=L, num_experts=E, num_workers=W, slots_per_worker=3,
                  redundant=4)
    return check_fits(layout, **{**kwargs, **limits})


def test_plan_file_round_trip(tmp_path):
    layout = _layout()
    write_plan(tmp_path / "p.json", layout.at_epoch(7), policy="replicated")
    back = read_layout(tmp_path / "p.json")
    assert type(back) is Layout, "the file's epoch is not kept: the engine numbers its first plan"
    assert torch.equal(back.phy2log_LP, layout.phy2log_LP) and torch.equal(back.slot_worker_LP, layout.slot_worker_LP)


def _placement_response(layout: Layout, epoch: int = 5):
    from moeray.serving.gen import placement_pb2 as pb

    layers = [pb.LayerPlacement(phy2log=p.tolist(), slot_worker=w.tolist())
              for p, w in zip(layout.phy2log_LP, layout.slot_worker_LP)]
    return pb.GetPlacementResponse(epoch=epoch, policy="replicated", layers=layers, slots_per_worker=3,
                                   workers=[pb.WorkerInfo(index=w, device="cpu") for w in range(layout.num_workers)])


@pytest.mark.parametrize("command", ["export", "show"])
def test_export_and_show_json_read_back_as_the_served_layout(tmp_path, monkeypatch, capsys, command):
    layout = _layout()
    monkeypatch.setattr(placement_cli, "_rpc", lambda args, method, **_: _placement_response(layout)
                        if method == "GetPlacement" else placement_pb2.GetLoadResponse())
    path = tmp_path / "plan.json"
    if command == "export":
        assert main(["placement", "export", "--out", str(path)]) == 0
        assert f"--initial-plan {path}" in capsys.readouterr().out
    else:
        assert main(["placement", "show", "--json"]) == 0
        path.write_text(capsys.readouterr().out)
    back = read_layout(path)
    assert back.same_holders(layout) and back.num_experts == E and back.num_workers == W
    assert _fits(back) is back


@pytest.mark.parametrize("limits, layout, message", [
    (dict(num_layers=3), None, "initial plan p.json places 2 MoE layers; the checkpoint has 3"),
    (dict(num_experts=16), None, "initial plan p.json places 8 experts per layer; the checkpoint's MoE layers have 16"),
    (dict(num_workers=2), None, "initial plan p.json is for 4 expert workers; workers is 2"),
    (dict(redundant=2), None, r"holds 4 redundant slots per layer \(12 slots for 8 experts\); replicas allows 2"),
    (dict(slots_per_worker=2), None, r"puts 3 slots of layer 0 on worker 0; a worker holds 2 per layer"),
    ({}, static_layout("contiguous", num_layers=L, num_experts=E, num_workers=2),
     "initial plan p.json is for 2 expert workers; workers is 4"),
])
def test_a_plan_that_does_not_fit_is_refused_naming_value_and_limit(limits, layout, message):
    with pytest.raises(ValueError, match=message):
        _fits(layout or _layout(), **limits)


@pytest.mark.parametrize("text, message", [
    ("{not json", r"plan file .*p.json: not valid JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"epoch": 3}', r"expected 'phy2log' and 'slot_worker' .* got keys \['epoch'\]"),
    ('{"phy2log": [[0, 1], [0, 0]], "slot_worker": [[0, 1], [0, 1]], "num_workers": 2, "num_experts": 2}',
     r"layer 1: experts \[1\] have no replica"),
    ('{"phy2log": [[0, 1], [0]], "slot_worker": [[0, 1], [0]]}', "plan file .*p.json: "),
])
def test_a_bad_plan_file_names_the_file_and_the_problem(tmp_path, text, message):
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_layout(tmp_path / "p.json")


def test_initial_load_is_the_policys_layout_for_the_whole_trace(tmp_path):
    windows = synthesize("zipf", num_layers=L, num_experts=E, num_windows=3, tokens=300, top_k=2, seed=4)
    write_trace(tmp_path / "t.jsonl", windows)
    kwargs = dict(plan_path=None, placement="contiguous", policy="replicated", policy_params={}, num_layers=L,
                  num_experts=E, num_workers=W, slots_per_worker=3, budget=Budget(redundant=4))
    layout = initial_layout(load_path=str(tmp_path / "t.jsonl"), **kwargs)
    expected = replicated(torch.stack(windows).sum(0).double(), Topology.uniform(num_workers=W, slots_per_worker=3),
                          None, Budget(redundant=4))
    assert layout.same_holders(expected)
    assert not layout.same_holders(initial_layout(load_path=None, **kwargs)), "not the static default"
    with pytest.raises(ValueError, match=r"initial load .*t.jsonl has 2 MoE layers x 8 experts; the checkpoint has "
                                         r"3 x 8"):
        initial_layout(load_path=str(tmp_path / "t.jsonl"), **{**kwargs, "num_layers": 3})


def test_engine_settings_refuse_before_any_cluster(tmp_path, checkpoints):
    path = checkpoints["mixtral"]
    spec = inspect_checkpoint(path).spec
    write_plan(tmp_path / "p.json", _layout())  # 4 workers, 4 redundant slots
    plan, slots, _ = plan_placement(EngineConfig(model=path, workers=W, replicas=4,
                                                 initial_plan=str(tmp_path / "p.json")), spec)
    assert plan.epoch == 0 and plan.same_holders(_layout()) and slots == 3
    with pytest.raises(ValueError, match=r"initial plan .*p.json is for 4 expert workers; workers is 2"):
        plan_placement(EngineConfig(model=path, workers=2, replicas=4, initial_plan=str(tmp_path / "p.json")), spec)
    with pytest.raises(ValueError, match="initial_plan .* and initial_load .* are exclusive"):
        EngineConfig(model=path, initial_plan="a.json", initial_load="b.jsonl")


@pytest.mark.ray  # the commands import Ray (not start it) before they check their settings
def test_the_command_line_refuses_the_same_before_starting_ray(tmp_path, capsys, checkpoints):
    path = checkpoints["mixtral"]
    write_plan(tmp_path / "p.json", _layout())
    assert main(["generate", "--model", path, "--prompt-ids", "1,2", "--workers", "4", "--replicas", "1",
                 "--initial-plan", str(tmp_path / "p.json")]) == 2
    assert "holds 4 redundant slots per layer (12 slots for 8 experts); replicas allows 1" in capsys.readouterr().err
    assert main(["serve", "--model", path, "--workers", "2", "--replicas", "4",
                 "--initial-plan", str(tmp_path / "p.json")]) == 2
    assert "is for 4 expert workers; workers is 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--initial-plan", "a.json", "--initial-load", "b.jsonl"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert json.loads((tmp_path / "p.json").read_text())["num_experts"] == E
