"""OTLP export to a small collector on 127.0.0.1: from this process, and end to end from a served engine, whose
ingress, router, workers and controller each export their own spans and metrics."""

from __future__ import annotations

import grpc
import pytest
from ray import serve

from moeray import telemetry
from moeray.telemetry import TelemetryConfig
from moeray.serving.ports import free_port
from otlp_collector import Collector

CALLER_TRACE = "5b8efff798038103d269b633813fc60c"
TRACEPARENT = f"00-{CALLER_TRACE}-eee19b7ec3c1b174-01"


@pytest.fixture
def collector():
    c = Collector()
    try:
        yield c
    finally:
        c.stop()


def test_spans_and_metrics_reach_the_collector_with_headers(collector):
    telemetry.configure(TelemetryConfig(otlp_endpoint=collector.endpoint, otlp_headers={"x-tenant": "moe"},
                                        export_interval_s=0.2, service_name="moeray-test"))
    try:
        span = telemetry.rpc_span("moeray.v1.GenerateService/Generate", [("traceparent", TRACEPARENT)])
        span.end()
        telemetry.rejected(grpc.StatusCode.RESOURCE_EXHAUSTED)
        telemetry.M.dispatch_latency.record(0.003, telemetry.attrs(layer=1))
        telemetry.flush()
    finally:
        telemetry.shutdown()
    assert collector.wait_for(lambda c: {"moeray_rejected_requests", "moeray_dispatch_latency_seconds"}
                              <= c.metric_names() and c.spans)
    (received,) = collector.spans
    assert received["name"] == "moeray.v1.GenerateService/Generate" and received["trace_id"] == CALLER_TRACE
    assert received["resource"]["service.name"] == "moeray-test"
    rejected = next(p for p in collector.points if p["name"] == "moeray_rejected_requests")
    assert rejected["attributes"] == {"code": "RESOURCE_EXHAUSTED"} and rejected["point"].as_int == 1
    assert all(h.get("x-tenant") == "moe" for h in collector.headers)


@pytest.mark.ray
def test_served_engine_exports_request_step_and_dispatch_traces_and_metrics(collector, checkpoints):
    from conftest import _ray_start
    from moeray import Engine, EngineConfig
    from moeray.placement.config import ControllerConfig
    from moeray.serving.app import start_serving
    from moeray.serving.gen import generate_pb2, generate_pb2_grpc

    config = EngineConfig(model=checkpoints["mixtral"], workers=2, max_new_tokens_cap=64,
                          controller=ControllerConfig(poll_interval_s=0.2),
                          telemetry=TelemetryConfig(otlp_endpoint=collector.endpoint, export_interval_s=0.5))
    with _ray_start():
        engine = Engine(config)
        try:
            port = free_port()
            start_serving(engine, grpc_port=port, http_port=free_port())
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=60)
                stub = generate_pb2_grpc.GenerateServiceStub(channel)
                request = generate_pb2.GenerateRequest(prompt_ids=generate_pb2.TokenIds(ids=[5, 6, 7]),
                                                       sampling=generate_pb2.SamplingParams(max_new_tokens=4,
                                                                                            ignore_eos=True))
                chunks = list(stub.Generate(request, timeout=60, metadata=[("traceparent", TRACEPARENT)]))
                assert sum(len(c.token_ids) for c in chunks) == 4
                with pytest.raises(grpc.RpcError) as bad:
                    list(stub.Generate(generate_pb2.GenerateRequest(), timeout=60))
                assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            expected_metrics = {"moeray_expert_compute_seconds", "moeray_dispatch_latency_seconds",
                                "moeray_time_to_first_token_seconds", "moeray_request_latency_seconds",
                                "moeray_expert_tokens", "moeray_imbalance_ratio", "moeray_workers_alive",
                                "moeray_rejected_requests"}
            expected_spans = {"moeray.v1.GenerateService/Generate", "moeray.router.request", "moeray.step",
                              "moeray.dispatch"}
            assert collector.wait_for(lambda c: expected_metrics <= c.metric_names()
                                      and expected_spans <= c.span_names()), (
                sorted(expected_metrics - collector.metric_names()), sorted(expected_spans - collector.span_names()))
        finally:
            serve.shutdown()
            engine.shutdown()

    spans = {name: [s for s in collector.spans if s["name"] == name] for name in expected_spans}
    ingress = next(s for s in spans["moeray.v1.GenerateService/Generate"] if s["trace_id"] == CALLER_TRACE)
    assert ingress["parent"] == "eee19b7ec3c1b174" and ingress["resource"]["moeray.role"] == "ingress"
    router = next(s for s in spans["moeray.router.request"] if s["trace_id"] == CALLER_TRACE)
    assert router["parent"] == ingress["span_id"] and router["resource"]["moeray.role"] == "router"
    steps = [s for s in spans["moeray.step"] if router["span_id"] in s["links"]]
    assert [s["attributes"]["moeray.step.kind"] for s in steps] == ["prefill"] + ["decode"] * 3
    step_ids = {s["span_id"] for s in steps}
    dispatches = [d for d in spans["moeray.dispatch"] if d["parent"] in step_ids]
    assert len(dispatches) == len(steps) * len(engine.spec.moe_layers)
    assert {d["attributes"]["moeray.tokens"] for d in dispatches} == {3, 1}
    assert all(d["attributes"]["moeray.plan.epoch"] == 0 and d["attributes"]["moeray.workers_touched"] >= 1
               for d in dispatches)

    def points(name):
        return [p for p in collector.points if p["name"] == name]

    assert {p["resource"]["moeray.role"] for p in points("moeray_expert_compute_seconds")} == {"worker"}
    assert {p["attributes"]["worker"] for p in points("moeray_expert_compute_seconds")} <= {0, 1}
    assert {p["resource"]["moeray.role"] for p in points("moeray_expert_tokens")} == {"controller"}
    assert max(p["point"].as_int for p in points("moeray_expert_tokens")) > 0
    assert points("moeray_workers_alive")[-1]["point"].as_int == 2
    assert any(p["attributes"] == {"code": "INVALID_ARGUMENT"} for p in points("moeray_rejected_requests"))
    roles = {p["resource"]["moeray.role"] for p in collector.points}
    assert roles == {"ingress", "router", "worker", "controller"}
