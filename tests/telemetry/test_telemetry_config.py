"""TelemetryConfig validation, per-process ports, off-by-default, and W3C traceparent continuation."""

from __future__ import annotations

import pytest
from opentelemetry import trace

from moeray import telemetry
from moeray.telemetry import TelemetryConfig
from otel_helpers import otel

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


@pytest.mark.parametrize("kwargs, message", [
    ({"prometheus_port": 0}, "prometheus_port must be in 1..65535; got 0"),
    ({"prometheus_port": 70000}, "got 70000"),
    ({"otlp_endpoint": " "}, "otlp_endpoint is empty"),
    ({"otlp_headers": {"x-token": 3}}, "otlp_headers must map strings to strings"),
    ({"trace_sample_ratio": 1.5}, "trace_sample_ratio must be in [0, 1]; got 1.5"),
    ({"export_interval_s": 0}, "export_interval_s must be > 0; got 0"),
    ({"service_name": ""}, "service_name is empty"),
    ({"role": "gateway"}, "role 'gateway' is not one of"),
])
def test_bad_config_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TelemetryConfig(**kwargs)


def test_config_is_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        TelemetryConfig("http://127.0.0.1:4317")  # type: ignore[misc]
    with pytest.raises(AttributeError):
        TelemetryConfig().prometheus_port = 1  # type: ignore[misc]


def test_each_process_gets_its_own_prometheus_port():
    base = TelemetryConfig(prometheus_port=9400)
    ports = [base.for_process("ingress").prometheus_port, base.for_process("controller").prometheus_port]
    ports += [base.for_process("router", i, routers=2).prometheus_port for i in range(2)]
    ports += [base.for_process("worker", w, routers=2).prometheus_port for w in range(3)]
    assert ports == list(range(9400, 9407))
    worker = base.for_process("worker", 2, routers=2)
    assert (worker.role, worker.index, worker.prometheus_host) == ("worker", 2, "127.0.0.1")
    assert TelemetryConfig().for_process("router", 1).prometheus_port is None
    with pytest.raises(ValueError, match="65535"):
        TelemetryConfig(prometheus_port=65535).for_process("controller")


def test_off_by_default_uses_the_no_op_api():
    telemetry.configure(TelemetryConfig())  # no exporter: stays off
    assert not (telemetry.STATE.on or telemetry.STATE.tracing or telemetry.STATE.metrics)
    assert isinstance(telemetry.STATE.tracer, trace.NoOpTracer)
    assert telemetry.rpc_span("moeray.v1.GenerateService/Generate", [("traceparent", TRACEPARENT)]) is None
    with telemetry.request_span("moeray.router.request", TRACEPARENT) as span:
        assert span is None
    assert telemetry.dispatch_span(0, 0) is None
    telemetry.dispatched(None, 0, 0.1, 4, 2)  # nothing to record, nothing raised
    telemetry.M.dispatch_latency.record(0.1)  # the no-op meter's instruments accept calls
    telemetry.setup(TelemetryConfig())  # an actor given the default config configures nothing
    assert not telemetry.STATE.on


def test_ingress_span_continues_the_callers_traceparent_and_the_router_continues_it():
    with otel() as o:
        metadata = [("traceparent", TRACEPARENT), ("user-agent", "grpc-python")]
        rpc = telemetry.rpc_span("moeray.v1.GenerateService/Generate", metadata)
        parent = telemetry.traceparent(rpc)
        assert parent.startswith(f"00-{CALLER_TRACE}-")
        with telemetry.request_span("moeray.router.request", parent, request_id="r1") as router_span:
            assert router_span.is_recording()
        rpc.end()
        (ingress,) = o.spans("moeray.v1.GenerateService/Generate")
        (router,) = o.spans("moeray.router.request")
        assert format(ingress.context.trace_id, "032x") == CALLER_TRACE
        assert format(ingress.parent.span_id, "016x") == CALLER_SPAN
        assert ingress.kind == trace.SpanKind.SERVER
        assert dict(ingress.attributes) == {"rpc.system": "grpc", "rpc.service": "moeray.v1.GenerateService",
                                            "rpc.method": "Generate"}
        assert router.context.trace_id == ingress.context.trace_id
        assert router.parent.span_id == ingress.context.span_id
        assert router.attributes["moeray.request_id"] == "r1"
        # A call without a traceparent starts a new trace.
        fresh = telemetry.rpc_span("inference.GRPCInferenceService/ModelInfer", [])
        fresh.end()
        assert fresh.parent is None and format(fresh.get_span_context().trace_id, "032x") != CALLER_TRACE
        # The router span recorded the request latency.
        (latency,) = o.metrics()["moeray_request_latency_seconds"]
        assert latency.count == 1


def test_a_failed_request_marks_its_span_as_an_error():
    with otel() as o:
        with pytest.raises(RuntimeError), telemetry.request_span("moeray.router.request", None):
            raise RuntimeError("expert worker 1 died")
        (span,) = o.spans()
        assert span.status.status_code == trace.StatusCode.ERROR
        assert span.events[0].name == "exception"


def test_rejections_are_counted_by_status_code():
    import grpc

    with otel() as o:
        telemetry.rejected(grpc.StatusCode.INVALID_ARGUMENT)
        telemetry.rejected(grpc.StatusCode.INVALID_ARGUMENT)
        telemetry.rejected("UNAUTHENTICATED")
        points = o.metrics()["moeray_rejected_requests"]
        assert {p.attributes["code"]: p.value for p in points} == {"INVALID_ARGUMENT": 2, "UNAUTHENTICATED": 1}


class FakeContext:
    def __init__(self, metadata):
        self.metadata = metadata

    def invocation_metadata(self):
        return self.metadata


class FakeIngress:
    @telemetry.traced_rpc("moeray.v1.GenerateService/Generate")
    async def Generate(self, request, grpc_context):
        self.sent = telemetry.current_traceparent()  # what the ingress passes to the router
        for token in request:
            yield token

    @telemetry.traced_rpc("inference.GRPCInferenceService/ModelInfer")
    async def ModelInfer(self, request, grpc_context):
        self.sent = telemetry.current_traceparent()
        if request == "bad":
            raise ValueError("token id 999 is outside the vocabulary [0, 131)")
        return request


def test_traced_rpc_spans_handlers_and_hands_the_router_a_child_traceparent():
    import asyncio
    import inspect

    ingress = FakeIngress()
    # Serve passes grpc_context only to handlers whose signature names it, and streams async generators.
    assert "grpc_context" in inspect.signature(ingress.Generate).parameters
    assert inspect.isasyncgenfunction(FakeIngress.Generate) and inspect.iscoroutinefunction(FakeIngress.ModelInfer)

    async def stream(request, ctx):
        return [t async for t in ingress.Generate(request, grpc_context=ctx)]

    assert asyncio.run(stream([1, 2], FakeContext([("traceparent", TRACEPARENT)]))) == [1, 2]  # off: unchanged
    assert ingress.sent is None
    with otel() as o:
        assert asyncio.run(stream([1, 2, 3], FakeContext([("traceparent", TRACEPARENT)]))) == [1, 2, 3]
        (span,) = o.spans("moeray.v1.GenerateService/Generate")
        assert format(span.context.trace_id, "032x") == CALLER_TRACE
        assert ingress.sent == f"00-{CALLER_TRACE}-{span.context.span_id:016x}-01"
        assert telemetry.current_traceparent() is None  # only inside the call
        with pytest.raises(ValueError):
            asyncio.run(ingress.ModelInfer("bad", grpc_context=FakeContext([])))
        (failed,) = o.spans("inference.GRPCInferenceService/ModelInfer")
        assert failed.status.status_code == trace.StatusCode.ERROR and failed.parent is None
        assert "outside the vocabulary" in failed.status.description
