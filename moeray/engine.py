"""``moeray.Engine``: the Python API. Validates a checkpoint, places expert workers and routers on a Ray cluster,
and runs requests through them.

    with Engine(EngineConfig(model="path/to/checkpoint", workers=2)) as engine:
        results = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=16))

``EngineConfig(backend="local")`` makes ``Engine(config)`` a ``moeray.local_engine.LocalEngine`` instead: the same
router and workers as plain objects in this process, without Ray (which this module then imports only if present).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator, Sequence

import numpy as np

try:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError:  # NOTE: backend="local" runs without Ray; Engine.__init__ says what a Ray engine is missing
    ray = NodeAffinitySchedulingStrategy = None

from moeray.config import EngineConfig, model_memory, plan_placement
from moeray.deployment import Devices, RouterGroup, choose_devices, pool_gpus, worker_options
from moeray.experts.worker import WorkerSpawner
from moeray.model.backbone import LoadedCheckpoint, inspect_checkpoint
from moeray.placement.algorithms.plan import Plan
from moeray.placement.runtime.actors import ControllerActor, topology_of
from moeray.request import (MAX_MIGRATIONS, GenerationResult, RequestLimits, SamplingParams, StreamChunk,
                            new_request_id)
from moeray.router.router import Router
from moeray.router.scheduler import KVStats

log = logging.getLogger(__name__)

ROUTER_RESTARTS = CONTROLLER_RESTARTS = 3


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
                              routers=config.routers, max_forward_tokens=config.max_forward_tokens)
        self.workers.extend(spawn(w, self.initial_plan.experts_of(w)) for w in range(config.workers))
        # NOTE: the workers are placed and loaded before any router starts: a router's group reserved first could
        # take a device a worker needs, and a router waiting on a worker never placed would hang the cleanup.
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
                max_forward_tokens=config.max_forward_tokens,
                num_threads=config.router_threads or config.threads_per_actor, track_tokens=config.track_tokens,
                telemetry_config=config.telemetry.for_process("router", r, routers=config.routers),
                transport=config.transport, restore_timeout_s=config.controller.restore_timeout_s,
                kv_cache=config.kv_cache, device="cuda" if self.devices.router_gpus else "cpu",
                micro_batches=config.micro_batches, replica_rule=config.controller.replica_rule,
            ))
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
        ray.get([r.ping.remote() for r in self.routers])  # NOTE: the controller starts meanwhile
        self.kv_pool: KVStats = ray.get(self.routers[0].kv_stats.remote())  # the KV pool's size, as it started
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
        """Tokens as they are produced; the last chunk carries the finish reason. Bad input raises at once. A router
        that dies goes unnoticed: the request goes on at the next router from the tokens it streamed (as the
        ingress does, moeray/serving/engine_handle.py), at most MAX_MIGRATIONS times."""
        sampling = sampling or SamplingParams()
        ids = self.limits.check(prompt_ids, sampling)
        request_id = request_id or new_request_id()  # the same id wherever it goes on
        streamed: list[int] = []
        for moved in range(MAX_MIGRATIONS + 1):
            index = (router + moved) % len(self.routers)
            chunks = self.routers[index].stream.options(num_returns="streaming").remote(
                ids, sampling, request_id, None, streamed)
            try:
                for ref in chunks:
                    chunk = ray.get(ref)
                    streamed.extend(chunk.token_ids)
                    yield chunk
                return
            except ray.exceptions.RayActorError:
                if moved == MAX_MIGRATIONS:
                    raise
                log.warning("router %d died while request %s ran (%d tokens streamed): it goes on at router %d",
                            index, request_id, len(streamed), (router + moved + 1) % len(self.routers))

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

    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int = 0, router: int = 0) -> list:
        """Each prompt position's TokenLogprob given the tokens before it (None first), ``top`` alternatives each."""
        return ray.get(self.routers[router % len(self.routers)].prompt_logprobs.remote(list(prompt_ids), top))

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
