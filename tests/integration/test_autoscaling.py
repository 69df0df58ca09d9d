"""Scaling on a cluster with the real Ray autoscaler (fake multi-node provider): workers asking for more GPUs than
the cluster has bring up GPU nodes; scaling in drains the leaving workers and the autoscaler removes their nodes.
Requests flow throughout and outputs never change."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import ray
from ray._common.test_utils import wait_for_condition
from ray.cluster_utils import AutoscalingCluster

from conftest import PROMPTS
from moeray import Engine, EngineConfig, SamplingParams
from moeray.placement.config import ControllerConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Ray's fake multi-node example config (the wheel does not ship the file AutoscalingCluster reads).
FAKE_PROVIDER_CONFIG = {
    "cluster_name": "moeray-fake", "max_workers": 4, "head_node_type": "ray.head.default",
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.05, "docker": {}, "initialization_commands": [],
    "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}


class FakeGpuCluster(AutoscalingCluster):
    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = {**FAKE_PROVIDER_CONFIG, **config_kwargs}
        config["available_node_types"] = {**worker_node_types, "ray.head.default": {
            "resources": head_resources, "node_config": {}, "max_workers": 0}}
        return config


def gpu_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)


@pytest.fixture(scope="module")
def autoscaling():
    # AutoscalingCluster runs the `ray` command line: the one beside this interpreter, venv activated or not.
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{path}"
    cluster = FakeGpuCluster(head_resources={"CPU": 2}, worker_node_types={"gpu": {
        "resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 3}})
    cluster.start()
    try:
        ray.init(address="auto", log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ["PATH"] = path


def test_scale_out_adds_gpu_nodes_and_scale_in_removes_them(autoscaling, checkpoints, oracle):
    ref = oracle("olmoe")
    expected = [ref.greedy(p) for p in PROMPTS]
    sampling = SamplingParams(max_new_tokens=16)
    # One worker may hold every expert (memory budget), so the engine can shrink back to one. NOTE: max_workers
    # is what lets it scale past the GPUs the cluster has now (an autoscaler adds the nodes).
    config = EngineConfig(model=checkpoints["olmoe"], workers=1, use_gpus=True, worker_memory="1MB",
                          start_timeout_s=180, controller=ControllerConfig(max_workers=3))
    with Engine(config) as engine:
        assert gpu_nodes() == 1, "the first worker's GPU request brought up one node"
        assert [r.output_ids for r in engine.generate(PROMPTS, sampling)] == expected
        refs = [engine.submit(p, sampling) for p in PROMPTS]  # in flight during the scale-out
        record = engine.scale(3)
        assert record["applied"] and record["workers"] == 3
        assert [r.output_ids for r in ray.get(refs, timeout=300)] == expected
        assert gpu_nodes() == 3
        info = engine.workers_info()
        assert len({w["node_id"] for w in info}) == 3 and all(len(w["gpu_ids"]) == 1 for w in info)
        assert all(any(w["experts_per_layer"]) for w in info), "the new workers hold slots"
        assert [r.output_ids for r in engine.generate(PROMPTS, sampling)] == expected
        engine.scale(1)
        assert len(engine.workers_info()) == 1 and engine.plan.num_workers == 1
        wait_for_condition(lambda: gpu_nodes() == 1, timeout=180, retry_interval_ms=2000)
        assert [r.output_ids for r in engine.generate(PROMPTS, sampling)] == expected
