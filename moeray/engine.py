"""``moeray.Engine``: the Python API. Validates a checkpoint, places expert workers and routers on a Ray cluster,
and runs requests through them.

    with Engine(EngineConfig(model="path/to/checkpoint", workers=2)) as engine:
        results = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=16))

``EngineConfig(backend="local")`` makes ``Engine(config)`` a ``moeray.local_engine.LocalEngine`` instead: the same
router and workers as plain objects in this process, without Ray (which this module then imports only if present).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Iterator, Sequence

import numpy as np
import torch

try:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError:  # NOTE: backend="local" runs without Ray; Engine.__init__ says what a Ray engine is missing
    ray = NodeAffinitySchedulingStrategy = None

from moeray.deployment import TOPOLOGIES, Devices, RouterGroup, choose_devices, pool_gpus, worker_options
from moeray.experts.worker import WorkerSpawner
from moeray.model.architecture import ModelSpec
from moeray.model.backbone import LoadedCheckpoint, inspect_checkpoint
from moeray.placement.algorithms.plan import Plan
from moeray.placement.algorithms.policies import STATIC_POLICIES
from moeray.placement.algorithms.topology import Budget, parse_bytes, slots_per_worker
from moeray.placement.config import ControllerConfig
from moeray.placement.initial import initial_layout
from moeray.placement.runtime.actors import ControllerActor, topology_of
from moeray.placement.runtime.controller import first_plan
from moeray.request import GenerationResult, RequestLimits, SamplingParams, StreamChunk
from moeray.router.kv_config import KVCacheConfig
from moeray.router.router import Router
from moeray.router.overlap import MAX_MICRO_BATCHES
from moeray.router.scheduler import KVStats
from moeray.telemetry import TelemetryConfig
from moeray.transport import TRANSPORTS

log = logging.getLogger(__name__)

ROUTER_RESTARTS = CONTROLLER_RESTARTS = 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ("ray", "local")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model: str  # a checkpoint directory, or a Hugging Face hub id org/name[@revision] (moeray.model.hub)
    workers: int = 2
    replicas: int = 0  # redundant expert slots per MoE layer, beyond one copy of each expert
    placement: str = "contiguous"  # the first plan's static layout, unless one of the next two is given
    initial_plan: str | None = None  # start on this plan file's layout (moeray placement export / show --json)
    initial_load: str | None = None  # start on the controller's policy's layout for this load trace (JSON Lines)
    dtype: str = "float32"
    routers: int = 1
    # Where routers and workers run (moeray.deployment): "colocated" (any node runs both) or "disaggregated" (routers
    # on nodes labelled moeray.io/role=attention, workers on moeray.io/role=experts).
    topology: str = "colocated"
    # GPUs per router for its dense compute and KV cache (None: one where the cluster has a GPU for every router
    # beside the workers', else 0: the dense half on CPU).
    router_gpus: float | None = None
    max_batch_size: int = 32
    max_new_tokens_cap: int = 4096
    use_gpus: bool | None = None  # None: one GPU per worker when the cluster has enough, else CPU shares
    worker_num_cpus: float = 0.25  # the CPU share a worker asks for when it runs without a GPU
    router_num_cpus: float = 0.0
    threads_per_actor: int = 1  # torch threads in each expert worker
    # torch threads in each router (None: threads_per_actor). The router's dense compute and its workers' expert
    # compute take turns within a step, so on a CPU node the router can use the cores its workers wait on.
    router_threads: int | None = None
    start_timeout_s: float = 600.0  # how long workers may wait for devices (an autoscaler adding nodes)
    worker_memory: str | int | None = None  # per-worker budget for expert slots, e.g. '20GiB' (None: just enough)
    track_tokens: bool = False  # count which token ids each expert receives (moeray placement inspect)
    # The per-layer data path: "tcp" (a socket per worker, one message each way: the cheapest measured at every
    # batch size), "object_store" (an actor call per touched worker), "compiled_graph" (one Ray compiled graph over
    # all workers, shared-memory channels; a single router only), "collective" (a torch.distributed group per
    # router and its workers: gloo on CPU, NCCL on GPU) or "direct" (backend "local"). See moeray.transport.
    transport: str = "tcp"
    # "ray": actors on a Ray cluster. "local": the same router and workers as plain objects in this process, the
    # direct transport between them, no Ray needed (moeray.local_engine; unit tests, machines without Ray).
    backend: str = "ray"
    # Micro-batches per step (moeray.router.overlap): while one's tokens are with the expert workers, the router
    # computes another's dense layers. None: automatic (1 for small steps, 2 when each half has enough tokens;
    # moeray.router.overlap.plan_micro_batches).
    micro_batches: int | None = None
    kv_cache: KVCacheConfig = dataclasses.field(default_factory=KVCacheConfig)  # each router's KV pool
    controller: ControllerConfig = dataclasses.field(default_factory=ControllerConfig)
    telemetry: TelemetryConfig = dataclasses.field(default_factory=TelemetryConfig)  # off unless it names an exporter

    def __post_init__(self) -> None:
        for name in ("workers", "routers", "max_batch_size", "max_new_tokens_cap", "threads_per_actor",
                     "router_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.replicas < 0:
            raise ValueError(f"replicas must be >= 0; got {self.replicas}")
        if self.micro_batches is not None and not 1 <= self.micro_batches <= MAX_MICRO_BATCHES:
            raise ValueError(f"micro_batches must lie in [1, {MAX_MICRO_BATCHES}] (or None: automatic); got "
                             f"{self.micro_batches}")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology {self.topology!r} is not one of {TOPOLOGIES}")
        if self.router_gpus is not None and self.router_gpus < 0:
            raise ValueError(f"router_gpus must be >= 0; got {self.router_gpus}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.placement not in STATIC_POLICIES:
            raise ValueError(f"placement {self.placement!r} is not one of {STATIC_POLICIES}")
        if self.initial_plan and self.initial_load:
            raise ValueError(f"initial_plan ({self.initial_plan}) and initial_load ({self.initial_load}) are "
                             "exclusive: give one")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport {self.transport!r} is not one of {TRANSPORTS}")
        if self.transport == "compiled_graph" and self.routers != 1:
            # NOTE: Ray: an actor is in one compiled graph at a time, and only its compiling process executes it.
            raise ValueError(f"transport 'compiled_graph' serves a single router (each expert worker can be in one "
                             f"compiled graph at a time); got routers={self.routers}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {BACKENDS}")
        if self.backend == "local" and self.routers != 1:
            raise ValueError(f"backend 'local' runs one router in this process; got routers={self.routers}")
        if self.backend == "local" and self.transport not in ("tcp", "direct"):  # the first is the default
            raise ValueError(f"backend 'local' calls its workers directly; transport {self.transport!r} needs "
                             "backend 'ray'")
        if self.backend == "ray" and self.transport == "direct":
            raise ValueError("transport 'direct' calls workers in this process; it needs backend 'local'")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def plan_placement(config: EngineConfig, spec: ModelSpec) -> tuple[Plan, int, Budget]:
    """The first plan (epoch 0), the slots per worker and layer, and the rebalancing budget. Raises ValueError,
    naming the value and the limit, for a worker memory or an initial plan that does not fit; needs no cluster, so
    the command line calls it before starting one."""
    itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
    expert_bytes = spec.moe_layers[0].bytes_per_expert(itemsize)  # quantized: stored bytes + scales
    needed = -(-(spec.num_experts + config.replicas) // config.workers)
    slots = needed if config.worker_memory is None else slots_per_worker(
        parse_bytes(config.worker_memory), expert_bytes, len(spec.moe_layers))
    if slots < needed:
        raise ValueError(f"worker_memory {config.worker_memory!r} holds {slots} slots per layer per worker; "
                         f"{config.workers} workers need {needed} for {spec.num_experts} experts + "
                         f"{config.replicas} redundant")
    budget = Budget(redundant=config.replicas, expert_bytes=expert_bytes,
                    max_moved_slots=config.controller.max_moved_slots,
                    max_moved_bytes=config.controller.max_moved_bytes)
    layout = initial_layout(plan_path=config.initial_plan, load_path=config.initial_load,
                            placement=config.placement, policy=config.controller.policy,
                            policy_params=config.controller.policy_params, num_layers=len(spec.moe_layers),
                            num_experts=spec.num_experts, num_workers=config.workers, slots_per_worker=slots,
                            budget=budget)
    return first_plan(layout), slots, budget


def model_memory(spec: ModelSpec, checkpoint: LoadedCheckpoint, dtype: torch.dtype) -> dict:
    """The model's parameter counts and expert bytes (the part of ``memory_report`` both backends share)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return {"total_params": spec.total_params, "active_params": spec.active_params,
            "dense_params": spec.dense_params, "expert_params": spec.expert_params,
            "expert_format": checkpoint.index.quant.label, "expert_bytes_total": spec.expert_bytes(itemsize)}


class Engine:
    def __new__(cls, config: EngineConfig):
        # NOTE: one entry point for both backends: with backend="local", Engine(config) is a LocalEngine (not an
        # Engine, so this __init__ does not run on it).
        if cls is Engine and config.backend == "local":
            from moeray.local_engine import LocalEngine

            return LocalEngine(config)
        return super().__new__(cls)

    def __init__(self, config: EngineConfig) -> None:
        if ray is None:
            raise ImportError("backend 'ray' needs Ray, which is not installed here: pip install 'ray[serve]', or "
                              "run in this process with EngineConfig(backend='local')")
        self.config = config
        # 1. Everything that can be checked without actors is checked first, so a bad checkpoint leaves none behind.
        self.checkpoint: LoadedCheckpoint = inspect_checkpoint(config.model, config.torch_dtype)
        self.spec = self.checkpoint.spec
        self.initial_plan, self.slots_per_worker, self.budget = plan_placement(config, self.spec)
        self.expert_bytes = self.budget.expert_bytes
        if config.initial_plan or config.initial_load:
            log.info("first plan from %s: layer 0 experts per worker %s", config.initial_plan or config.initial_load,
                     [self.initial_plan.experts_of(w)[0] for w in range(config.workers)])
        self.limits = RequestLimits.of(self.spec, config.max_new_tokens_cap)
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS", "local"), log_to_driver=False)
        self.workers: list = []
        self.routers: list = []
        self.controller = None
        self.router_group: RouterGroup | None = None
        try:
            self._start_actors()
        except BaseException:
            self.shutdown()
            raise

    def _devices(self) -> Devices:
        config = self.config
        worker_pool, router_pool = pool_gpus(config.topology)
        devices = choose_devices(topology=config.topology, worker_pool_gpus=worker_pool, router_pool_gpus=router_pool,
                                 workers=config.workers, routers=config.routers, use_gpus=config.use_gpus,
                                 router_gpus=config.router_gpus)
        wanted = devices.worker_gpus * config.workers + (devices.router_gpus * config.routers
                                                         if config.topology == "colocated" else 0)
        if wanted > worker_pool:
            # NOTE: not an error: on an autoscaling cluster (KubeRay) the pending actors bring up GPU nodes.
            log.warning("%d workers and %d routers need %g GPUs and the cluster has %d now: waiting up to %.0fs for "
                        "more", config.workers, config.routers, wanted, worker_pool, config.start_timeout_s)
        return devices

    def _start_actors(self) -> None:
        # NOTE: a hub checkpoint travels as org/name@<commit>, so every actor reads the snapshot the driver indexed.
        config, path = self.config, self.checkpoint.checkpoint.ref
        self.devices = self._devices()
        options = worker_options(self.devices, config.topology, config.worker_num_cpus)
        log.info("starting %d expert workers (%s) for %s", config.workers, options, path)
        spawn = WorkerSpawner(options=options, checkpoint_path=path, spec=self.spec,
                              sources=self.checkpoint.index.experts, dtype=config.torch_dtype,
                              num_threads=config.threads_per_actor, telemetry_config=config.telemetry,
                              routers=config.routers)
        self.workers.extend(spawn(w, self.initial_plan.experts_of(w)) for w in range(config.workers))
        try:
            ray.get([w.ping.remote() for w in self.workers], timeout=config.start_timeout_s)  # surfaces load errors
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{config.workers} expert workers asking {options} were not all placed within "
                               f"start_timeout_s={config.start_timeout_s}s; the cluster has "
                               f"{ray.cluster_resources()}") from None
        router_cls = ray.remote(Router)
        # Routers go where their placement group's bundles are: spread over the nodes (attention nodes when
        # disaggregated), each with its GPU; a node lost takes its bundle elsewhere and Ray restarts the router there.
        self.router_group = RouterGroup(routers=config.routers, router_gpus=self.devices.router_gpus,
                                        router_num_cpus=config.router_num_cpus, topology=config.topology)
        self.router_group.wait(config.start_timeout_s)
        controller_name = f"moeray-controller-{uuid.uuid4().hex[:12]}"
        for r in range(config.routers):
            # NOTE: Ray restarts a crashed router (its in-flight requests fail with a clear error); the restarted
            # one takes the plan in force from the controller, found by name.
            self.routers.append(router_cls.options(**self.router_group.options(r), max_concurrency=1000,
                                                   max_restarts=ROUTER_RESTARTS).remote(
                controller_name=controller_name,
                checkpoint_path=path, dtype=config.torch_dtype, plan=self.initial_plan, workers=self.workers,
                max_batch_size=config.max_batch_size, max_new_tokens_cap=config.max_new_tokens_cap,
                num_threads=config.router_threads or config.threads_per_actor, track_tokens=config.track_tokens,
                telemetry_config=config.telemetry.for_process("router", r, routers=config.routers),
                transport=config.transport, restore_timeout_s=config.controller.restore_timeout_s,
                kv_cache=config.kv_cache, device="cuda" if self.devices.router_gpus else "cpu",
                micro_batches=config.micro_batches,
            ))
        ray.get([r.ping.remote() for r in self.routers])
        self.kv_pool: KVStats = ray.get(self.routers[0].kv_stats.remote())  # the KV pool's size, as it started
        # NOTE: the controller is the only writer of the plan from here on. A crashed controller restarts and
        # rebuilds the plan from the workers; requests never wait on it. It stays on this process's node (hard
        # affinity): its actors share this process's fate anyway (it owns them), and a soft one spilled onto other
        # nodes, where losing one restarted it while a router there restarted too, each constructor waiting on the
        # other (seen in tests/integration/test_router_placement.py).
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.controller = ray.remote(ControllerActor).options(num_cpus=0, max_concurrency=8, name=controller_name,
                                                              max_restarts=CONTROLLER_RESTARTS,
                                                              scheduling_strategy=here).remote(
            config=config.controller, plan=self.initial_plan, topology=topology_of(self.workers, self.slots_per_worker),
            budget=self.budget, workers=self.workers, routers=self.routers, spawn=spawn,
            telemetry_config=config.telemetry.for_process("controller"))
        ray.get(self.controller.ping.remote())
        ray.get([r.set_controller.remote(self.controller) for r in self.routers])  # for restores after a loss
        log.info("moeray engine ready: %d routers, %d workers", len(self.routers), len(self.workers))

    # -- requests ----------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None, router: int = 0):
        """Start one request; returns an ObjectRef to its GenerationResult. Bad input raises here, at once."""
        sampling = sampling or SamplingParams()
        ids = self.limits.check(prompt_ids, sampling)
        return self.routers[router % len(self.routers)].generate.remote(ids, sampling)

    def stream(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None, request_id: str | None = None,
               router: int = 0) -> Iterator[StreamChunk]:
        """Tokens as they are produced; the last chunk carries the finish reason. Bad input raises at once."""
        sampling = sampling or SamplingParams()
        ids = self.limits.check(prompt_ids, sampling)
        chunks = self.routers[router % len(self.routers)].stream.options(num_returns="streaming").remote(
            ids, sampling, request_id)
        for ref in chunks:
            yield ray.get(ref)

    def abort(self, request_id: str) -> bool:
        """Stop a running request on whichever router runs it; False if none does."""
        return any(ray.get([r.abort.remote(request_id) for r in self.routers]))

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationResult]:
        """Run prompts concurrently (they share batched steps); results in prompt order."""
        samplings = self.limits.check_batch(prompts, sampling)
        refs = [self.submit(p, s, router=i) for i, (p, s) in enumerate(zip(prompts, samplings))]
        return ray.get(refs)

    def score(self, input_ids_BT, attention_mask_BT=None, router: int = 0) -> np.ndarray:
        """Logits [B, T, V] for whole prompts (no generation)."""
        return ray.get(self.routers[router % len(self.routers)].score.remote(
            np.asarray(input_ids_BT), None if attention_mask_BT is None else np.asarray(attention_mask_BT)))

    # -- introspection -----------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        return {
            **model_memory(self.spec, self.checkpoint, self.config.torch_dtype),
            "router_resident_bytes": ray.get([r.resident_bytes.remote() for r in self.routers]),
            "router_expert_bytes": ray.get([r.expert_bytes_held.remote() for r in self.routers]),
            "worker_resident_bytes": [w["resident_bytes"] for w in self.workers_info()],
        }

    def workers_info(self) -> list[dict]:
        self.workers = ray.get(self.controller.workers.remote())  # the controller's list: it may have scaled
        return ray.get([w.info.remote() for w in self.workers])

    def routers_info(self, timeout_s: float = 10.0) -> list[dict]:
        """Where each router runs (``Router.where``); a router that does not answer within ``timeout_s`` (restarting
        on another node, or gone) is {"state": <the error's name>}."""
        refs = [r.where.remote() for r in self.routers]
        info = []
        for ref in refs:
            try:
                info.append({"state": "alive", **ray.get(ref, timeout=timeout_s)})
            except Exception as e:  # noqa: BLE001 - any failure says the same: not serving now
                info.append({"state": type(e).__name__})
        return info

    def take_load(self) -> tuple[np.ndarray, np.ndarray]:
        """Tokens per (MoE layer, logical expert) and per (MoE layer, worker) since the last call, all routers."""
        return ray.get(self.controller.take_load.remote())

    # -- placement ---------------------------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The plan in force (the controller's)."""
        return ray.get(self.controller.plan.remote())

    def save_plan(self, path: str) -> None:
        """Write the plan in force to a plan file, which ``EngineConfig(initial_plan=path)`` starts from."""
        from moeray.placement.initial import write_plan

        write_plan(path, self.plan, slots_per_worker=self.slots_per_worker)

    def scale(self, workers: int) -> dict:
        """Grow or shrink the expert workers to ``workers`` while requests flow: new workers get slots (weights from
        peers), leaving ones are drained (their experts placed elsewhere first) and stopped."""
        record = ray.get(self.controller.scale.remote(workers))
        self.workers = ray.get(self.controller.workers.remote())
        return record

    def rebalance(self, *, dry_run: bool = False, policy: str | None = None, params: dict | None = None) -> dict:
        """Rebalance now from the load window; returns the moves and the expected imbalance before and after."""
        return ray.get(self.controller.rebalance.remote(dry_run=dry_run, policy=policy, params=params))

    def set_policy(self, name: str, params: dict | None = None) -> None:
        ray.get(self.controller.set_policy.remote(name, params))

    # -- lifecycle ---------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self.controller is not None:
            try:
                self.workers = ray.get(self.controller.workers.remote(), timeout=10)  # it may have scaled
            except Exception:
                pass
            try:
                ray.get(self.controller.shutdown.remote(), timeout=10)
            except Exception:  # already gone; killed next either way
                pass
            ray.kill(self.controller)
            self.controller = None
        for router in self.routers:
            try:
                ray.get(router.shutdown.remote(), timeout=10)
            except Exception:  # the router may already be gone; it is killed next either way
                pass
        for actor in self.routers + self.workers:
            ray.kill(actor)
        self.routers, self.workers = [], []
        if self.router_group is not None:
            self.router_group.remove()
            self.router_group = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
