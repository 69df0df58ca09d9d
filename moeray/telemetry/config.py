"""``TelemetryConfig``: where each process exports traces and metrics, and ``moeray serve``'s flags for it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

ROLES = ("engine", "ingress", "controller", "router", "worker")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TelemetryConfig:
    otlp_endpoint: str | None = None  # an OTLP/gRPC collector, e.g. 'http://127.0.0.1:4317' ('https://' for TLS)
    otlp_headers: Mapping[str, str] = dataclasses.field(default_factory=dict)  # e.g. an auth header
    prometheus_port: int | None = None  # base port: each process serves /metrics on base + its offset
    prometheus_host: str = "127.0.0.1"
    service_name: str = "moeray"
    export_interval_s: float = 10.0  # OTLP metric export period and span batch delay
    trace_sample_ratio: float = 1.0  # of new traces (a caller's sampled traceparent is always followed)
    # per (layer, expert) token series: True all (layers x experts series), False none, an int N the N experts of
    # each layer with the most tokens since the start (layers x N series)
    expert_metrics: bool | int = True
    role: str = "engine"  # set per process by for_process
    index: int = 0

    def __post_init__(self) -> None:
        if self.otlp_endpoint is not None and not self.otlp_endpoint.strip():
            raise ValueError("otlp_endpoint is empty; use None to turn OTLP export off")
        bad = {k: v for k, v in dict(self.otlp_headers).items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise ValueError(f"otlp_headers must map strings to strings; got {sorted(map(repr, bad))}")
        if self.prometheus_port is not None and not 1 <= self.prometheus_port <= 65535:
            raise ValueError(f"prometheus_port must be in 1..65535; got {self.prometheus_port}")
        if not self.service_name:
            raise ValueError("service_name is empty")
        if self.export_interval_s <= 0:
            raise ValueError(f"export_interval_s must be > 0; got {self.export_interval_s}")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ValueError(f"trace_sample_ratio must be in [0, 1]; got {self.trace_sample_ratio}")
        if not isinstance(self.expert_metrics, (bool, int)) or self.expert_metrics < 0:
            raise ValueError(f"expert_metrics must be True, False or a count of experts per layer >= 1; "
                             f"got {self.expert_metrics!r}")
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {ROLES}")

    @property
    def enabled(self) -> bool:
        return self.otlp_endpoint is not None or self.prometheus_port is not None

    def for_process(self, role: str, index: int = 0, *, routers: int = 1) -> TelemetryConfig:
        """This config for one process, its Prometheus port offset by role: ingress +0, controller +1,
        routers +2.., workers after the routers (so processes on one node never share a port)."""
        offset = {"ingress": 0, "controller": 1, "router": 2 + index, "worker": 2 + routers + index}.get(role, 0)
        port = None if self.prometheus_port is None else self.prometheus_port + offset
        if port is not None and port > 65535:
            raise ValueError(f"prometheus_port {self.prometheus_port} + offset {offset} for {role} {index} > 65535")
        return dataclasses.replace(self, role=role, index=index, prometheus_port=port)


def add_cli_flags(parser) -> None:
    """``moeray serve``'s telemetry flags."""
    group = parser.add_argument_group("telemetry (see README: Telemetry)")
    group.add_argument("--otlp-endpoint", help="send traces and metrics over OTLP/gRPC to this collector, e.g. "
                       "http://127.0.0.1:4317 (https:// for TLS)")
    group.add_argument("--otlp-header", action="append", default=[], metavar="KEY=VALUE",
                       help="a header for the collector (e.g. authorization=Bearer ...); repeatable")
    group.add_argument("--prometheus-port", type=int, help="serve /metrics from each process: the ingress on this "
                       "port, the controller on +1, routers and workers after")
    group.add_argument("--prometheus-host", default="127.0.0.1", help="address the /metrics endpoints bind")
    group.add_argument("--trace-sample-ratio", type=float, default=1.0, help="fraction of new traces recorded")


def config_from_args(args) -> TelemetryConfig:
    headers = {}
    for item in args.otlp_header:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--otlp-header {item!r} must be KEY=VALUE")
        headers[key.strip().lower()] = value.strip()
    return TelemetryConfig(otlp_endpoint=args.otlp_endpoint, otlp_headers=headers,
                           prometheus_port=args.prometheus_port, prometheus_host=args.prometheus_host,
                           trace_sample_ratio=args.trace_sample_ratio)


def prometheus_targets(config: TelemetryConfig, *, routers: int, workers: int) -> list[str]:
    """host:port of every process's /metrics on one node (ingress, controller, routers, workers), for a scrape
    config; empty when Prometheus is off."""
    if config.prometheus_port is None:
        return []
    roles = [("ingress", 0), ("controller", 0)] + [("router", r) for r in range(routers)] + \
        [("worker", w) for w in range(workers)]
    return [f"{config.prometheus_host}:{config.for_process(role, i, routers=routers).prometheus_port}"
            for role, i in roles]
