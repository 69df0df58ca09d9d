"""deploy/ checked offline: no cluster, no network, no Ray.

- every document of deploy/*.yaml: KubeRay resources against deploy/crds/ with unknown fields rejected, core objects
  with kubernetes-validate (strict); a misspelt field, a wrong type or a duplicate port fails;
- serveConfigV2 against Ray Serve's schema (unknown keys rejected too), moeray's import path, servicer functions
  and engine arguments;
- ports: gRPC 9000 in the serve Service and on the head container, under names KubeRay keeps;
- versions: rayVersion = the image tags' Ray = the Dockerfile's base images = the ray[serve] pin = the installed Ray;
- the admin token comes from a mounted Secret; the GPU layout can place every expert worker.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import inspect
import posixpath
import re
import typing
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from deploy_schema import CustomResourceSchemas, load_documents, unknown_keys
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
DOCS = [(path, i, doc) for path in MANIFESTS for i, doc in enumerate(load_documents(path))]
RAY_CRS = [(path, doc) for path, _, doc in DOCS if doc["apiVersion"].startswith("ray.io/")]
RAY_SERVICES = [(path, doc) for path, doc in RAY_CRS if doc["kind"] == "RayService"]
GRPC_PORT, HTTP_PORT = 9000, 8000
ADMIN_TOKEN_FILE = "MOERAY_ADMIN_TOKEN_FILE"


def _id(path: Path, doc: dict) -> str:
    return f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"


@pytest.fixture(scope="module")
def crds() -> CustomResourceSchemas:
    return CustomResourceSchemas(DEPLOY / "crds")


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]


def pod_templates(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def head_container(doc: dict) -> dict:
    return cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(name: str) -> Requirement:
    reqs = [Requirement(r) for r in pyproject()["project"]["dependencies"]]
    return next(r for r in reqs if r.name == name)


# -- schemas ------------------------------------------------------------------------------------------------------
def test_there_is_something_to_check():
    names = {p.name for p in MANIFESTS}
    assert {"ray-service.moeray.yaml", "ray-cluster.moeray.yaml", "ray-service.moeray-cpu-demo.yaml"} <= names
    assert {"RayService", "RayCluster", "Service", "Secret"} <= {doc["kind"] for _, _, doc in DOCS}


@pytest.mark.parametrize("path,index,doc", DOCS, ids=[f"{p.name}[{i}]:{d['kind']}" for p, i, d in DOCS])
def test_document_is_valid(crds, path, index, doc):
    assert "status" not in doc, "manifests set no status"
    name = doc["metadata"]["name"]
    # Services get a DNS label derived from these names (RFC 1035: starts with a letter, at most 63).
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name), f"{name!r} is not a DNS-1035 label"
    if doc["apiVersion"].startswith("ray.io/"):
        assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}
        assert crds.errors(doc) == []
    else:
        kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(), strict=True)


def _rc(doc):
    return cluster_spec(doc)


MISTAKES = {
    "misspelt cluster field": lambda d: _rc(d).__setitem__("enableInTreeAutoScaling", True),
    "misspelt container field": lambda d: head_container(d).__setitem__("volumeMount", []),
    "misspelt serveService field": lambda d: d["spec"]["serveService"]["spec"].__setitem__("port", 9000),
    "misspelt top-level field": lambda d: d.__setitem__("specs", {}),
    "rayStartParams value not a string": lambda d: _rc(d)["headGroupSpec"]["rayStartParams"].__setitem__("num-gpus", 0),
    "unknown upscalingMode": lambda d: _rc(d)["autoscalerOptions"].__setitem__("upscalingMode", "Fast"),
    "duplicate container port": lambda d: head_container(d)["ports"].append({"name": "grpc2", "containerPort": 9000}),
    "bad quantity": lambda d: head_container(d)["resources"]["limits"].__setitem__("memory", "64 GB"),
    "int32 overflow": lambda d: _rc(d)["workerGroupSpecs"][0].__setitem__("maxReplicas", 2**40),
    "missing groupName": lambda d: _rc(d)["workerGroupSpecs"][0].pop("groupName"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_crd_validation_rejects(crds, mistake):
    doc = copy.deepcopy(next(d for p, d in RAY_SERVICES if p.name == "ray-service.moeray.yaml"))
    assert crds.errors(doc) == []
    MISTAKES[mistake](doc)
    assert crds.errors(doc), f"{mistake} passed validation"


def test_core_validation_rejects_a_misspelt_field():
    service = copy.deepcopy(next(d for _, _, d in DOCS if d["kind"] == "Service"))
    service["spec"]["ports"][0]["targetport"] = 9000
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, kubernetes_validate.utils.latest_version(), strict=True)


def test_every_file_opens_with_what_to_edit():
    for path in MANIFESTS:
        text = path.read_text()
        assert text.startswith("#"), f"{path.name} must open with a header comment"
        header = text[: text.index("\napiVersion:")]
        assert "EDIT" in header, f"{path.name}'s header must say what to edit"


# -- serveConfigV2 --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,doc", RAY_SERVICES, ids=[_id(p, d) for p, d in RAY_SERVICES])
def test_serve_config(path, doc):
    from ray.serve.schema import ServeDeploySchema

    from moeray.serving.app import SERVICER_FUNCTIONS

    config = serve_config(doc)
    ServeDeploySchema.model_validate(config)  # Ray 2.60's Serve schemas are pydantic v2 models
    assert unknown_keys(ServeDeploySchema, config) == []
    assert config["grpc_options"]["port"] == GRPC_PORT
    assert config["grpc_options"]["grpc_servicer_functions"] == SERVICER_FUNCTIONS
    for function in SERVICER_FUNCTIONS:  # what Serve's gRPC proxy imports when it starts
        module, _, name = function.rpartition(".")
        # NOTE: read the module rather than import it: our KServe stubs and tritonclient's (imported by the serving
        # tests of the same pytest process) cannot both sit in protobuf's default pool.
        spec = importlib.util.find_spec(module)
        assert spec and re.search(rf"^def {name}\(", Path(spec.origin).read_text(), flags=re.M), function
    # KubeRay's health checks and the serve Service reach the proxies from outside the pod.
    assert config["http_options"] == {"host": "0.0.0.0", "port": HTTP_PORT}
    assert config["logging_config"]["enable_access_log"] is False
    [app] = config["applications"]
    assert app["import_path"] == "moeray.serving.app:build_app"
    assert app["route_prefix"] == "/", "Serve's gRPC proxy routes only to applications with a route prefix"
    assert app["logging_config"]["enable_access_log"] is False


def test_serve_config_rejects_a_misspelt_key():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(RAY_SERVICES[0][1])
    config["grpc_options"]["grpc_servicer_function"] = config["grpc_options"].pop("grpc_servicer_functions")
    config["applications"][0]["route_prefx"] = "/"
    ServeDeploySchema.model_validate(config)  # Serve itself accepts both, and would drop them
    assert unknown_keys(ServeDeploySchema, config) == ["grpc_options.grpc_servicer_function",
                                                       "applications[0].route_prefx"]


@pytest.mark.parametrize("path,doc", RAY_SERVICES, ids=[_id(p, d) for p, d in RAY_SERVICES])
def test_app_args_are_engine_config(path, doc):
    """build_app's args are EngineConfig fields with values it accepts (constructing one needs no Ray)."""
    from moeray.config import EngineConfig

    args = serve_config(doc)["applications"][0]["args"]
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert set(args) <= fields, f"not EngineConfig fields: {sorted(set(args) - fields)}"
    EngineConfig(**args)


def test_build_app_takes_the_args():
    """Once moeray.serving.app has build_app, Serve must be able to call it with the manifests' args."""
    app = importlib.import_module("moeray.serving.app")
    if not hasattr(app, "build_app"):
        pytest.skip("moeray.serving.app.build_app does not exist yet")
    params = list(inspect.signature(app.build_app).parameters.values())
    assert len(params) == 1, "Serve calls an application builder with one argument: the args dict"
    try:
        hint = typing.get_type_hints(app.build_app).get(params[0].name)
    except NameError:  # an annotation only a type checker resolves
        hint = None
    if inspect.isclass(hint) and hasattr(hint, "model_validate"):  # Serve validates a typed builder's args
        for _, doc in RAY_SERVICES:
            hint.model_validate(serve_config(doc)["applications"][0]["args"])


# -- ports ----------------------------------------------------------------------------------------------------
def _ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


@pytest.mark.parametrize("path,doc", RAY_CRS, ids=[_id(p, d) for p, d in RAY_CRS])
def test_head_exposes_http_and_grpc(path, doc):
    ports = _ports(head_container(doc))
    # KubeRay takes the HTTP health-check port from the port named `serve`; `serve-*` ports join the serve Service.
    assert ports["serve"] == HTTP_PORT and ports["serve-grpc"] == GRPC_PORT
    for template in pod_templates(doc):
        for container in template["spec"]["containers"]:
            for name in _ports(container):  # IANA service names, as the API server requires
                assert len(name) <= 15 and re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name), name
                assert "--" not in name and re.search("[a-z]", name), name


@pytest.mark.parametrize("path,doc", RAY_SERVICES, ids=[_id(p, d) for p, d in RAY_SERVICES])
def test_serve_service_carries_grpc(path, doc):
    service = doc["spec"]["serveService"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "keep it internal; TLS ends at a gateway"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports.get("serve-grpc") == GRPC_PORT and ports.get("serve") == HTTP_PORT
    # NOTE: KubeRay rebuilds this Service's ports from the head's `serve` / `serve-*` ports: any other name vanishes.
    assert all(re.fullmatch(r"serve(-.+)?", name) for name in ports), ports
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Service", **service},
                                 kubernetes_validate.utils.latest_version(), strict=True)


@pytest.mark.parametrize("path", sorted({p for p, _ in RAY_CRS}), ids=lambda p: p.name)
def test_plain_services_select_the_ray_pods(path):
    docs = load_documents(path)
    [ray] = [d for d in docs if d["apiVersion"].startswith("ray.io/")]
    services = [d for d in docs if d["kind"] == "Service"]
    assert services, f"{path.name}: a Service for gRPC on {GRPC_PORT}"
    head_labels = cluster_spec(ray)["headGroupSpec"]["template"]["metadata"]["labels"]
    for service in services:
        assert service["spec"]["type"] == "ClusterIP"
        [port] = service["spec"]["ports"]
        assert port["port"] == GRPC_PORT and _ports(head_container(ray))[port["targetPort"]] == GRPC_PORT
        selector = service["spec"]["selector"]
        own = {k: v for k, v in selector.items() if not k.startswith("ray.io/")}
        assert own.items() <= head_labels.items(), f"{service['metadata']['name']} selects no pod of {path.name}"
        if ray["kind"] == "RayCluster":  # labels KubeRay puts on the cluster's pods
            assert selector.get("ray.io/cluster") == ray["metadata"]["name"]
        else:  # only pods whose Serve proxy is healthy, as the serve Service does
            assert selector.get("ray.io/serve") == "true"


RAY_PORTS = {6379: "GCS", 8265: "dashboard and job submission", 10001: "Ray client"}


@pytest.mark.parametrize("path,doc", RAY_CRS, ids=[_id(p, d) for p, d in RAY_CRS])
def test_ray_token_auth_is_on_and_no_service_leaves_the_cluster(path, doc):
    """Ray runs code for whoever reaches its control plane: every cluster turns Ray's token authentication on, and
    no Service of a manifest is reachable from outside the Kubernetes cluster or carries one of Ray's ports."""
    assert cluster_spec(doc).get("authOptions", {}).get("mode") == "token"
    for template in pod_templates(doc):  # the operator sets them: a hand-written one would override its Secret
        for container in template["spec"]["containers"]:
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & {e["name"] for e in container.get("env", [])}
    services = [d for d in load_documents(path) if d["kind"] == "Service"]
    if doc["kind"] == "RayService":
        services.append(doc["spec"]["serveService"])
    for service in services:
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
        exposed = {p["port"] for p in service["spec"]["ports"]} & RAY_PORTS.keys()
        assert not exposed, f"{service['metadata']['name']} exposes {[RAY_PORTS[p] for p in exposed]}"


# -- versions -------------------------------------------------------------------------------------------------
def _from_images() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return re.findall(r"^FROM\s+(\S+)", text, flags=re.M)


def test_versions_agree():
    import ray

    ray_pin = pinned("ray")
    assert "serve" in ray_pin.extras
    [version] = [s.version for s in ray_pin.specifier if s.operator == "=="]
    assert ray.__version__ == version
    bases = [image for image in _from_images() if image.startswith("rayproject/ray:")]
    assert sorted(bases) == [f"rayproject/ray:{version}-py312", f"rayproject/ray:{version}-py312-gpu"]
    for path, doc in RAY_CRS:
        spec = cluster_spec(doc)
        assert spec["rayVersion"] == version, f"{path.name}: rayVersion"
        for template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                tag = container["image"].rpartition(":")[2]
                match = re.search(r"ray(\d+\.\d+\.\d+)", tag)
                assert match and match.group(1) == version, f"{path.name}: {container['image']} is not Ray {version}"


def test_image_python_and_torch_fit_the_package():
    from packaging.specifiers import SpecifierSet

    project = pyproject()["project"]
    for image in _from_images():
        if image.startswith("rayproject/ray:"):
            py = re.search(r"-py(\d)(\d+)", image)
            assert Version(f"{py.group(1)}.{py.group(2)}") in SpecifierSet(project["requires-python"]), image
    text = (DEPLOY / "Dockerfile").read_text()
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)", text, flags=re.M).group(1)
    assert Version(torch) in pinned("torch").specifier
    makefile_torch = re.search(r"^TORCH := (\S+)", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert torch == makefile_torch, "the image and the development machines run the same torch"
    assert "https://download.pytorch.org/whl/cpu" in text


@pytest.mark.parametrize("path,doc", RAY_CRS, ids=[_id(p, d) for p, d in RAY_CRS])
def test_image_variant_matches_gpus(path, doc):
    gpus = any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
               for t in pod_templates(doc) for c in t["spec"]["containers"])
    for template in pod_templates(doc):
        for container in template["spec"]["containers"]:
            assert container["image"].endswith("-gpu" if gpus else "-cpu"), container["image"]


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as an unprivileged user"
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", text, flags=re.M) for p in line.split()}
    assert {HTTP_PORT, GRPC_PORT} <= exposed
    assert re.search(r"pip install [^\n]*/home/ray/src/moeray", text), "installs moeray from the repository"


def test_image_sets_what_moeray_serve_sets():
    from moeray.serving.serve_env import serving_env

    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    image = dict(pair.split("=", 1) for line in re.findall(r"^ENV\s+(.+)$", text, flags=re.M) for pair in line.split())
    assert {k: v for k, v in image.items() if k.startswith("RAY_SERVE_")} == serving_env(current={})


def test_demo_serves_the_checkpoint_built_into_the_image():
    from moeray.model.demo import DEMO_VERSION

    home = re.search(r"^ENV MOERAY_HOME=(\S+)", (DEPLOY / "Dockerfile").read_text(), flags=re.M).group(1)
    [demo] = [d for p, d in RAY_SERVICES if p.name == "ray-service.moeray-cpu-demo.yaml"]
    assert serve_config(demo)["applications"][0]["args"]["model"] == posixpath.join(home, f"demo-{DEMO_VERSION}")


# -- resources and the admin token -------------------------------------------------------------------------------
@pytest.mark.parametrize("path,doc", RAY_CRS, ids=[_id(p, d) for p, d in RAY_CRS])
def test_head_has_no_gpu_and_workers_fit(path, doc):
    """The head runs no actor that asks for a GPU; the smallest cluster holds every GPU the engine asks for when it
    starts: workers and routers on any GPU pod (colocated), or routers on the attention group's pods and workers on
    the expert group's, told apart by the groups' Ray node labels (disaggregated)."""
    from moeray.deployment import ATTENTION, EXPERTS, ROLE_LABEL

    spec = cluster_spec(doc)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head_container(doc).get("resources", {}).get("limits", {})
    min_gpus: dict[str | None, int] = {}  # by the group's moeray.io/role label (None: no role)
    max_gpus = 0
    for group in spec.get("workerGroupSpecs", []):
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        per_pod = int(limits.get("nvidia.com/gpu", 0))
        role = group.get("labels", {}).get(ROLE_LABEL)
        min_gpus[role] = min_gpus.get(role, 0) + per_pod * group["minReplicas"]
        max_gpus += per_pod * group["maxReplicas"]
    if max_gpus:
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]
    if doc["kind"] != "RayService":
        return
    args = serve_config(doc)["applications"][0]["args"]
    routers, router_gpus = args.get("routers", 1), args.get("router_gpus", 0)
    if args.get("topology", "colocated") == "disaggregated":
        assert set(min_gpus) == {ATTENTION, EXPERTS}, f"every group labelled {ROLE_LABEL}: {sorted(min_gpus)}"
        # NOTE: the engine asks for all its workers' and routers' GPUs when it starts, so the minimum must hold them.
        assert args["workers"] <= min_gpus[EXPERTS], f"{args['workers']} workers; expert pods have {min_gpus[EXPERTS]}"
        assert routers * router_gpus <= min_gpus[ATTENTION], f"{routers} routers; attention pods: {min_gpus[ATTENTION]}"
        assert args.get("use_gpus")
        return
    assert set(min_gpus) <= {None}, "role labels mean nothing to a colocated engine"
    if args.get("use_gpus"):
        wanted = args["workers"] + routers * router_gpus
        assert wanted <= sum(min_gpus.values()), f"{wanted} GPUs asked; the smallest cluster has {min_gpus}"
    else:
        assert not max_gpus and not router_gpus, "GPU pods, yet the expert workers do not ask for GPUs"


def test_admin_token_comes_from_the_secret():
    [secret] = [d for _, _, d in DOCS if d["kind"] == "Secret"]
    for path, doc in RAY_CRS:
        for template in pod_templates(doc):
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            for container in template["spec"]["containers"]:
                env = {e["name"]: e for e in container.get("env", [])}
                assert "MOERAY_ADMIN_TOKEN" not in env, "never put the token itself in a manifest"
                token_file = env[ADMIN_TOKEN_FILE]["value"]
                folder, key = posixpath.split(token_file)
                [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
                # NOTE: a subPath mount never sees the Secret's updates, so rotation would need a restart.
                assert "subPath" not in mount and mount.get("readOnly") is True
                source = volumes[mount["name"]]["secret"]
                assert source["secretName"] == secret["metadata"]["name"]
                assert key in secret["stringData"] and not source.get("items")


def test_docs_name_files_that_exist():
    for doc in (ROOT / "docs" / "deploy.md", DEPLOY / "README.md"):
        text = doc.read_text()
        for name in set(re.findall(r"deploy/[\w./-]+\.(?:yaml|md)|deploy/Dockerfile(?:\.dockerignore)?", text)):
            assert (ROOT / name).exists(), f"{doc.name} names {name}, which does not exist"
