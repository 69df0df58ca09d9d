"""The ingress's gateway metrics: running and waiting requests from the admission counter (the one gRPC and the
HTTP API share), and the router's KV-cache gauge."""

from __future__ import annotations

import asyncio

from moeray import telemetry
from moeray.router.scheduler import KVStats
from moeray.serving.admission import Admission
from otel_helpers import otel


def test_running_and_waiting_follow_the_admission_counter():
    async def scenario(o):
        admission = Admission(max_ongoing=1, max_queued=2)
        values = lambda: tuple(o.metrics()[n][0].value for n in ("moeray_requests_running", "moeray_requests_waiting"))
        release = asyncio.Event()

        async def hold():
            async with admission.slot():
                await release.wait()

        tasks = [asyncio.create_task(hold()) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert values() == (1, 2)
        release.set()
        await asyncio.gather(*tasks)
        assert values() == (0, 0)

    with otel() as o:
        asyncio.run(scenario(o))


def test_kv_cache_metrics_are_what_the_pool_holds():
    stats = KVStats(blocks_total=10, blocks_used=4, block_size=16, bytes_per_token=96, pool_bytes=10 * 16 * 96,
                    tokens_held=64, preemptions=0, prefix_queries=0, prefix_hits=0)
    with otel() as o:
        telemetry.kv_cache(stats)
        telemetry.preempted()
        telemetry.prefix_lookup(100, 32)
        telemetry.prefix_lookup(50, 0)
        m = o.metrics()
        assert m["moeray_kv_cache_bytes"][0].value == 4 * 16 * 96
        assert m["moeray_kv_cache_usage_ratio"][0].value == 0.4
        assert m["moeray_preemptions"][0].value == 1
        assert m["moeray_prefix_cache_queries"][0].value == 150 and m["moeray_prefix_cache_hits"][0].value == 32
