"""Where the engine's actors run on a Ray cluster: the topology, who gets a GPU, and the routers' placement group.

Two topologies (``EngineConfig.topology``):

- ``colocated``: every node may run routers and expert workers (data-parallel attention + expert parallelism, as
  vLLM's and SGLang's DP+EP deployments). Routers spread over the nodes through a placement group.
- ``disaggregated``: routers on attention nodes, expert workers on expert nodes (MegaScale-Infer), told apart by the
  Ray node label ``moeray.io/role`` = ``attention`` or ``experts`` (``ray start --labels moeray.io/role=experts``;
  KubeRay: a worker group's ``labels``).

A router asks for ``router_gpus`` (default: one, where the cluster has a GPU for every router and worker) and runs
the dense parts and its KV cache on that device. Routers are not pinned to the driver: the placement group's bundles
SPREAD over nodes, and when a router's node dies Ray re-creates its bundle on a live node and restarts the router
there (``max_restarts``), which takes the plan in force from the controller.

``choose_devices`` is the pure decision; ``RouterGroup`` is the thin stateful shell around Ray's placement group.
"""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)

TOPOLOGIES = ("colocated", "disaggregated")
ROLE_LABEL = "moeray.io/role"
ATTENTION, EXPERTS = "attention", "experts"
# NOTE: a placement group bundle must ask for something. A router that asks for nothing asks for one byte of memory,
# which takes nothing from anyone (even a thousandth of a CPU did: workers sized to fill the CPUs no longer fit).
EMPTY_BUNDLE = {"memory": 1}


@dataclasses.dataclass(frozen=True)
class Devices:
    worker_gpus: int  # per expert worker: 1 or 0 (then a CPU share)
    router_gpus: float  # per router: 0 keeps the dense half on CPU


def choose_devices(*, topology: str, worker_pool_gpus: int, router_pool_gpus: int, workers: int, routers: int,
                   use_gpus: bool | None, router_gpus: float | None) -> Devices:
    """GPUs per worker and per router. ``*_pool_gpus``: the GPUs on the nodes each role may use (colocated: both are
    the whole cluster's). ``None`` settings are chosen: workers take a GPU each when there is one for every worker;
    routers too when, beside the workers, there is one for every router."""
    worker_gpus = int(use_gpus if use_gpus is not None else worker_pool_gpus >= workers)
    if router_gpus is None:
        left = worker_pool_gpus - worker_gpus * workers if topology == "colocated" else router_pool_gpus
        router_gpus = 1.0 if (worker_gpus or topology == "disaggregated") and left >= routers else 0.0
    return Devices(worker_gpus=worker_gpus, router_gpus=float(router_gpus))


def pool_gpus(topology: str) -> tuple[int, int]:
    """GPUs on the nodes workers and routers may use, now (alive nodes only)."""
    import ray

    worker_gpus = router_gpus = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        gpus = int(node.get("Resources", {}).get("GPU", 0))
        role = node.get("Labels", {}).get(ROLE_LABEL)
        if topology == "colocated":
            worker_gpus, router_gpus = worker_gpus + gpus, router_gpus + gpus
        elif role == EXPERTS:
            worker_gpus += gpus
        elif role == ATTENTION:
            router_gpus += gpus
    return worker_gpus, router_gpus


def role_selector(topology: str, role: str) -> dict[str, str] | None:
    """The node label selector for a role's actors (None: any node)."""
    return {ROLE_LABEL: role} if topology == "disaggregated" else None


def worker_options(devices: Devices, topology: str, worker_num_cpus: float) -> dict:
    options = {"num_gpus": 1, "num_cpus": 0} if devices.worker_gpus else {"num_cpus": worker_num_cpus}
    selector = role_selector(topology, EXPERTS)
    return {**options, "label_selector": selector} if selector else options


class RouterGroup:
    """The routers' placement group: one bundle per router, spread over nodes (of the attention role when
    disaggregated). It lives as long as the process that made it (the driver or the serving host)."""

    def __init__(self, *, routers: int, router_gpus: float, router_num_cpus: float, topology: str) -> None:
        from ray.util.placement_group import placement_group

        self.bundle = {**({"CPU": router_num_cpus} if router_num_cpus else {}),
                       **({"GPU": router_gpus} if router_gpus else {})} or dict(EMPTY_BUNDLE)
        selector = role_selector(topology, ATTENTION)
        self.group = placement_group([dict(self.bundle) for _ in range(routers)], strategy="SPREAD",
                                     bundle_label_selector=[selector] * routers if selector else None)
        self.router_gpus, self.router_num_cpus = router_gpus, router_num_cpus

    def wait(self, timeout_s: float) -> None:
        import ray

        if not self.group.wait(timeout_seconds=timeout_s):
            raise TimeoutError(f"{self.group.bundle_count} routers asking {self.bundle} each were not all placed "
                               f"within start_timeout_s={timeout_s}s; the cluster has {ray.cluster_resources()}")

    def options(self, index: int) -> dict:
        """Ray actor options that put router ``index`` in its bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"num_cpus": self.router_num_cpus, "num_gpus": self.router_gpus,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self.group,
                                                                        placement_group_bundle_index=index)}

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        try:
            remove_placement_group(self.group)
        except Exception:  # noqa: BLE001 - already gone with the cluster
            pass
