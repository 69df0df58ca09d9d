"""The placement controller's metrics and spans, with fake actors: load per expert and worker, imbalance,
epochs, rebalances and migrations."""

from __future__ import annotations

import numpy as np
import pytest

from moeray.placement.algorithms.policies import static_plan
from moeray.placement.algorithms.topology import Budget, Topology
from moeray.placement.config import ControllerConfig
from moeray.placement.runtime.controller import PlacementController
from otel_helpers import otel, point

L, E, W = 2, 8, 4


class FakeOps:
    def __init__(self) -> None:
        self.reports: list[dict] = []

    def take_loads(self):
        reports, self.reports = self.reports, []
        return reports

    def prepare(self, epoch, experts_per_worker, *args):
        return [{"worker": w} for w in range(len(experts_per_worker))]

    def switch(self, plan, *args):
        pass

    def commit(self, epoch, *args):
        pass

    def abort(self, epoch, *args):
        pass


def make():
    plan = static_plan("contiguous", num_layers=L, num_experts=E, num_workers=W)
    ops = FakeOps()
    controller = PlacementController(config=ControllerConfig(policy="greedy"), plan=plan,
                                     topology=Topology.uniform(num_workers=W, num_nodes=1, slots_per_worker=2),
                                     budget=Budget(redundant=0, expert_bytes=1000), ops=ops)
    return controller, ops


def skewed_step():
    """Layer 0: everything to experts 0 and 1 (worker 0 under the contiguous plan); layer 1: even."""
    expert_LE = np.zeros((L, E), np.int64)
    expert_LE[0, :2] = 60
    expert_LE[1] = 15
    worker_LW = np.zeros((L, W), np.int64)
    worker_LW[0, 0] = 120
    worker_LW[1] = 30
    return expert_LE, worker_LW


def test_load_imbalance_and_epoch_metrics():
    with otel() as o:
        controller, ops = make()
        ops.reports = [{"steps": [skewed_step(), skewed_step()]}]
        controller.pull()
        m = o.metrics()
        tokens = m["moeray_expert_tokens"]
        assert len(tokens) == L * E
        assert point(tokens, layer=0, expert=0).value == 120 and point(tokens, layer=0, expert=5).value == 0
        assert point(tokens, layer=1, expert=7).value == 30
        workers = m["moeray_worker_tokens"]
        assert point(workers, layer=0, worker=0).value == 240 and point(workers, layer=1, worker=3).value == 60
        imbalance = m["moeray_imbalance_ratio"]
        assert point(imbalance, layer=0).value == pytest.approx(4.0)  # 240 / mean(240, 0, 0, 0)
        assert point(imbalance, layer=1).value == pytest.approx(1.0)
        steps = m["moeray_step_imbalance_ratio"]
        assert point(steps, layer=0).count == 2 and point(steps, layer=0).max == pytest.approx(4.0)
        assert point(steps, layer=1).sum == pytest.approx(2.0)
        assert m["moeray_plan_epoch"][0].value == 0


def test_rebalance_counts_migrations_and_leaves_a_span():
    with otel() as o:
        controller, ops = make()
        ops.reports = [{"steps": [skewed_step()]}]
        controller.pull()
        dry = controller.rebalance(dry_run=True)
        record = controller.rebalance(reason="imbalance 4.000 > 1.5 for 3 windows")
        assert record["applied"] and record["moved_slots"] > 0
        m = o.metrics()
        (rebalances,) = m["moeray_rebalances"]  # the dry run is not counted; the reason keeps its first word
        assert (dict(rebalances.attributes), rebalances.value) == ({"reason": "imbalance"}, 1)
        assert m["moeray_migrated_slots"][0].value == record["moved_slots"]
        assert m["moeray_migrated_bytes"][0].value == record["moved_slots"] * 1000
        assert m["moeray_plan_epoch"][0].value == record["epoch"] == 1
        spans = o.spans("moeray.rebalance")
        assert [s.attributes["moeray.rebalance.applied"] for s in spans] == [False, True]
        applied = spans[1].attributes
        assert applied["moeray.plan.epoch"] == 1 and applied["moeray.plan.from_epoch"] == 0
        assert applied["moeray.moved_slots"] == record["moved_slots"]
        assert applied["moeray.imbalance.after"] < applied["moeray.imbalance.before"] == dry[
            "expected_imbalance_before"]
        assert spans[1].end_time >= spans[1].start_time


def test_workers_alive_gauge():
    with otel() as o:
        controller, _ = make()
        controller.telemetry.workers_alive(3)
        assert o.metrics()["moeray_workers_alive"][0].value == 3


def test_expected_worker_tokens_and_the_routing_gap():
    """The plan's expectation beside what the workers received: skewed_step's worker counts are exactly what the
    contiguous plan expects (gap 0); a step whose layer 0 went to the wrong worker shows a gap."""
    with otel() as o:
        controller, ops = make()
        ops.reports = [{"steps": [skewed_step()]}]
        controller.pull()
        m = o.metrics()
        expected = m["moeray_worker_expected_tokens"]
        assert len(expected) == L * W and point(expected, layer=0, worker=0).value == 120
        assert point(expected, layer=0, worker=1).value == 0 and point(expected, layer=1, worker=2).value == 30
        assert [point(m["moeray_routing_gap_ratio"], layer=l).value for l in range(L)] == [0.0, 0.0]
        expert_LE, worker_LW = skewed_step()
        worker_LW[0] = [0, 120, 0, 0]  # layer 0's pairs on worker 1, which holds none of experts 0 and 1
        ops.reports = [{"steps": [(expert_LE, worker_LW)]}]
        controller.pull()
        gap = point(o.metrics()["moeray_routing_gap_ratio"], layer=0).value
        # the window holds both steps: worker 0 got 120 of the 240 expected, over a mean expectation of 240 / 4
        assert gap == pytest.approx(120 / 60)


def test_per_expert_series_of_the_hottest_experts_only():
    import gc

    from moeray.telemetry import TelemetryConfig

    gc.collect()  # NOTE: an earlier test's controller, not yet collected, would still export its own series

    with otel(TelemetryConfig(expert_metrics=3)) as o:
        controller, ops = make()
        expert_LE, worker_LW = skewed_step()
        expert_LE[1, 5] += 4  # layer 1: expert 5 hottest, then the rest tie (the lowest ids win the ties)
        ops.reports = [{"steps": [(expert_LE, worker_LW)]}]
        controller.pull()
        tokens = o.metrics()["moeray_expert_tokens"]
        assert sorted((p.attributes["layer"], p.attributes["expert"]) for p in tokens) == [
            (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 5)]
        assert point(tokens, layer=1, expert=5).value == 19
    with pytest.raises(ValueError, match="expert_metrics must be"):
        TelemetryConfig(expert_metrics=-1)


def test_per_expert_series_can_be_turned_off():
    from moeray.telemetry import TelemetryConfig

    with otel(TelemetryConfig(expert_metrics=False)) as o:
        controller, ops = make()
        ops.reports = [{"steps": [skewed_step()]}]
        controller.pull()
        m = o.metrics()
        assert "moeray_expert_tokens" not in m and len(m["moeray_worker_tokens"]) == L * W


def test_off_the_controller_accumulates_nothing():
    controller, ops = make()
    ops.reports = [{"steps": [skewed_step()]}]
    controller.pull()
    assert controller.telemetry.expert_LE.sum() == 0  # no telemetry: the step hook returned at once
    assert list(controller.telemetry.observe("expert_tokens")) == []
