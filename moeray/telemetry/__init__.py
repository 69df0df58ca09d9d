"""Telemetry: OpenTelemetry traces and metrics, exported over OTLP/gRPC or served to Prometheus; off by default.

    gRPC call ─▶ ingress span  "moeray.v1.GenerateService/Generate"  (continues the caller's W3C traceparent)
                   │ traceparent travels with the router call
                   ▼
                 router span   "moeray.router.request"  (child of the ingress span; submitted → finished)
    step loop ─▶ step span     "moeray.step"  (batch size, prefill/decode; *links* to its batch's request spans)
                   └─ "moeray.dispatch" per MoE layer (layer, tokens, workers touched, plan epoch)
    controller ─▶ "moeray.rebalance"

NOTE: a step serves every request in its batch, so it is not the child of any one of them. Its span starts a trace
of its own and carries a span link to each request span it served (and the layer dispatches are its children).
Copying the step under each request instead would multiply span volume by the batch size and count shared time
once per request; with links a trace viewer still goes from a request to the steps that served it and back.

Every Ray actor is its own process: the engine passes a ``TelemetryConfig`` to the ingress, routers, workers and
the controller, and each calls ``configure`` once. Unconfigured, the tracer and meter are OpenTelemetry's no-op
ones and the hot paths test ``STATE.on`` before building any attribute. Metric names: ``METRICS`` (the README's
Telemetry table lists the same ones as Prometheus sees them).

Here: each process's set-up, spans and the hot paths' recording calls. ``config.py`` holds ``TelemetryConfig`` and
its flags, ``instruments.py`` the metric table and its instruments; call sites reach all of it as ``telemetry.NAME``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import os
import threading
import time

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # NOTE: a machine without OpenTelemetry (make gpu-check's) runs with telemetry off
    from moeray.telemetry._noop import TraceContextTextMapPropagator, metrics, otel_context, trace

    OPENTELEMETRY = False
else:
    OPENTELEMETRY = True

from moeray.telemetry.config import ROLES, TelemetryConfig, add_cli_flags, config_from_args, prometheus_targets
from moeray.telemetry.instruments import METRICS, SOURCES, Instruments, prometheus_names

__all__ = [  # config.py's and instruments.py's names, re-exported; then this module's
    "ROLES", "TelemetryConfig", "add_cli_flags", "config_from_args", "prometheus_targets", "METRICS", "SOURCES",
    "Instruments", "prometheus_names",
    "STATE", "M", "configure", "setup", "shutdown", "flush", "attrs", "extract", "traceparent", "rpc_span",
    "traced_rpc", "current_traceparent", "request_span", "step_span", "dispatch_span", "dispatched",
    "tokens_emitted", "kv_cache", "prefix_lookup", "preempted", "admission", "queue_depth", "rejected",
]
# NOTE: configure rebinds ``M``: read it as ``telemetry.M`` at each use, never import it by name.


log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()


class _State:
    def __init__(self) -> None:
        self.config: TelemetryConfig | None = None
        self.tracing = self.metrics = self.on = False
        self.tracer: trace.Tracer = trace.NoOpTracer()
        self.tracer_provider = self.meter_provider = self.prometheus_server = None


STATE = _State()
M = Instruments(metrics.NoOpMeter("moeray"))
_lock = threading.Lock()


def configure(config: TelemetryConfig | None, *, span_exporters=(), metric_readers=()) -> None:
    """Set this process's tracer and meter from ``config`` (replacing an earlier configuration). With no exporter
    (the default config) telemetry stays off. ``span_exporters`` / ``metric_readers``: extra SDK exporters and
    readers (tests pass in-memory ones)."""
    global M
    with _lock:
        _shutdown_locked()
        if config is None:
            config = TelemetryConfig()
        if not (config.enabled or span_exporters or metric_readers):
            return
        if not OPENTELEMETRY:
            raise ImportError("moeray telemetry needs OpenTelemetry, which is not installed: pip install "
                              "opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc "
                              "opentelemetry-exporter-prometheus (or leave telemetry off)")
        from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider, ObservableCounter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        resource = Resource.create({
            "service.name": config.service_name, "service.instance.id": f"{config.role}-{config.index}-{os.getpid()}",
            "moeray.role": config.role, "moeray.index": config.index})
        interval_ms = config.export_interval_s * 1000
        limits = {ObservableCounter: 1 << 18}  # layers x experts series; the SDK's default caps a stream at 2000
        tracer_provider = TracerProvider(resource=resource,
                                         sampler=ParentBased(TraceIdRatioBased(config.trace_sample_ratio)))
        readers = list(metric_readers)
        if config.otlp_endpoint is not None:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            kwargs = {"endpoint": config.otlp_endpoint, "insecure": not config.otlp_endpoint.startswith("https://"),
                      "headers": dict(config.otlp_headers) or None}
            tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(**kwargs),
                                                                  schedule_delay_millis=interval_ms))
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(**kwargs), interval_ms,
                                                         cardinality_limits=limits))
        for exporter in span_exporters:
            tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        if config.prometheus_port is not None:
            readers.extend(_prometheus(config, limits))
        STATE.tracing = config.otlp_endpoint is not None or bool(span_exporters)
        if STATE.tracing:
            STATE.tracer_provider, STATE.tracer = tracer_provider, tracer_provider.get_tracer("moeray")
        else:
            tracer_provider.shutdown()
        if readers:
            # No exemplars: they cost each hot-path record a sampling decision, and moeray exports none.
            STATE.meter_provider = MeterProvider(resource=resource, metric_readers=readers,
                                                 exemplar_filter=AlwaysOffExemplarFilter())
            M = Instruments(STATE.meter_provider.get_meter("moeray"))
        STATE.config, STATE.metrics = config, bool(readers)
        STATE.on = STATE.tracing or STATE.metrics


def setup(config: TelemetryConfig | None) -> None:
    """What each actor calls at start: ``configure(config)`` when it turns an exporter on, else nothing."""
    if config is not None and config.enabled:
        configure(config)


def _prometheus(config: TelemetryConfig, limits: dict) -> list:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry, cardinality_limits=limits)
    try:
        STATE.prometheus_server, _ = start_http_server(config.prometheus_port, config.prometheus_host,
                                                       registry=registry)
    except OSError as e:  # e.g. two processes given one port: keep serving, without this endpoint
        log.warning("moeray telemetry: cannot serve Prometheus metrics on %s:%d (%s)", config.prometheus_host,
                    config.prometheus_port, e)
        reader.shutdown()
        return []
    log.info("moeray telemetry: Prometheus metrics on http://%s:%d/metrics", config.prometheus_host,
             config.prometheus_port)
    return [reader]


def shutdown() -> None:
    """Flush and stop this process's exporters; telemetry is off afterwards."""
    with _lock:
        _shutdown_locked()


def _shutdown_locked() -> None:
    global M
    on = STATE.on
    STATE.on = STATE.tracing = STATE.metrics = False
    for provider in (STATE.tracer_provider, STATE.meter_provider):
        if provider is not None:
            try:
                provider.shutdown()
            except Exception:  # an exporter failing to flush must not fail the caller
                log.exception("moeray telemetry: shutdown of %s failed", type(provider).__name__)
    if STATE.prometheus_server is not None:
        STATE.prometheus_server.shutdown()
        STATE.prometheus_server.server_close()
    if on:
        STATE.__init__()
        M = Instruments(metrics.NoOpMeter("moeray"))


def flush() -> None:
    """Export what is buffered now (before an actor is killed)."""
    for provider in (STATE.tracer_provider, STATE.meter_provider):
        if provider is not None:
            provider.force_flush()


@functools.lru_cache(maxsize=4096)
def attrs(**kwargs) -> dict:
    """A shared attribute dict per distinct set of values (hot paths reuse them instead of building new ones)."""
    return dict(kwargs)


# -- trace context across processes ------------------------------------------------------------------------
def extract(metadata) -> otel_context.Context:
    """The caller's trace context from gRPC invocation metadata ((key, value) pairs) or a traceparent string."""
    if isinstance(metadata, str):
        metadata = {"traceparent": metadata}
    return _PROPAGATOR.extract(dict(metadata or ()))


def traceparent(span) -> str | None:
    """``span``'s W3C traceparent, to send with a call into another process."""
    if span is None or not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def rpc_span(method: str, metadata):
    """The ingress's span of one gRPC call ('package.Service/Method'), continuing the caller's traceparent.
    Not made current: Serve iterates streaming handlers across tasks. None when tracing is off."""
    if not STATE.tracing:
        return None
    service, _, name = method.rpartition("/")
    return STATE.tracer.start_span(method, context=extract(metadata), kind=trace.SpanKind.SERVER, attributes={
        "rpc.system": "grpc", "rpc.service": service, "rpc.method": name})


_RPC_SPAN: contextvars.ContextVar = contextvars.ContextVar("moeray_rpc_span", default=None)


def traced_rpc(method: str):
    """Decorate an ingress handler (a coroutine or async generator taking ``grpc_context``): one span per call,
    continuing the caller's traceparent; inside it, ``current_traceparent()`` is what to send to the router.
    The wrapper keeps the handler's signature, so Serve still passes ``grpc_context``."""
    def wrap(fn):
        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def handler(self, request, **kwargs):
                started = _rpc_start(method, kwargs)
                try:
                    async for item in fn(self, request, **kwargs):
                        yield item
                except BaseException as e:
                    started = _rpc_end(started, e)
                    raise
                finally:
                    _rpc_end(started)
        else:
            @functools.wraps(fn)
            async def handler(self, request, **kwargs):
                started = _rpc_start(method, kwargs)
                try:
                    return await fn(self, request, **kwargs)
                except BaseException as e:
                    started = _rpc_end(started, e)
                    raise
                finally:
                    _rpc_end(started)
        return handler
    return wrap


def _rpc_start(method: str, kwargs: dict):
    ctx = kwargs.get("grpc_context")
    if not STATE.tracing or ctx is None:
        return None
    span = rpc_span(method, ctx.invocation_metadata())
    return span, _RPC_SPAN.set(span)


def _rpc_end(started, error: BaseException | None = None) -> None:
    """End the span ``_rpc_start`` started (once: returns None to clear the caller's handle)."""
    if started is None:
        return None
    span, token = started
    if error is not None and not isinstance(error, GeneratorExit):
        span.set_status(trace.StatusCode.ERROR, str(error))
    span.end()
    with contextlib.suppress(ValueError):  # a generator resumed in another context
        _RPC_SPAN.reset(token)
    return None


def current_traceparent() -> str | None:
    """The traceparent of the ingress call being handled (None when tracing is off)."""
    return traceparent(_RPC_SPAN.get()) if STATE.tracing else None


@contextlib.contextmanager
def request_span(name: str, parent: str | None, request_id: str | None = None, current: bool = False):
    """A router's span of one request (child of the ingress's, from its traceparent); records its latency."""
    if not STATE.on:
        yield None
        return
    started = time.perf_counter()
    span = STATE.tracer.start_span(name, context=extract(parent) if parent else None,
                                   attributes={"moeray.request_id": request_id or ""})
    try:
        if current:
            with trace.use_span(span, end_on_exit=False):
                yield span
        else:
            yield span
    except GeneratorExit:  # a stream's reader left: the request is aborted, not failed
        span.set_attribute("moeray.aborted", True)
        raise
    except BaseException as e:
        span.record_exception(e)
        span.set_status(trace.StatusCode.ERROR, str(e))
        raise
    finally:
        span.end()
        if STATE.metrics and name == "moeray.router.request":
            M.request_latency.record(time.perf_counter() - started)


def step_span(kind: str, seqs) -> contextlib.AbstractContextManager:
    """The span of one engine step over ``seqs`` (a fresh trace linked to each request span), timing it."""
    if not STATE.on or not seqs:
        return contextlib.nullcontext()
    return _step_span(kind, seqs)


@contextlib.contextmanager
def _step_span(kind: str, seqs):
    started = time.perf_counter()
    links = [trace.Link(s.span.get_span_context()) for s in seqs
             if getattr(s, "span", None) is not None and s.span.get_span_context().is_valid]
    with STATE.tracer.start_as_current_span("moeray.step", context=otel_context.Context(), links=links, attributes={
            "moeray.step.kind": kind, "moeray.batch_size": len(seqs)}) as span:
        yield span
    if STATE.metrics:
        M.step_latency.record(time.perf_counter() - started, attrs(kind=kind))


def dispatch_span(layer: int, epoch: int):
    """A span for one MoE layer's dispatch (child of the current step span); None unless it would be recorded."""
    if not STATE.tracing or not trace.get_current_span().is_recording():
        return None
    return STATE.tracer.start_span("moeray.dispatch", attributes={"moeray.layer": layer, "moeray.plan.epoch": epoch})


def dispatched(span, layer: int, seconds: float, tokens: int, workers: int) -> None:
    if span is not None:
        span.set_attribute("moeray.tokens", tokens)
        span.set_attribute("moeray.workers_touched", workers)
        span.end()
    if STATE.metrics:
        M.dispatch_latency.record(seconds, attrs(layer=layer))


# -- router-side request metrics ---------------------------------------------------------------------------
def tokens_emitted(seqs) -> None:
    """A step produced one token for each of ``seqs`` (Sequences with ``arrived_s`` and ``last_token_s``)."""
    if not STATE.metrics:
        return
    now = time.perf_counter()
    prompt = 0
    for seq in seqs:
        if seq.last_token_s:
            M.inter_token_latency.record(now - seq.last_token_s)
        else:
            M.time_to_first_token.record(now - seq.arrived_s)
            prompt += len(seq.prompt_ids)
        seq.last_token_s = now
    M.generation_tokens.add(len(seqs))
    if prompt:
        M.prompt_tokens.add(prompt)


def kv_cache(stats) -> None:
    """The router's KV pool after a step (a scheduler ``KVStats``)."""
    if STATE.metrics:
        M.kv_cache_bytes.set(stats.blocks_used * stats.block_size * stats.bytes_per_token)
        M.kv_cache_usage_ratio.set(stats.usage)


def prefix_lookup(queries: int, hits: int) -> None:
    """A sequence was admitted: ``queries`` prompt tokens looked up in the prefix cache, ``hits`` found."""
    if STATE.metrics:
        M.prefix_cache_queries.add(queries)
        M.prefix_cache_hits.add(hits)


def preempted() -> None:
    if STATE.metrics:
        M.preemptions.add(1)


def admission(running: int, waiting: int) -> None:
    """The ingress's admission counter changed (moeray/serving/admission.py)."""
    if STATE.metrics:
        M.requests_running.set(running)
        M.requests_waiting.set(waiting)


def queue_depth(waiting: int) -> None:
    if STATE.metrics:
        M.queue_depth.set(waiting)


def request_migrated() -> None:
    """A request's router died as it ran; the ingress moved it to another (moeray/serving/engine_handle.py)."""
    if STATE.metrics:
        M.requests_migrated.add(1)


def rejected(code) -> None:
    """The ingress refused a request with gRPC status ``code`` (a grpc.StatusCode or its name)."""
    if STATE.metrics:
        M.rejected_requests.add(1, attrs(code=getattr(code, "name", str(code))))
