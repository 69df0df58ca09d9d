"""A router in this process, with fake expert workers: request, step and layer dispatch spans (names, attributes,
parents, links) and the router's metrics. No Ray: worker calls run in place."""

from __future__ import annotations

import threading
import time
import types

import pytest
import ray
import torch

import moeray.transport.object_store as object_store_module
from moeray import telemetry
from moeray.kernels.api import ExpertWeights, grouped_experts
from moeray.model.backbone import inspect_checkpoint
from moeray.model.weights import TensorReader, read_expert
from moeray.placement.algorithms.policies import static_plan
from moeray.request import SamplingParams
from moeray.router.router import Router
from moeray.transport.wire import pack, unpack
from otel_helpers import otel

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


class FakeWorker:
    """One expert worker's slots, computed in place; ``forward.remote`` returns the result itself."""

    def __init__(self, path: str, experts_per_layer: list[list[int]]) -> None:
        info, reader = inspect_checkpoint(path), TensorReader()
        self.activation = info.spec.activation
        self.layers = []
        for spec, source, experts in zip(info.spec.moe_layers, info.index.experts, experts_per_layer):
            loaded = [read_expert(reader, spec, source, e, torch.float32) for e in experts]
            self.layers.append(ExpertWeights(w_gate_up_S2IH=torch.stack([x["gate_up"] for x in loaded]),
                                             w_down_SHI=torch.stack([x["down"] for x in loaded])))
        reader.close()
        self.forward = types.SimpleNamespace(remote=self._forward)
        self.calls = 0

    def _forward(self, epoch, layer, x, pair_token_N, pair_slot_N, pair_weight_N):
        self.calls += 1
        return pack(grouped_experts(unpack(x), torch.from_numpy(pair_token_N).long(),
                                    torch.from_numpy(pair_slot_N).long(), torch.from_numpy(pair_weight_N),
                                    self.layers[layer], self.activation))


@pytest.fixture
def router(checkpoints, monkeypatch):
    path = checkpoints["mixtral"]
    monkeypatch.setattr(object_store_module, "ray", types.SimpleNamespace(get=lambda ref, **_: ref,
                                                                          exceptions=ray.exceptions))
    threads = torch.get_num_threads()
    spec = inspect_checkpoint(path).spec
    plan = static_plan("contiguous", num_layers=len(spec.moe_layers), num_experts=spec.num_experts, num_workers=2)
    workers = [FakeWorker(path, plan.experts_of(w)) for w in range(2)]
    r = Router(checkpoint_path=path, dtype=torch.float32, plan=plan, workers=workers, max_batch_size=8,
               transport="object_store")
    r._stopped.set()  # the test steps the batch itself, so both requests share every step
    r._loop.join()
    try:
        yield r
    finally:
        r.shutdown()
        torch.set_num_threads(threads)


def _generate_pair(router, traceparents):
    """Two requests in one batch: both queued before the first step, so one prefill and the decodes serve both."""
    sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
    results = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, router.generate(
        [5 + i, 6, 7], sampling, request_id=f"r{i}", traceparent=traceparents[i]))) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while router.scheduler.num_waiting < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    while any(t.is_alive() for t in threads):
        assert time.monotonic() < deadline + 30
        router.scheduler.step()
        time.sleep(0.001)
    return results


def test_request_step_and_dispatch_spans(router):
    with otel() as o:
        results = _generate_pair(router, [TRACEPARENT, None])
        assert [len(r.output_ids) for r in results] == [4, 4]
        requests = {s.attributes["moeray.request_id"]: s for s in o.spans("moeray.router.request")}
        assert set(requests) == {"r0", "r1"}
        assert format(requests["r0"].context.trace_id, "032x") == TRACE  # continues the caller's trace
        assert format(requests["r0"].parent.span_id, "016x") == "00f067aa0ba902b7"
        assert requests["r1"].parent is None
        steps = o.spans("moeray.step")
        kinds = [s.attributes["moeray.step.kind"] for s in steps]
        assert kinds == ["prefill"] + ["decode"] * 3  # 4 tokens: the prefill makes the first
        request_ids = {s.context.span_id for s in requests.values()}
        for step in steps:
            assert step.parent is None  # a trace of its own, linked to every request it served
            assert step.attributes["moeray.batch_size"] == 2
            assert {link.context.span_id for link in step.links} == request_ids
        dispatches = o.spans("moeray.dispatch")
        num_layers = len(router.dispatcher.plan.phy2log_LP)
        assert len(dispatches) == len(steps) * num_layers
        by_step = {s.context.span_id: s for s in steps}
        for d in dispatches:
            step = by_step[d.parent.span_id]  # a child of its step
            assert d.context.trace_id == step.context.trace_id
            a = d.attributes
            assert 0 <= a["moeray.layer"] < num_layers and a["moeray.plan.epoch"] == 0
            assert a["moeray.tokens"] == (6 if step.attributes["moeray.step.kind"] == "prefill" else 2)
            assert 1 <= a["moeray.workers_touched"] <= 2


def test_router_metrics(router):
    with otel() as o:
        _generate_pair(router, [None, None])
        m = o.metrics()
        num_layers = len(router.dispatcher.plan.phy2log_LP)
        dispatch = {p.attributes["layer"]: p.count for p in m["moeray_dispatch_latency_seconds"]}
        assert dispatch == {layer: 4 for layer in range(num_layers)}  # 4 forwards x each MoE layer
        steps = {p.attributes["kind"]: p.count for p in m["moeray_step_latency_seconds"]}
        assert steps == {"prefill": 1, "decode": 3}
        assert m["moeray_time_to_first_token_seconds"][0].count == 2
        assert m["moeray_inter_token_latency_seconds"][0].count == 2 * 3
        (latency,) = m["moeray_request_latency_seconds"]
        assert latency.count == 2 and latency.sum > 0
        assert m["moeray_queue_depth"][0].value == 0
        assert m["moeray_prompt_tokens"][0].value == 2 * 3  # two prompts of 3 tokens
        assert m["moeray_generation_tokens"][0].value == 2 * 4
        assert m["moeray_kv_cache_bytes"][0].value == 0  # both finished: nothing held


def test_score_spans_nest_the_dispatches(router):
    import numpy as np

    with otel() as o:
        router.score(np.array([[5, 6, 7, 8]]), traceparent=TRACEPARENT)
        (score,) = o.spans("moeray.router.score")
        assert format(score.context.trace_id, "032x") == TRACE
        dispatches = o.spans("moeray.dispatch")
        assert dispatches and all(d.parent.span_id == score.context.span_id for d in dispatches)


def test_off_records_nothing_and_changes_no_output(router):
    assert not telemetry.STATE.on
    off = _generate_pair(router, [TRACEPARENT, None])
    with otel():
        on = _generate_pair(router, [TRACEPARENT, None])
    assert [r.output_ids for r in off] == [r.output_ids for r in on]
