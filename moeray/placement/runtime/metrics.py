"""What the placement controller exports through OpenTelemetry: load per expert and worker, imbalance, the plan
epoch, rebalances and migrations (no-ops unless telemetry is configured; see moeray.telemetry)."""

from __future__ import annotations

import weakref

from moeray import telemetry
from moeray.telemetry import attrs

# NOTE: telemetry.M is rebound when a process configures telemetry: read it (and STATE) off the module.


class ControllerMetrics:
    """What the placement controller exports: load per expert and worker, imbalance, epochs, rebalances."""

    def __init__(self, controller) -> None:
        import numpy as np

        self._np = np
        self._controller = weakref.ref(controller)
        plan = controller.plan
        self.expert_LE = np.zeros((plan.num_layers, plan.num_experts), np.int64)
        self.worker_LW = np.zeros((plan.num_layers, plan.num_workers), np.int64)
        self.expected_LW = np.zeros((plan.num_layers, plan.num_workers), np.float64)
        telemetry.SOURCES.add(self)

    def step(self, expert_LE, worker_LW) -> None:
        """One step record pulled from a router: add it up, record its imbalance per layer."""
        if not telemetry.STATE.metrics:
            return
        self.expert_LE += expert_LE
        if worker_LW.shape != self.worker_LW.shape:  # the worker count changed
            self.worker_LW = self._np.zeros(worker_LW.shape, self._np.int64)
        self.worker_LW += worker_LW
        controller = self._controller()
        expected_LW = controller.expected_load(expert_LE) if controller is not None else None
        if expected_LW is not None and expected_LW.shape == self.worker_LW.shape:
            if self.expected_LW.shape != expected_LW.shape:
                self.expected_LW = self._np.zeros(expected_LW.shape, self._np.float64)
            self.expected_LW += expected_LW
        mean_L = worker_LW.mean(axis=1)
        for layer in self._np.flatnonzero(mean_L > 0).tolist():
            telemetry.M.step_imbalance_ratio.record(float(worker_LW[layer].max() / mean_L[layer]), attrs(layer=layer))

    def rebalanced(self, record: dict, started_ns: int) -> None:
        """A rebalance ran (applied or not): count it and trace it after the fact."""
        if telemetry.STATE.metrics and record["applied"]:
            telemetry.M.rebalances.add(1, attrs(reason=record["reason"].split()[0]))
            telemetry.M.migrated_slots.add(record["moved_slots"])
            telemetry.M.migrated_bytes.add(record["moved_bytes"])
        if telemetry.STATE.tracing:
            span = telemetry.STATE.tracer.start_span("moeray.rebalance", start_time=started_ns, attributes={
                "moeray.rebalance.reason": record["reason"], "moeray.policy": record["policy"],
                "moeray.plan.epoch": record["epoch"], "moeray.plan.from_epoch": record["from_epoch"],
                "moeray.rebalance.applied": record["applied"], "moeray.moved_slots": record["moved_slots"],
                "moeray.moved_bytes": record["moved_bytes"],
                "moeray.imbalance.before": record["expected_imbalance_before"],
                "moeray.imbalance.after": record["expected_imbalance_after"]})
            span.end()

    def workers_lost(self, count: int) -> None:
        if telemetry.STATE.metrics and count:
            telemetry.M.worker_losses.add(count)

    def restored(self, started_ns: int) -> None:
        """Every lost expert is served again: a restore (or a replacement) finished, ``started_ns`` after the loss
        was reported."""
        if telemetry.STATE.metrics:
            import time

            telemetry.M.restore_seconds.record((time.time_ns() - started_ns) / 1e9)

    def workers_alive(self, alive: int) -> None:
        if telemetry.STATE.metrics:
            telemetry.M.workers_alive.set(alive)

    def observe(self, key: str):
        from opentelemetry.metrics import Observation

        controller = self._controller()
        if controller is None:
            return
        if key == "expert_tokens" and telemetry.STATE.config is not None and telemetry.STATE.config.expert_metrics:
            for layer, expert in self._exported_experts(telemetry.STATE.config.expert_metrics):
                yield Observation(int(self.expert_LE[layer, expert]), attrs(layer=layer, expert=expert))
        elif key == "worker_tokens":
            for (layer, worker), n in self._np.ndenumerate(self.worker_LW):
                yield Observation(int(n), attrs(layer=layer, worker=worker))
        elif key == "worker_expected_tokens":
            for (layer, worker), n in self._np.ndenumerate(self.expected_LW):
                yield Observation(float(n), attrs(layer=layer, worker=worker))
        elif key == "routing_gap_ratio":
            from moeray.placement.algorithms.load import routing_gap_L

            expert_LE, worker_LW = controller.window_load()
            expected_LW = controller.expected_load(expert_LE)
            if expected_LW.shape == worker_LW.shape:
                for layer, gap in enumerate(routing_gap_L(worker_LW, expected_LW).tolist()):
                    yield Observation(gap, attrs(layer=layer))
        elif key == "imbalance_ratio":
            worker_LW = controller.window_load()[1]
            mean_L = worker_LW.mean(axis=1)
            for layer, w_W in enumerate(worker_LW):
                yield Observation(float(w_W.max() / mean_L[layer]) if mean_L[layer] > 0 else 1.0, attrs(layer=layer))
        elif key == "plan_epoch":
            yield Observation(controller.plan.epoch)

    def _exported_experts(self, which: bool | int):
        """The (layer, expert) series to export: all of them, or each layer's ``which`` hottest since the start (a
        bounded label set for models with hundreds of experts over dozens of layers)."""
        L, E = self.expert_LE.shape
        if which is True or which >= E:
            return ((l, e) for l in range(L) for e in range(E))
        # the hottest first; ties to the lower expert id, so the exported set is stable while loads are equal
        order_LE = self._np.argsort(-self.expert_LE, axis=1, kind="stable")[:, :which]
        return ((l, int(e)) for l in range(L) for e in sorted(order_LE[l].tolist()))
