"""In-memory OpenTelemetry exporters for the telemetry tests, and small readers of what they hold."""

from __future__ import annotations

import contextlib

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moeray import telemetry


class Otel:
    """This process's telemetry, configured with an in-memory span exporter and metric reader."""

    def __init__(self, config: telemetry.TelemetryConfig | None = None) -> None:
        self.spans_exporter, self.reader = InMemorySpanExporter(), InMemoryMetricReader()
        telemetry.configure(config or telemetry.TelemetryConfig(), span_exporters=[self.spans_exporter],
                            metric_readers=[self.reader])

    def spans(self, name: str | None = None) -> list:
        return [s for s in self.spans_exporter.get_finished_spans() if name is None or s.name == name]

    def metrics(self) -> dict[str, list]:
        """Metric name -> its data points (attributes as a dict on ``.attributes``)."""
        data = self.reader.get_metrics_data()
        out: dict[str, list] = {}
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out.setdefault(m.name, []).extend(m.data.data_points)
        return out


@contextlib.contextmanager
def otel(config: telemetry.TelemetryConfig | None = None):
    o = Otel(config)
    try:
        yield o
    finally:
        telemetry.shutdown()


def point(points: list, **attributes):
    """The one data point whose attributes include ``attributes``."""
    found = [p for p in points if all(p.attributes.get(k) == v for k, v in attributes.items())]
    assert len(found) == 1, (attributes, [dict(p.attributes) for p in points])
    return found[0]


