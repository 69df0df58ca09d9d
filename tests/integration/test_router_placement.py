"""Routers on devices: a fake-GPU cluster of an attention node and two expert nodes (Ray node labels), routers and
workers holding one GPU each in both topologies, and a router's node lost under load.

Nodes: a CPU-only head (the driver), `attention` with 2 GPUs, `experts-a` and `experts-b` with 2 GPUs each."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import ray
from ray._common.test_utils import wait_for_condition
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from conftest import PROMPTS
from moeray import Engine, EngineConfig, SamplingParams
from moeray.deployment import ROLE_LABEL, choose_devices
from moeray.serving.engine_handle import EngineHandle
from moeray.serving.errors import status_of

pytestmark = pytest.mark.ray
SAMPLING = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                            "include_dashboard": False})
    added = {"attention": cluster.add_node(num_cpus=1, num_gpus=2, labels={ROLE_LABEL: "attention"}),
             "experts-a": cluster.add_node(num_cpus=1, num_gpus=2, labels={ROLE_LABEL: "experts"}),
             "experts-b": cluster.add_node(num_cpus=1, num_gpus=2, labels={ROLE_LABEL: "experts"})}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, added
    ray.shutdown()
    cluster.shutdown()


def _devices(engine: Engine) -> tuple[list[tuple[str, tuple]], list[tuple[str, tuple]]]:
    routers = [(r["node_id"], tuple(r["gpu_ids"])) for r in engine.routers_info()]
    workers = [(w["node_id"], tuple(w["gpu_ids"])) for w in engine.workers_info()]
    return routers, workers


def _gpus_free() -> float:
    return ray.available_resources().get("GPU", 0)


def test_device_choice_is_one_gpu_per_actor_where_there_are_enough():
    choose = dict(topology="colocated", workers=2, routers=2, use_gpus=None, router_gpus=None)
    assert choose_devices(worker_pool_gpus=4, router_pool_gpus=4, **choose).router_gpus == 1
    assert choose_devices(worker_pool_gpus=3, router_pool_gpus=3, **choose).router_gpus == 0  # workers first
    assert choose_devices(worker_pool_gpus=1, router_pool_gpus=1, **choose).worker_gpus == 0
    assert choose_devices(worker_pool_gpus=4, router_pool_gpus=4, **{**choose, "router_gpus": 0}).router_gpus == 0
    disaggregated = {**choose, "topology": "disaggregated"}
    assert choose_devices(worker_pool_gpus=2, router_pool_gpus=2, **disaggregated) == choose_devices(
        worker_pool_gpus=2, router_pool_gpus=2, **disaggregated)
    assert choose_devices(worker_pool_gpus=2, router_pool_gpus=1, **disaggregated).router_gpus == 0
    with pytest.raises(ValueError, match="topology 'ring' is not one of"):
        EngineConfig(model="m", topology="ring")
    with pytest.raises(ValueError, match="router_gpus must be >= 0; got -1"):
        EngineConfig(model="m", router_gpus=-1)


def test_colocated_routers_and_workers_hold_a_gpu_each(nodes, checkpoints, oracle):
    _, added = nodes
    ref = oracle("mixtral")
    total = _gpus_free()
    with Engine(EngineConfig(model=checkpoints["mixtral"], workers=2, routers=2, replicas=2)) as engine:
        routers, workers = _devices(engine)
        assert all(len(gpus) == 1 for _, gpus in routers + workers), f"one GPU each: {routers} {workers}"
        assert len(set(routers + workers)) == 4, f"a GPU held twice: {routers} {workers}"
        assert len({node for node, _ in routers}) == 2, "the placement group spreads routers over nodes"
        assert _gpus_free() == total - 4
        table = placement_group_table(engine.router_group.group)
        assert table["state"] == "CREATED" and all(b.get("GPU") == 1 for b in table["bundles"].values())
        results = engine.generate(PROMPTS, SAMPLING)
        assert [r.output_ids for r in results] == [ref.greedy(p, 12) for p in PROMPTS]
    wait_for_condition(lambda: _gpus_free() == total, timeout=30)  # the group went with the engine


def test_disaggregated_routers_on_attention_nodes_workers_on_expert_nodes(nodes, checkpoints, oracle):
    _, added = nodes
    ref = oracle("qwen3_moe")
    config = EngineConfig(model=checkpoints["qwen3_moe"], workers=2, routers=2, topology="disaggregated")
    with Engine(config) as engine:
        routers, workers = _devices(engine)
        assert {node for node, _ in routers} == {added["attention"].node_id}
        assert {node for node, _ in workers} <= {added["experts-a"].node_id, added["experts-b"].node_id}
        assert all(len(gpus) == 1 for _, gpus in routers + workers) and len(set(routers + workers)) == 4
        results = engine.generate(PROMPTS, SAMPLING)
        assert [r.output_ids for r in results] == [ref.greedy(p, 12) for p in PROMPTS]


def test_a_routers_node_is_lost_under_load(nodes, checkpoints, oracle):
    """Two routers spread over two attention nodes (no hard affinity: a placement group); the node of one is
    removed while both run requests. The other router's requests all finish exactly; the lost router's finish or
    fail with UNAVAILABLE; it comes back on the live attention node and serves; and the ingress starts a request
    whose router died before its first token on the other router."""
    cluster, _ = nodes
    ref = oracle("olmoe")
    prompts = [PROMPTS[i % len(PROMPTS)] + [40 + i] for i in range(8)]
    expected = [ref.greedy(p, 12) for p in prompts]
    doomed = cluster.add_node(num_cpus=1, num_gpus=0, labels={ROLE_LABEL: "attention"})
    cluster.wait_for_nodes()
    config = EngineConfig(model=checkpoints["olmoe"], workers=2, routers=2, topology="disaggregated", router_gpus=0)
    with Engine(config) as engine:
        where = [r["node_id"] for r in engine.routers_info()]
        assert doomed.node_id in where and len(set(where)) == 2, f"routers spread over both attention nodes: {where}"
        lost, kept = where.index(doomed.node_id), 1 - where.index(doomed.node_id)
        refs = [engine.submit(p, SAMPLING, router=i % 2) for i, p in enumerate(prompts)]
        cluster.remove_node(doomed)
        outcomes = []
        for ref_ in refs:
            try:
                outcomes.append(ray.get(ref_, timeout=300).output_ids)
            except ray.exceptions.RayActorError as e:
                outcomes.append(e)
        for i, outcome in enumerate(outcomes):
            if i % 2 == kept:
                assert outcome == expected[i], f"request {i} on the surviving router was disturbed"
            elif isinstance(outcome, Exception):
                assert status_of(outcome)[0] == grpc.StatusCode.UNAVAILABLE
            else:
                assert outcome == expected[i]
        failed = sum(isinstance(o, Exception) for o in outcomes)
        print(f"router node lost: {failed} of {len(prompts) // 2} requests on it failed, the other router's all done")

        def back_elsewhere() -> bool:
            info = engine.routers_info(timeout_s=2)[lost]
            return info["state"] == "alive" and info["node_id"] != doomed.node_id

        wait_for_condition(back_elsewhere, timeout=120)
        results = engine.generate(prompts[:2], SAMPLING)  # prompt i goes to router i
        assert [r.output_ids for r in results] == expected[:2], "the restarted router serves again"
        # The ingress: a router dead before the first token costs the request nothing.
        handle = EngineHandle.of(engine)
        ray.kill(engine.routers[lost], no_restart=True)
        handle._next = lost  # the dead router first in the tie-break

        async def run() -> list[int]:
            return [t async for chunk in handle.stream(prompts[3], SAMPLING, "retried-1") for t in chunk.token_ids]

        assert asyncio.run(run()) == expected[3]
        assert handle._down_until.get(lost, 0) > 0, "the dead router is passed over for a while"
