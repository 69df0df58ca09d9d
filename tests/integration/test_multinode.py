"""Workers across two fake-GPU nodes of a ray.cluster_utils.Cluster: one per device, same outputs."""

import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import PROMPTS
from moeray import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_gpu_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                            "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=2), cluster.add_node(num_cpus=1, num_gpus=1)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_workers_one_per_device_across_nodes(two_gpu_nodes, checkpoints, oracle):
    _, nodes = two_gpu_nodes
    ref = oracle("gpt_oss")
    with Engine(EngineConfig(model=checkpoints["gpt_oss"], workers=3, replicas=2)) as engine:
        info = engine.workers_info()
        devices = [(w["node_id"], tuple(w["gpu_ids"])) for w in info]
        assert all(len(w["gpu_ids"]) == 1 for w in info), "each worker owns exactly one GPU"
        assert len(set(devices)) == 3, f"workers share a device: {devices}"
        assert {w["node_id"] for w in info} == {n.node_id for n in nodes}, "workers span both GPU nodes"
        results = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16))
        assert [r.output_ids for r in results] == [ref.greedy(p) for p in PROMPTS]
        # The controller's topology sees the two nodes: the hierarchical policy packs by them.
        nodes_of_workers = ray.get(engine.controller.describe.remote())["topology"]["worker_node"]
        assert sorted(set(nodes_of_workers)) == [0, 1]


def test_workers_wait_for_gpus_then_fail_clearly(two_gpu_nodes, checkpoints):
    """More GPU workers than GPUs: they wait (an autoscaler would add nodes), then fail naming the timeout, and
    leave no actors behind."""
    config = EngineConfig(model=checkpoints["mixtral"], workers=4, use_gpus=True, start_timeout_s=3)
    with pytest.raises(TimeoutError, match=r"4 expert workers .* within start_timeout_s=3"):
        Engine(config)
    from ray._common.test_utils import wait_for_condition

    # The three workers that did get a GPU were killed: every GPU is free again.
    wait_for_condition(lambda: ray.available_resources().get("GPU", 0) == 3, timeout=30)


def test_chaos_worker_kill_and_node_loss_during_load(two_gpu_nodes, checkpoints, oracle):
    """A bounded load run on 4 workers and 2 routers over 3 nodes while a worker is killed and then a whole node is
    removed. Every expert keeps a copy on a surviving worker or can be re-placed there, so no request may fail,
    except those in flight on a router that ran on the removed node (routers spread over nodes, not pinned to the
    driver): those fail with UNAVAILABLE, and that router comes back on a live node."""
    import random

    import grpc

    from ray._common.test_utils import wait_for_condition

    from moeray.serving.errors import status_of

    cluster, _ = two_gpu_nodes
    extra = cluster.add_node(num_cpus=1, num_gpus=2)
    cluster.wait_for_nodes()
    ref = oracle("qwen2_moe")
    prompts = [PROMPTS[i % len(PROMPTS)] + [50 + i] for i in range(16)]
    expected = [ref.greedy(p, 12) for p in prompts]
    sampling = SamplingParams(max_new_tokens=12)
    rng = random.Random(0)
    config = EngineConfig(model=checkpoints["qwen2_moe"], workers=4, routers=2, replicas=8, worker_memory="1MB")
    with Engine(config) as engine:
        on_extra = [i for i, w in enumerate(engine.workers_info()) if w["node_id"] == extra.node_id]
        assert on_extra, "some workers run on the node that will be removed"
        routers_lost = {i for i, r in enumerate(engine.routers_info()) if r["node_id"] == extra.node_id}
        sent = [engine.submit(p, sampling, router=i) for i, p in enumerate(prompts[:8])]
        stream_router = min({0, 1} - routers_lost, default=0)
        stream = engine.stream(prompts[8], sampling, router=stream_router)
        first = list(next(stream).token_ids)
        victim = rng.choice([i for i in range(4) if i not in on_extra])
        ray.kill(engine.workers[victim])  # 1. a worker dies mid-run
        sent += [engine.submit(p, sampling, router=i) for i, p in enumerate(prompts[9:])]
        cluster.remove_node(extra)  # 2. then a whole node
        streamed = first + [t for chunk in stream for t in chunk.token_ids]
        results, failed = [], 0
        for i, r in enumerate(sent):
            try:
                results.append(ray.get(r, timeout=300).output_ids)
            except Exception as e:
                assert i % 2 in routers_lost, f"request {i} failed on router {i % 2}, which kept its node: {e!r}"
                assert status_of(e)[0] == grpc.StatusCode.UNAVAILABLE
                failed += 1
                results.append(None)
        history = ray.get(engine.controller.history.remote())
        read_bytes = sum(h.get("read_bytes", 0) for h in history)
        print(f"chaos: requests sent {len(prompts)}, completed {len(prompts) - failed}, failed {failed}; killed "
              f"worker {victim}, removed node with workers {on_extra} and routers {sorted(routers_lost)}; "
              f"{len(history)} restores, {read_bytes} bytes re-read from the checkpoint")
        done = results[:8] + [streamed] + results[8:]
        assert all(got is None or got == want for got, want in zip(done, expected))
        for i in routers_lost:  # re-created on a live node
            wait_for_condition(lambda: engine.routers_info(timeout_s=2)[i].get("node_id") not in (None, extra.node_id),
                               timeout=120)
        assert engine.generate(prompts[:4], sampling)[0].output_ids == expected[0], "serving after the chaos"
