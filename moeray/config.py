"""``EngineConfig``: what an engine runs (the checkpoint, workers, routers, data path, placement), validated on
construction, and the decisions made from it before any process starts (``plan_placement``). Imports no Ray: the
in-process engine, the command line and the unit tests read it on machines without a cluster.
"""

from __future__ import annotations

import dataclasses

import torch

from moeray.deployment import TOPOLOGIES
from moeray.request import DEFAULT_MAX_FORWARD_TOKENS, check_step_fits
from moeray.router.prefill_budget import FLOOR as PREFILL_FLOOR
from moeray.model.architecture import ModelSpec
from moeray.model.backbone import LoadedCheckpoint
from moeray.placement.algorithms.plan import Plan
from moeray.placement.algorithms.policies import STATIC_POLICIES
from moeray.placement.algorithms.topology import Budget, parse_bytes, slots_per_worker
from moeray.placement.config import ControllerConfig
from moeray.placement.initial import initial_layout
from moeray.placement.runtime.controller import first_plan
from moeray.router.kv_config import KVCacheConfig
from moeray.router.overlap import MAX_MICRO_BATCHES
from moeray.telemetry import TelemetryConfig
from moeray.transport import TRANSPORTS

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
    # The most tokens one forward sends the expert workers: a step's decode tokens and prefill chunks (max_batch_size
    # + kv_cache.max_prefill_tokens must fit), a scoring batch's rows. It bounds what a worker's data port accepts.
    max_forward_tokens: int = DEFAULT_MAX_FORWARD_TOKENS
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
        for name in ("workers", "routers", "max_batch_size", "max_forward_tokens", "max_new_tokens_cap",
                     "threads_per_actor", "router_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        # early; the automatic budget needs room for its floor
        check_step_fits(self.max_batch_size, self.kv_cache.max_prefill_tokens or PREFILL_FLOOR, self.max_forward_tokens)
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
