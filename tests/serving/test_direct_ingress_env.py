"""``moeray bench serve --ingress direct``: the environment that puts a local cluster's Serve in its
throughput-optimized mode, set before Serve starts, with one free port range per protocol."""

import json
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray

SET_AND_PRINT = """
import json, os
from moeray.bench.serve import direct_ingress_env
direct_ingress_env()
print(json.dumps({k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}))
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_sets_throughput_mode_and_two_free_disjoint_port_ranges():
    from moeray.bench.serve import DIRECT_INGRESS_PORTS

    done = _run(SET_AND_PRINT)
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout.strip().splitlines()[-1])
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    bound = lambda side, protocol: int(env[f"RAY_SERVE_DIRECT_INGRESS_{side}_{protocol}_PORT"])
    ranges = [range(bound("MIN", p), bound("MAX", p)) for p in ("GRPC", "HTTP")]
    assert all(len(r) == DIRECT_INGRESS_PORTS for r in ranges)
    assert not set(ranges[0]) & set(ranges[1])
    for port in (*ranges[0], *ranges[1]):  # free when chosen, and still free now
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_refused_once_serve_is_imported():
    done = _run("import ray.serve\n" + SET_AND_PRINT)
    assert done.returncode != 0
    assert "before Ray Serve is imported" in done.stderr
