"""The ingress's gateway metrics: running and waiting requests from the admission counter (the one gRPC and the
HTTP API share), and the router's KV-cache gauge."""

from __future__ import annotations

import asyncio

import torch
from transformers import DynamicCache

from moeray import telemetry
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


def test_kv_cache_bytes_is_what_the_cache_holds():
    cache = DynamicCache(ddp_cache_data=[(torch.zeros(2, 4, 5, 8), torch.zeros(2, 4, 5, 8))] * 3)
    with otel() as o:
        telemetry.kv_cache(cache)
        assert o.metrics()["moeray_kv_cache_bytes"][0].value == 3 * 2 * (2 * 4 * 5 * 8) * 4
        telemetry.kv_cache(None)
        assert o.metrics()["moeray_kv_cache_bytes"][0].value == 0
