"""Stand-ins for the few OpenTelemetry names ``moeray.telemetry`` touches while telemetry is off, for a machine
without OpenTelemetry (``make gpu-check``'s runs the in-process engine with torch, triton and transformers alone).
Every hot path tests ``STATE.on`` / ``STATE.metrics`` / ``STATE.tracing`` first, so off, only construction and the
no-op instruments below are reached; turning telemetry on there fails in ``configure``, naming the package.
"""

from __future__ import annotations

import types


class _Instrument:
    """A counter, gauge or histogram that records nothing."""

    def add(self, *args, **kwargs) -> None:
        pass

    record = set = add


class NoOpMeter:
    def __init__(self, name: str, *args, **kwargs) -> None:
        self.name = name

    def _instrument(self, *args, **kwargs) -> _Instrument:
        return _Instrument()

    create_counter = create_gauge = create_histogram = _instrument
    create_observable_counter = create_observable_gauge = _instrument


class NoOpTracer:
    pass


class _NoSpan:
    def is_recording(self) -> bool:
        return False


class TraceContextTextMapPropagator:
    def extract(self, carrier: dict):
        return None

    def inject(self, carrier: dict, context=None) -> None:
        pass


metrics = types.SimpleNamespace(NoOpMeter=NoOpMeter, Meter=NoOpMeter)
trace = types.SimpleNamespace(NoOpTracer=NoOpTracer, Tracer=NoOpTracer, get_current_span=_NoSpan)
otel_context = types.SimpleNamespace(Context=dict)
