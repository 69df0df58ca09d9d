"""The metrics moeray exports: their names, kinds, units, attributes and owning process (``METRICS``, which the
README's Telemetry table lists as Prometheus sees them), and the OpenTelemetry instruments made from them."""

from __future__ import annotations

import functools
import weakref

try:
    from opentelemetry import metrics  # annotations only
except ImportError:  # a machine without OpenTelemetry: telemetry stays off (moeray.telemetry._noop)
    metrics = None

_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_REQUEST_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_RATIO = (1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 1.75, 2, 2.5, 3, 4, 6, 8, 16)

# name, kind, unit, attributes, process, description (names, attributes and words follow DESIGN.md's glossary)
METRICS: tuple[tuple[str, str, str, tuple[str, ...], str, str], ...] = (
    ("moeray_expert_tokens", "observable_counter", "1", ("layer", "expert"), "controller",
     "(token, expert) pairs routed to each logical expert of each MoE layer"),
    ("moeray_worker_tokens", "observable_counter", "1", ("layer", "worker"), "controller",
     "(token, expert) pairs sent to each worker per MoE layer"),
    ("moeray_worker_expected_tokens", "observable_counter", "1", ("layer", "worker"), "controller",
     "(token, expert) pairs the plan in force expected each worker to get (its experts' pairs over their replicas)"),
    ("moeray_imbalance_ratio", "observable_gauge", "1", ("layer",), "controller",
     "max worker load / mean worker load over the load window (1.0 is perfect)"),
    ("moeray_routing_gap_ratio", "observable_gauge", "1", ("layer",), "controller",
     "max over workers of |received - expected| / mean expected pairs over the load window (0 is exact)"),
    ("moeray_step_imbalance_ratio", "histogram", "1", ("layer",), "controller",
     "max worker load / mean worker load of each step"),
    ("moeray_plan_epoch", "observable_gauge", "1", (), "controller", "the epoch of the plan in force"),
    ("moeray_rebalances", "counter", "1", ("reason",), "controller",
     "applied rebalances by reason: manual, imbalance, schedule"),
    ("moeray_migrated_slots", "counter", "1", (), "controller", "slots loaded onto workers by rebalances"),
    ("moeray_migrated_bytes", "counter", "By", (), "controller", "expert weight bytes moved by rebalances"),
    ("moeray_workers_alive", "gauge", "1", (), "controller", "expert workers answering a ping"),
    ("moeray_worker_losses", "counter", "1", (), "controller", "expert workers found dead"),
    ("moeray_restore_seconds", "histogram", "s", (), "controller",
     "from a loss being reported to every lost expert served again (restore or replacement)"),
    ("moeray_dispatch_latency_seconds", "histogram", "s", ("layer",), "router",
     "one MoE layer's dispatch → expert compute → combine, as the router waits for it"),
    ("moeray_step_latency_seconds", "histogram", "s", ("kind",), "router",
     "one engine step's forward (prefill or decode)"),
    ("moeray_request_latency_seconds", "histogram", "s", (), "router", "a request from submission to its end"),
    ("moeray_time_to_first_token_seconds", "histogram", "s", (), "router", "submission to the first new token"),
    ("moeray_inter_token_latency_seconds", "histogram", "s", (), "router", "between consecutive new tokens"),
    ("moeray_queue_depth", "gauge", "1", (), "router", "requests waiting to join the running batch"),
    ("moeray_expert_compute_seconds", "histogram", "s", ("worker", "layer"), "worker",
     "a worker's grouped expert compute for one layer call"),
    ("moeray_rejected_requests", "counter", "1", ("code",), "ingress", "requests the ingress answered with an error, by gRPC status code"),
    ("moeray_requests_migrated", "counter", "1", (), "ingress",
     "requests whose router died as they ran, gone on at another router from the tokens they had streamed"),
    ("moeray_requests_running", "gauge", "1", (), "ingress",
     "requests admitted and running at the routers (the admission counter: gRPC and HTTP)"),
    ("moeray_requests_waiting", "gauge", "1", (), "ingress",
     "requests admitted and waiting in the ingress for a running slot (the admission counter)"),
    ("moeray_kv_cache_bytes", "gauge", "By", (), "router",
     "bytes of the router's KV pool held by blocks in use (after each step)"),
    ("moeray_kv_cache_usage_ratio", "gauge", "1", (), "router",
     "the fraction of the router's KV pool blocks in use (after each step)"),
    ("moeray_preemptions", "counter", "1", (), "router",
     "sequences preempted because the KV pool ran out (recomputed when re-admitted)"),
    ("moeray_prefix_cache_queries", "counter", "1", (), "router",
     "prompt tokens looked up in the prefix cache at admission"),
    ("moeray_prefix_cache_hits", "counter", "1", (), "router",
     "prompt tokens found in the prefix cache (their prefill skipped)"),
    ("moeray_prompt_tokens", "counter", "1", (), "router", "prompt tokens prefilled for generation requests"),
    ("moeray_generation_tokens", "counter", "1", (), "router", "new tokens generated"),
)
_BUCKETS = {"moeray_step_imbalance_ratio": _RATIO, "moeray_request_latency_seconds": _REQUEST_S,
            "moeray_restore_seconds": _REQUEST_S,
            "moeray_time_to_first_token_seconds": _TOKEN_S, "moeray_inter_token_latency_seconds": _TOKEN_S}


def prometheus_names() -> set[str]:
    """The metric names Prometheus sees (counters gain ``_total``; histograms ``_bucket``, ``_sum``, ``_count``)."""
    out = set()
    for name, kind, *_ in METRICS:
        if kind.endswith("counter"):
            out.add(name + "_total")
        elif kind == "histogram":
            out.update(name + s for s in ("_bucket", "_sum", "_count"))
        else:
            out.add(name)
    return out


class Instruments:
    """The instruments of ``METRICS``, by name without the ``moeray_`` prefix (no-op ones until configured)."""

    def __init__(self, meter: metrics.Meter) -> None:
        for name, kind, unit, _, _, description in METRICS:
            key = name.removeprefix("moeray_").removesuffix("_seconds")
            if kind == "counter":
                inst = meter.create_counter(name, unit=unit, description=description)
            elif kind == "gauge":
                inst = meter.create_gauge(name, unit=unit, description=description)
            elif kind == "histogram":
                inst = meter.create_histogram(name, unit=unit, description=description,
                                              explicit_bucket_boundaries_advisory=_BUCKETS.get(name, _S))
            else:
                create = meter.create_observable_counter if kind == "observable_counter" else \
                    meter.create_observable_gauge
                inst = create(name, callbacks=[functools.partial(_observe, key)], unit=unit, description=description)
            setattr(self, key, inst)


SOURCES: weakref.WeakSet = weakref.WeakSet()  # objects with observe(key), feeding the observable instruments
# (moeray.placement.runtime.metrics.ControllerMetrics registers itself here)


def _observe(key: str, options=None):
    for source in list(SOURCES):
        yield from source.observe(key)
