"""Exact admission control in the ingress: never more than max_ongoing + max_queued admitted, never a refusal
below that, FIFO hand-over of slots, and request ids unique among the admitted (no Ray cluster; the errors it raises import Ray's types)."""

import asyncio

import pytest

from moeray.request import DuplicateRequestId
from moeray.serving.admission import Admission, serve_limits
from moeray.serving.errors import AdmissionFull

pytestmark = pytest.mark.ray


def test_exactly_ongoing_plus_queued_are_admitted_in_order():
    async def main():
        admission = Admission(max_ongoing=2, max_queued=2)
        release = asyncio.Event()
        order = []

        async def request(i):
            async with admission.slot(f"r{i}"):
                order.append(i)
                await release.wait()

        tasks = [asyncio.create_task(request(i)) for i in range(4)]
        await asyncio.sleep(0)
        assert admission.stats() == {"running": 2, "waiting": 2, "admitted": 4, "max_ongoing": 2,
                                          "max_queued": 2}
        with pytest.raises(AdmissionFull, match=r"2 requests running \(max 2\) and 2 waiting \(max 2\)"):
            async with admission.slot("r4"):
                pass
        with pytest.raises(DuplicateRequestId, match="request_id 'r1' is already in flight"):
            async with admission.slot("r1"):
                pass
        release.set()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3] and admission.admitted == 0
        async with admission.slot("r1"):  # free again
            assert admission.running == 1

    asyncio.run(main())


def test_a_cancelled_waiter_frees_its_place_and_never_leaks_a_slot():
    async def main():
        admission = Admission(max_ongoing=1, max_queued=2)
        release = asyncio.Event()

        async def request(i):
            async with admission.slot(f"r{i}"):
                await release.wait()

        running = asyncio.create_task(request(0))
        waiting = [asyncio.create_task(request(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        assert admission.admitted == 3
        waiting[0].cancel()
        await asyncio.sleep(0)
        assert admission.stats()["waiting"] == 1 and admission.admitted == 2
        release.set()
        await asyncio.gather(running, waiting[1])
        assert admission.admitted == 0 and admission.running == 0

    asyncio.run(main())


def test_abort_marks_a_waiting_request():
    async def main():
        admission = Admission(max_ongoing=1, max_queued=1)
        release = asyncio.Event()
        seen = {}

        async def request(i):
            async with admission.slot(f"r{i}") as record:
                seen[i] = record.aborted
                await release.wait()

        tasks = [asyncio.create_task(request(i)) for i in range(2)]
        await asyncio.sleep(0)
        assert admission.abort("r1") and not admission.abort("nope")
        release.set()
        await asyncio.gather(*tasks)
        assert seen == {0: False, 1: True}

    asyncio.run(main())


def test_serve_limits_stay_above_ours():
    limits = serve_limits(4, 4)
    assert limits["max_ongoing_requests"] > 8 and limits["max_queued_requests"] == -1
    with pytest.raises(ValueError):
        Admission(0, 1)
