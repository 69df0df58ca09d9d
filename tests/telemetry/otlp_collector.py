"""A tiny OTLP/gRPC collector on 127.0.0.1 for tests: keeps every span and metric data point it is sent."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _value(v):
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


def _attrs(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


class Collector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[dict] = []  # name, trace_id/span_id/parent (hex), attributes, links, resource
        self.points: list[dict] = []  # metric name, attributes, resource, and the point proto
        self.headers: list[dict] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request, context):  # both services name their one method Export
        with self.lock:
            self.headers.append(dict(context.invocation_metadata()))
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                for rs in request.resource_spans:
                    resource = _attrs(rs.resource.attributes)
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            self.spans.append({
                                "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex() or None, "attributes": _attrs(s.attributes),
                                "links": [link.span_id.hex() for link in s.links], "resource": resource})
                return trace_service_pb2.ExportTraceServiceResponse()
            for rm in request.resource_metrics:
                resource = _attrs(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        data = getattr(m, m.WhichOneof("data"))
                        for p in data.data_points:
                            self.points.append({"name": m.name, "attributes": _attrs(p.attributes),
                                                "resource": resource, "point": p})
            return metrics_service_pb2.ExportMetricsServiceResponse()

    def wait_for(self, condition, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                result = condition(self)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.2)

    def span_names(self) -> set[str]:
        return {s["name"] for s in self.spans}

    def metric_names(self) -> set[str]:
        return {p["name"] for p in self.points}

    def stop(self) -> None:
        self.server.stop(grace=None)
