"""The Grafana dashboard parses and queries only metrics moeray exports; the README's metric table and the
names Prometheus really sees agree with ``telemetry.METRICS``."""

from __future__ import annotations

import json
import pathlib
import re
import urllib.request

from moeray import telemetry
from moeray.telemetry import TelemetryConfig
from moeray.serving.ports import free_port
from test_telemetry_controller import make, skewed_step

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "moeray-dashboard.json"

PROMQL_WORDS = {
    # functions and aggregations the dashboard may use
    "histogram_quantile", "rate", "irate", "increase", "sum", "max", "min", "avg", "count", "topk", "bottomk",
    "quantile", "label_values", "clamp_min", "abs", "delta", "deriv", "avg_over_time", "max_over_time",
    # keywords
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside strings, label matchers, ranges and
    grouping lists that are not functions or keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"label_values\(([^,)]+)(,[^)]*)?\)", r"\1", expr)  # label_values(metric, label)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    idents = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {i for i in idents if i not in PROMQL_WORDS and not i.startswith("$")}


def expressions(dashboard: dict) -> list[str]:
    out = []
    for panel in dashboard["panels"]:
        out += [t["expr"] for t in panel.get("targets", ())]
        for inner in panel.get("panels", ()):
            out += [t["expr"] for t in inner.get("targets", ())]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return out


def test_dashboard_parses_and_names_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = expressions(dashboard)
    assert len(exprs) >= 15
    exported = telemetry.prometheus_names()
    used = set().union(*map(metric_names, exprs))
    assert used and used <= exported, sorted(used - exported)
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Tokens per expert (heatmap)", "Imbalance (max / mean worker load)", "Time to first token",
            "Inter-token latency", "Request latency"} <= titles
    heatmap = next(p for p in dashboard["panels"] if p["type"] == "heatmap")
    assert "moeray_expert_tokens_total" in heatmap["targets"][0]["expr"]
    for name in ("moeray_time_to_first_token_seconds", "moeray_inter_token_latency_seconds",
                 "moeray_request_latency_seconds"):
        assert any(f"histogram_quantile(0.99, sum by (le) (rate({name}_bucket" in e for e in exprs), name
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_metric_name_parser():
    assert metric_names('histogram_quantile(0.9, sum by (le, layer) (rate(a_bucket{layer=~"$layer"}[5m])))') == {
        "a_bucket"}
    assert metric_names("sum(increase(x_total[$__range])) / max(y)") == {"x_total", "y"}
    assert metric_names("label_values(z_total, layer)") == {"z_total"}


def test_prometheus_names_are_what_the_exporter_serves():
    """Record every instrument once and read the exposition: ``prometheus_names`` (what the dashboard test
    trusts) is exactly the set of moeray families served."""
    port = free_port()
    telemetry.configure(TelemetryConfig(prometheus_port=port))
    try:
        controller, ops = make()
        ops.reports = [{"steps": [skewed_step()]}]
        controller.pull()
        for name, kind, _, attributes, _, _ in telemetry.METRICS:
            inst = getattr(telemetry.M, name.removeprefix("moeray_").removesuffix("_seconds"))
            values = {k: 0 for k in attributes}
            {"counter": lambda: inst.add(1, values), "gauge": lambda: inst.set(1, values),
             "histogram": lambda: inst.record(0.5, values)}.get(kind, lambda: None)()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        telemetry.shutdown()
    served = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("moeray_")}
    assert served == telemetry.prometheus_names()


def test_readme_lists_every_metric():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Telemetry"):]
    section = section[:section.index("\n## ", 1)]
    listed = set(re.findall(r"^\| `(moeray_[a-z_]+)`", section, re.M))
    expected = {n + ("_total" if k.endswith("counter") else "") for n, k, *_ in telemetry.METRICS}
    assert listed == expected
