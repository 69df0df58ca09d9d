"""The KubeRay path without Kubernetes: the CPU demo manifest's serveConfigV2, deployed through Serve's own config
deployment (what KubeRay's RayService does through the dashboard), builds the app with build_app and serves."""

from __future__ import annotations


import grpc
import pytest
import ray
import yaml
from ray import serve

from conftest import PROMPTS, _ray_start
from moeray.serving.ports import free_port
from moeray.serving.gen import generate_pb2, generate_pb2_grpc, placement_pb2, placement_pb2_grpc

pytestmark = pytest.mark.ray
MANIFEST = "deploy/ray-service.moeray-cpu-demo.yaml"



def test_demo_manifest_serve_config_deploys_and_serves(checkpoints, oracle):
    from ray.serve._private.api import serve_start
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    with open(MANIFEST) as f:
        service = next(d for d in yaml.safe_load_all(f) if d and d.get("kind") == "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    port = free_port()
    # NOTE: loopback only in tests; the manifest's 0.0.0.0 is for a pod.
    config["http_options"] = {"host": "127.0.0.1", "port": free_port()}
    config["grpc_options"]["port"] = port
    app = config["applications"][0]
    app["args"].update(model=checkpoints["mixtral"], workers=2, replicas=2)
    with _ray_start():
        try:
            serve_start(http_options=config["http_options"], grpc_options=config["grpc_options"])
            _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=60)
                stub = generate_pb2_grpc.GenerateServiceStub(channel)
                request = generate_pb2.GenerateRequest(prompt_ids=generate_pb2.TokenIds(ids=PROMPTS[1]),
                                                       sampling=generate_pb2.SamplingParams(max_new_tokens=16))
                tokens = [t for chunk in stub.Generate(request, timeout=120) for t in chunk.token_ids]
                assert tokens == oracle("mixtral").greedy(PROMPTS[1])
                placement = placement_pb2_grpc.PlacementServiceStub(channel).GetPlacement(
                    placement_pb2.GetPlacementRequest(), timeout=60)
                assert placement.redundant_slots == 2 and len(placement.workers) == 2
        finally:
            serve.shutdown()
            try:
                host = ray.get_actor(f"moeray-engine-{app['name']}")
                ray.get(host.shutdown.remote(), timeout=30)
                ray.kill(host)
            except ValueError:  # never created
                pass
