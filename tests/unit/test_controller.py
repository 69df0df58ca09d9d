"""The placement controller's logic with fake actors: hysteresis, the two-phase switch, aborts, peers, load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeray.placement.algorithms.plan import Layout, Plan
from moeray.placement.algorithms.policies import static_plan
from moeray.placement.algorithms.topology import Budget, Topology
from moeray.placement.config import ControllerConfig
from moeray.placement.runtime.controller import PlacementController, WorkersDied

L, E, W = 2, 8, 4


def lpt(load_LE, topology, current, budget):
    """Longest-processing-time packing, no replicas: enough of a policy to drive the controller."""
    replicas = []
    for load_E in load_LE.tolist():
        fill, slots = [0.0] * topology.num_workers, [0] * topology.num_workers
        placed = {}
        for e in sorted(range(len(load_E)), key=lambda e: (-load_E[e], e)):
            w = min((w for w in range(topology.num_workers) if slots[w] < topology.slots_per_worker),
                    key=lambda w: (fill[w], w))
            fill[w], slots[w], placed[e] = fill[w] + load_E[e], slots[w] + 1, w
        replicas.append([[placed[e]] for e in range(len(load_E))])
    return Layout.from_replicas(replicas, num_workers=topology.num_workers)


class FakeOps:
    def __init__(self, workers: int = W) -> None:
        self.calls: list[tuple] = []
        self.reports: list[dict] = []
        self.fail_prepare = False
        self.unnoticed_dead: set[int] = set()
        self.cluster_max, self.spawn_error, self.spawned = None, None, 0

    def take_loads(self):
        reports, self.reports = self.reports, []
        return reports

    def worker_infos(self):
        return self.infos

    def dead_workers(self):
        return []

    def max_workers(self):
        return self.cluster_max

    def spawn(self, count, epoch, timeout_s):
        if self.spawn_error:
            raise TimeoutError(self.spawn_error)
        self.spawned += count
        return [f"new-{self.spawned - count + i}" for i in range(count)]

    def stop(self, workers):
        self.calls.append(("stop", list(workers)))

    def stage(self, keep, new):
        self.calls.append(("reshape", list(keep), len(new)))
        return [f"node-{i % 2}" for i in range(len(keep) + len(new))]

    def prepare(self, epoch, experts_per_worker, peers_per_worker, skip):
        self.calls.append(("prepare", epoch, experts_per_worker, peers_per_worker, skip))
        if self.fail_prepare:
            raise RuntimeError("worker 2 ran out of memory")
        if self.unnoticed_dead - set(skip):
            raise WorkersDied(sorted(self.unnoticed_dead - set(skip)))
        return [{"worker": w} for w in range(len(experts_per_worker))]

    def switch(self, plan):
        self.calls.append(("switch", plan.epoch))

    def commit(self, epoch, skip):
        self.calls.append(("commit", epoch))

    def abort(self, epoch, skip):
        self.calls.append(("abort", epoch))


def hot_step(plan: Plan, hot=(0, 4), tokens=100):
    """One step record where every token goes to the ``hot`` experts, counted per worker as the plan routes it."""
    expert_LE = np.zeros((L, E), np.int64)
    expert_LE[:, list(hot)] = tokens
    worker_LW = np.zeros((L, plan.num_workers), np.int64)
    for l in range(L):
        for e in hot:
            worker_LW[l, plan.replica_workers()[l][e][0]] += tokens
    return expert_LE, worker_LW


def make(config: ControllerConfig | None = None, clock=None, redundant=0, slots=2, nodes=1):
    plan = static_plan("round_robin", num_layers=L, num_experts=E, num_workers=W, redundant=redundant)
    ops = FakeOps()
    kwargs = {"clock": clock} if clock else {}
    controller = PlacementController(
        config=config or ControllerConfig(policy="test_controller:lpt"), plan=plan,
        topology=Topology.uniform(num_workers=W, num_nodes=nodes, slots_per_worker=slots),
        budget=Budget(redundant=redundant, expert_bytes=1000), ops=ops, **kwargs)
    return controller, ops


def test_hysteresis_needs_consecutive_hot_windows():
    config = ControllerConfig(policy="test_controller:lpt", window_steps=4, imbalance_threshold=1.5,
                              consecutive_windows=3)
    controller, ops = make(config)
    plan0 = controller.plan
    # Round-robin puts experts 0 and 4 on worker 0: measured imbalance 4.0. Two hot windows, then a cool one.
    for window in range(2):
        ops.reports = [{"steps": [hot_step(plan0)] * 4}]
        assert controller.poll() is None
    ops.reports = [{"steps": [hot_step(plan0, hot=(0, 1, 2, 3))] * 4}]  # balanced: resets the count
    assert controller.poll() is None
    for window in range(2):
        ops.reports = [{"steps": [hot_step(plan0)] * 4}]
        assert controller.poll() is None
    assert ops.calls == []
    ops.reports = [{"steps": [hot_step(plan0)] * 4}]
    record = controller.poll()
    assert record is not None and record["applied"] and record["reason"].startswith("imbalance 4.000 > 1.5")
    assert [c[0] for c in ops.calls] == ["prepare", "switch", "commit"]
    assert controller.plan.epoch == 1
    assert record["expected_imbalance_before"] == pytest.approx(4.0)
    assert record["expected_imbalance_after"] == pytest.approx(2.0)  # two hot experts, no replicas: 2 of 4 busy
    holders = controller.plan.replica_workers()
    assert holders[0][0] != holders[0][4], "the two hot experts now live on different workers"
    assert len(controller.window) == 0, "loads measured under the old plan are dropped"


def test_windows_close_by_step_count_and_replay_to_the_same_decisions(tmp_path, capsys):
    """The controller under a drifting load, its steps pulled in uneven batches, writes a trace; the simulator fed
    that trace and the same settings decides the same at every window."""
    from moeray.cli import main
    from moeray.placement.traces import read_trace_windows, synthesize

    settings = {"policy": "replicated", "window_steps": 3, "imbalance_threshold": 1.5, "consecutive_windows": 2,
                "cooldown_windows": 1, "min_gain": 0.1, "rebalance_interval_s": 3.0}
    (tmp_path / "placement.yaml").write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    now = [0.0]
    config = ControllerConfig.from_file(str(tmp_path / "placement.yaml"), trace_path=str(tmp_path / "t.jsonl"))
    controller, ops = make(config, clock=lambda: now[0], redundant=4, slots=3)
    steps_NLE = synthesize("drifting", num_layers=L, num_experts=E, num_windows=60, tokens=40, top_k=2, seed=3,
                           s=1.6, drift_every=24, drift_experts=2)
    batches = [1, 5, 2, 7, 3, 4]
    records, i = [], 0
    while i < len(steps_NLE):
        n, now[0] = batches[len(records) % len(batches)], now[0] + 1.0
        ops.reports = [{"steps": [(s.numpy(), np.zeros((L, W), np.int64)) for s in steps_NLE[i:i + n]]}]
        records.append(controller.poll())
        i += n
    traced = read_trace_windows(tmp_path / "t.jsonl")
    assert len(traced) == 60 // 3, "one window per 3 steps, however the polls batched them"
    assert all(w.load_LE.sum() == 3 * 40 * 2 * L for w in traced)
    live = [(w.recorded["epoch"], w.recorded["trigger"], w.recorded["applied"]) for w in traced]
    kinds = {(trigger.split(" ")[0], applied) for _, trigger, applied in live}
    # Hot windows after each drift trigger rebalances; the schedule's on calm windows miss min_gain.
    assert {("imbalance", True), ("schedule", False), ("", False)} <= kinds, kinds
    assert controller.plan.epoch == sum(applied for _, _, applied in live)
    assert main(["placement", "simulate", "--trace", str(tmp_path / "t.jsonl"), "--config",
                 str(tmp_path / "placement.yaml"), "--workers", str(W), "--redundant", "4", "--slots-per-worker", "3",
                 "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    replayed = [(r["epoch"], r["trigger"], r["rebalanced"]) for r in lines if r["type"] == "window"]
    assert replayed == live
    assert [r["mean_imbalance"] for r in lines if r["type"] == "window"] == \
        pytest.approx([w.recorded["imbalance"] for w in traced], rel=1e-12)


def test_the_controller_numbers_epochs_and_holds_policies_to_their_contract():
    controller, ops = make(ControllerConfig(policy="test_controller:numbered",
                                            allowed_policy_modules=("test_controller",)))
    ops.reports = [{"steps": [hot_step(controller.plan)]}]
    controller.poll()
    assert controller.rebalance()["epoch"] == 1, "the policy's epoch 99 is not the plan's"
    with pytest.raises(ValueError, match=r"policy 'test_controller:lopsided' put 8 slots of layer 0 on worker 0, "
                                         r"which holds 2"):
        controller.rebalance(policy="test_controller:lopsided")
    assert controller.plan.epoch == 1 and [c[0] for c in ops.calls] == ["prepare", "switch", "commit"]


def numbered(load_LE, topology, current, budget):
    """An old-style policy that numbers its own plan: the controller ignores the epoch."""
    return lpt(load_LE, topology, current, budget).at_epoch(99)


def lopsided(load_LE, topology, current, budget):
    """Every expert on worker 0: more slots than the worker holds."""
    return Layout.from_replicas([[[0]] * E] * L, num_workers=topology.num_workers)


def test_switch_order_moves_and_peers():
    controller, ops = make(nodes=2)
    ops.reports = [{"steps": [hot_step(controller.plan)]}]
    controller.poll()
    record = controller.rebalance()
    prepare, switch, commit = ops.calls
    assert prepare[0] == "prepare" and switch == ("switch", 1) and commit == ("commit", 1)
    experts_per_worker, peers = prepare[2], prepare[3]
    assert experts_per_worker == [controller.plan.experts_of(w) for w in range(W)]
    loads = [m for m in record["moves"] if m["action"] == "load"]
    drops = [m for m in record["moves"] if m["action"] == "drop"]
    assert len(loads) == len(drops) == record["moved_slots"] > 0
    assert record["moved_bytes"] == record["moved_slots"] * 1000
    # Every loaded slot is fetched from a worker that held it under the old plan.
    old = static_plan("round_robin", num_layers=L, num_experts=E, num_workers=W).replica_workers()
    for m in loads:
        sources = [p for p, pairs in peers[m["worker"]].items() if (m["layer"], m["expert"]) in pairs]
        assert sources == [old[m["layer"]][m["expert"]][0]]


def test_failed_prepare_aborts_and_keeps_the_plan():
    controller, ops = make()
    ops.reports = [{"steps": [hot_step(controller.plan)]}]
    controller.poll()
    ops.fail_prepare = True
    before = controller.plan
    with pytest.raises(RuntimeError, match="out of memory"):
        controller.rebalance()
    assert [c[0] for c in ops.calls] == ["prepare", "abort"]
    assert controller.plan is before and controller.history == []


def test_dry_run_and_min_gain_change_nothing():
    controller, ops = make(ControllerConfig(policy="test_controller:lpt", rebalance_interval_s=1.0))
    ops.reports = [{"steps": [hot_step(controller.plan)]}]
    controller.poll()
    record = controller.rebalance(dry_run=True)
    assert record["moved_slots"] > 0 and not record["applied"] and ops.calls == []
    assert controller.plan.epoch == 0
    # A balanced load: an automatic rebalance would not pay for itself, so it is skipped.
    controller.window.clear()
    ops.reports = [{"steps": [hot_step(controller.plan, hot=tuple(range(E)))]}]
    controller.poll()
    assert not controller.rebalance(reason="schedule")["applied"] and ops.calls == []


def test_schedule_trigger_uses_the_clock_as_windows_close():
    now = [0.0]
    controller, ops = make(ControllerConfig(policy="test_controller:lpt", rebalance_interval_s=10.0, window_steps=2),
                           clock=lambda: now[0])
    ops.reports = [{"steps": [hot_step(controller.plan)] * 2}]
    assert controller.poll() is None  # a window closed, but it is not yet time
    now[0] = 10.5
    ops.reports = [{"steps": [hot_step(controller.plan)]}]
    assert controller.poll() is None, "time, but no window closed: the schedule waits for one"
    ops.reports = [{"steps": [hot_step(controller.plan)]}]
    record = controller.poll()
    assert record["reason"] == "schedule" and record["applied"]


def test_take_load_since_last_call_and_top_tokens():
    controller, ops = make()
    step = hot_step(controller.plan)
    tokens = np.array([[0, 0, 65, 3], [0, 0, 66, 5], [1, 4, 65, 2]])
    ops.reports = [{"steps": [step, step], "tokens": tokens}, {"steps": [step], "tokens": tokens[:1]}]
    expert_LE, worker_LW = controller.take_load()
    assert (expert_LE == 3 * step[0]).all() and (worker_LW == 3 * step[1]).all()
    assert controller.take_load()[0].sum() == 0, "a second call sees only what came after the first"
    assert controller.window_load()[0].sum() == 3 * step[0].sum(), "the window is not drained by take_load"
    top = controller.top_tokens(k=1)
    assert top[0][0] == [(65, 6)] and top[1][4] == [(65, 2)] and top[0][1] == []


def test_policy_errors_name_the_policy():
    with pytest.raises(ValueError, match="placement policy 'nope'"):
        ControllerConfig(policy="nope")
    controller, _ = make()
    with pytest.raises(ValueError, match="no_such_module"):
        controller.set_policy("no_such_module:fn")
    with pytest.raises(ValueError, match="imbalance_threshold must be >= 1.0"):
        ControllerConfig(imbalance_threshold=0.5)


def test_restore_replaces_lost_experts_on_live_workers():
    controller, ops = make(ControllerConfig(policy="replicated"), redundant=4, slots=4)
    lost = set(controller.plan.experts_of(1)[0])
    record = controller.restore([1])
    assert record["applied"] and controller.plan.epoch == 1
    prepare = ops.calls[0]
    assert prepare[0] == "prepare" and prepare[4] == frozenset({1}), "the dead worker is not called"
    assert controller.plan.experts_of(1) == [[], []], "the dead worker holds nothing"
    assert (controller.plan.replica_count_LE >= 1).all(), "every expert is back"
    # 3 live workers x 4 slots = 12 = 8 experts + 4 redundant: full redundancy restored.
    assert record["redundant"] == 4
    # Slots whose every replica died come from the checkpoint; the others from a surviving peer.
    peers = prepare[3]
    fetched = {(l, e) for per_worker in peers for pairs in per_worker.values() for l, e in pairs}
    assert all(1 not in per_worker for per_worker in peers), "never fetch from the dead"
    assert fetched, "surviving replicas are copied from peers"
    assert lost, "worker 1 held experts"
    # Idempotent: a second router reporting the same loss changes nothing.
    assert not controller.restore([1])["applied"] and controller.plan.epoch == 1


def test_restore_starts_a_replacement_when_live_slots_cannot_hold_every_expert():
    controller, ops = make(slots=2)  # 4 workers x 2 slots = 8 experts, no room to lose one
    record = controller.restore([2])
    assert record["applied"] and record["reason"] == "failure: workers [2] lost"
    assert ops.spawned == 1 and ops.calls[0] == ("reshape", [0, 1, 3], 1)
    assert controller.plan.num_workers == 4 and (controller.plan.replica_count_LE >= 1).all()
    assert not controller.dead_workers and controller.experts_available()
    assert controller.heal() is None, "nothing left to heal"


def test_restore_that_cannot_place_a_replacement_fails_clearly_and_heals_later():
    controller, ops = make(slots=2)
    ops.spawn_error = "1 new expert workers were not placed within 120s; the cluster has CPU 0 free"
    with pytest.raises(TimeoutError, match="not placed within 120s"):
        controller.restore([2])
    assert not controller.experts_available() and controller.healing["state"] == "failed, retrying"
    assert "not placed" in controller.healing["error"]
    ops.spawn_error = None  # a node joined
    record = controller.heal()
    assert record["applied"] and controller.experts_available() and controller.healing["state"] == "idle"


def test_a_loss_the_live_workers_absorb_is_replaced_afterwards():
    controller, ops = make(ControllerConfig(policy="replicated"), redundant=4, slots=4)
    assert controller.restore([1])["applied"] and ops.spawned == 0, "restored at once, on the live workers"
    assert controller.experts_available() and controller.dead_workers == {1}
    record = controller.heal()  # the controller's loop does this in the background
    assert record["applied"] and ops.spawned == 1 and controller.plan.num_workers == 4
    assert not controller.dead_workers and record["reason"] == "replace: workers [1] lost"


def test_request_scale_is_bounded_and_answers_at_once():
    controller, ops = make(ControllerConfig(policy="replicated", max_workers=6), redundant=4, slots=4)
    with pytest.raises(ValueError, match=r"workers must lie in \[1, 6\]; got 1000"):
        controller.request_scale(1000)
    ops.cluster_max = 5
    assert controller.request_scale(6)["target"] == 6, "max_workers is set: an autoscaler adds what is missing"
    controller.config = ControllerConfig(policy="replicated")
    with pytest.raises(ValueError, match=r"workers must lie in \[1, 5\] \(what the cluster's resources hold"):
        controller.request_scale(6)
    assert controller.request_scale(5) == {"target": 5, "epoch": 0, "accepted": True}
    assert ops.calls == [] and controller.plan.num_workers == 4, "nothing happens until the loop heals"
    assert controller.heal()["workers"] == 5 and controller.plan.num_workers == 5


def test_scale_out_and_in_keeps_every_expert_and_drains_the_leavers():
    controller, ops = make(ControllerConfig(policy="replicated", max_workers=6), redundant=4, slots=4)
    record = controller.scale(6)
    assert record["applied"] and record["workers"] == 6 and controller.plan.num_workers == 6
    assert ops.calls[0] == ("reshape", [0, 1, 2, 3], 2)
    prepare = ops.calls[1]
    assert [c[0] for c in ops.calls[1:]] == ["prepare", "switch", "commit"]
    new_workers_experts = prepare[2][4:]
    assert any(e for w in new_workers_experts for e in w), "new workers receive slots"
    assert all(None not in per_worker for per_worker in prepare[3]), "slots come from current holders"
    assert controller.topology.num_workers == 6 and len(set(controller.topology.worker_node)) == 2
    ops.calls.clear()
    before = controller.plan.replica_workers()
    record = controller.scale(3)
    assert ops.calls[0] == ("reshape", [0, 1, 2], 0)
    assert controller.plan.num_workers == 3 and (controller.plan.replica_count_LE >= 1).all()
    # The leavers' experts were loaded onto the stayers from the leavers themselves (they are alive until commit).
    peers = ops.calls[1][3]
    sources = {p for per_worker in peers for p in per_worker}
    assert sources and sources <= {0, 1, 2, 3, 4, 5} and before
    assert record["redundant"] == 3 * 4 - E  # 12 slots on 3 workers: 8 experts + 4 copies
    with pytest.raises(ValueError, match=r"workers must lie in \[1, 6\]; got 7"):
        controller.scale(7)
    with pytest.raises(ValueError, match="1 workers x 4 slots cannot hold the 8 experts"):
        controller.scale(1)


def test_autoscaler_adds_a_worker_after_consecutive_busy_polls_and_removes_when_idle():
    config = ControllerConfig(policy="replicated", scale_out_queue=4, scale_in_utilisation=0.25, autoscale_polls=3,
                              max_workers=5)
    controller, ops = make(config, slots=4)
    busy = {"steps": [], "waiting": 10, "running": 32, "capacity": 32}
    for poll in range(2):
        ops.reports = [busy]
        assert controller.poll() is None
    ops.reports = [{**busy, "waiting": 0}]  # one calm poll resets the count
    assert controller.poll() is None
    for poll in range(3):
        ops.reports = [busy]
        record = controller.poll()
    assert record["reason"] == "autoscale" and record["workers"] == 5
    for poll in range(3):
        ops.reports = [busy]
        assert controller.poll() is None, "never above max_workers"
    idle = {"steps": [], "waiting": 0, "running": 1, "capacity": 32}
    for poll in range(3):
        ops.reports = [idle]
        record = controller.poll()
    assert record["workers"] == 4


def test_rebuild_after_a_restart_adopts_what_the_workers_hold():
    controller, ops = make(redundant=4, slots=3)
    held = static_plan("contiguous", num_layers=L, num_experts=E, num_workers=W, redundant=4)
    ops.infos = [{"epoch": 6, "epochs": [6, 7], "experts_per_layer": held.experts_of(w)} for w in range(W)]
    record = controller.rebuild()
    assert record["epoch"] == 8, "above every epoch a worker holds, prepared (7) or committed (6)"
    assert controller.plan.holders(0) == held.holders(0) and controller.plan.epoch == 8
    prepare = ops.calls[0]
    assert prepare[0] == "prepare" and all(p == {} for p in prepare[3]), "nothing to load"
    # A worker died with the controller: its experts are placed again, from the checkpoint.
    ops.calls.clear()
    ops.infos[1] = None
    record = controller.rebuild()
    assert record["dead_workers"] == [1] and controller.plan.experts_of(1) == [[], []]
    assert (controller.plan.replica_count_LE >= 1).all()
    assert all(p == {} for p in ops.calls[0][3]), "holders unknown: read from the checkpoint"


def test_rebalance_after_a_loss_never_places_slots_on_the_dead():
    controller, ops = make(ControllerConfig(policy="replicated"), redundant=4, slots=4)
    controller.restore([2])
    ops.reports = [{"steps": [hot_step(controller.plan)] * 3}]
    controller.poll()
    record = controller.rebalance(policy="round_robin")
    assert record["applied"] and controller.plan.experts_of(2) == [[], []]
    # imbalance is measured over the live workers: a dead worker's empty column does not count
    assert record["expected_imbalance_after"] < 4.0


def test_restore_that_finds_more_dead_workers_plans_again_without_them():
    controller, ops = make(ControllerConfig(policy="replicated"), redundant=4, slots=6)
    ops.unnoticed_dead = {3}  # its node went too; no router has called it yet
    record = controller.restore([2])
    assert record["dead_workers"] == [2, 3]
    assert [c[0] for c in ops.calls] == ["prepare", "abort", "prepare", "switch", "commit"]
    assert controller.plan.experts_of(2) == controller.plan.experts_of(3) == [[], []]
    assert (controller.plan.replica_count_LE >= 1).all()
