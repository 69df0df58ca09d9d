"""A real Prometheus (Debian's ``prometheus``, installed by ``make install``) scrapes moeray's endpoint on
127.0.0.1 and answers an HTTP API query for the imbalance metric."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from moeray import telemetry
from moeray.telemetry import TelemetryConfig
from moeray.serving.ports import free_port
from test_telemetry_controller import make, skewed_step


@pytest.fixture(scope="module")
def prometheus_bin():
    path = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)
    if path is None:
        reason = "the prometheus binary is not installed: `make install` installs it (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def test_prometheus_scrapes_the_imbalance_metric(prometheus_bin, tmp_path):
    metrics_port, prom_port = free_port(), free_port()
    telemetry.configure(TelemetryConfig(prometheus_port=metrics_port).for_process("ingress"))
    prometheus = None
    try:
        controller, ops = make()
        ops.reports = [{"steps": [skewed_step()]}]
        controller.pull()
        exposition = _get(f"http://127.0.0.1:{metrics_port}/metrics").decode()
        assert 'moeray_imbalance_ratio{layer="0"' in exposition and "moeray_expert_tokens_total{" in exposition

        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "moeray", "static_configs": [
                {"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
        prometheus = subprocess.Popen(
            [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
        query = urllib.parse.urlencode({"query": 'moeray_imbalance_ratio{job="moeray"}'})
        deadline, result = time.monotonic() + 60, []
        while time.monotonic() < deadline and len(result) < 2:
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                body = json.loads(_get(f"http://127.0.0.1:{prom_port}/api/v1/query?{query}"))
                result = body["data"]["result"]
            except OSError:  # not listening yet
                pass
            time.sleep(0.5)
        by_layer = {r["metric"]["layer"]: float(r["value"][1]) for r in result}
        assert by_layer == {"0": pytest.approx(4.0), "1": pytest.approx(1.0)}, result
        # The per-expert counters reach it too.
        query = urllib.parse.urlencode({"query": "sum(moeray_expert_tokens_total)"})
        (total,) = json.loads(_get(f"http://127.0.0.1:{prom_port}/api/v1/query?{query}"))["data"]["result"]
        assert float(total["value"][1]) == np.sum(skewed_step()[0])
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        telemetry.shutdown()
