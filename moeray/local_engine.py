"""``EngineConfig(backend="local")``: the whole engine in this process, without Ray.

    with moeray.Engine(EngineConfig(model="path/to/checkpoint", workers=2, backend="local")) as engine:
        results = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=16))

The same ``Router`` (backbone, scheduler, dispatcher) and ``ExpertWorker`` code as the Ray engine, run as plain
objects: the router's step loop is a thread of this process, and its dispatcher reaches the workers through the
direct transport (``moeray.transport.direct``). The placement controller is the same ``PlacementController``
with in-process ``LocalOps`` in place of Ray calls, polled by a thread as its actor polls: rebalancing, policies,
automatic triggers and scaling behave as on Ray. Outputs equal the Ray engine's and transformers'.

What differs: one router; the device is this process's (CUDA when torch sees a GPU, every worker on it, else the
CPU); torch keeps this process's thread count unless ``router_threads`` sets one; ``submit`` returns a
``LocalRequest`` (``.result()``) instead of a Ray ObjectRef; workers cannot die apart from the process, so there is
nothing to restore or heal. Ray is not needed: nothing here calls it, and ``moeray.engine`` imports it only where it
is installed (tests/unit/test_local_engine.py runs this engine with Ray's import blocked).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from moeray.config import EngineConfig, model_memory, plan_placement
from moeray.experts.worker import ExpertWorker
from moeray.model.backbone import LoadedCheckpoint, inspect_checkpoint
from moeray.placement.algorithms.plan import Plan
from moeray.placement.algorithms.topology import Topology
from moeray.placement.runtime.controller import PlacementController
from moeray.request import GenerationResult, RequestLimits, SamplingParams, StreamChunk
from moeray.router.router import Router
from moeray.router.scheduler import KVStats
from moeray.router.sequence import Sequence as Seq

log = logging.getLogger(__name__)

LOCAL_NODE = "local"  # every in-process worker's node, for the controller's topology


class LocalRequest:
    """One submitted request: what ``LocalEngine.submit`` returns, as ``Engine.submit`` returns a Ray ObjectRef."""

    def __init__(self, seq: Seq) -> None:
        self._seq = seq

    @property
    def request_id(self) -> str:
        return self._seq.request_id

    def done(self) -> bool:
        return self._seq.done.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the request to finish; its error, if it failed, raises here."""
        if not self._seq.done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout}s")
        if self._seq.error is not None:
            raise self._seq.error
        return self._seq.result()


class LocalOps:
    """The controller's ``ActorOps`` over in-process workers and the one router. Like ``RayActorOps``:
    ``workers`` are the current plan's, ``next_workers`` the next plan's (the same list unless ``stage`` staged
    another); prepare, switch and commit address the next ones, peers are named in the current numbering."""

    def __init__(self, workers: list[ExpertWorker], router: Router, spawn) -> None:
        self.workers, self.router, self.spawn_worker = list(workers), router, spawn
        self.next_workers = self.workers

    def take_loads(self) -> list[dict]:
        return [self.router.take_load()]

    def worker_infos(self) -> list[dict | None]:
        return [w.info() for w in self.workers]

    def dead_workers(self) -> list[int]:
        return []  # an in-process worker fails with its process

    def max_workers(self) -> int | None:
        return None  # no cluster resources to count: config.controller.max_workers bounds scaling

    def spawn(self, count: int, epoch: int, timeout_s: float) -> list[ExpertWorker]:
        return [self.spawn_worker(len(self.workers) + i, epoch=epoch) for i in range(count)]

    def stage(self, keep: list[int], new: list) -> list[str]:
        self.next_workers = [self.workers[i] for i in keep] + list(new)
        return [LOCAL_NODE] * len(self.next_workers)

    def stop(self, workers: list) -> None:
        pass  # dropping the last reference frees a worker's slots

    def prepare(self, epoch: int, experts_per_worker: list[list[list[int]]],
                peers_per_worker: list[dict[int, list[tuple[int, int]]]], skip: frozenset[int]) -> list[dict]:
        return [w.prepare(epoch, experts, [(self.workers[p], pairs) for p, pairs in peers.items()])
                for i, (w, experts, peers) in enumerate(zip(self.next_workers, experts_per_worker, peers_per_worker))
                if i not in skip]

    def switch(self, plan: Plan) -> None:
        self.router.set_plan(plan, None if self.next_workers is self.workers else self.next_workers)

    def commit(self, epoch: int, skip: frozenset[int]) -> None:
        for i, w in enumerate(self.next_workers):
            if i not in skip:
                w.commit(epoch, i)
        self.workers = self.next_workers

    def abort(self, epoch: int, skip: frozenset[int]) -> None:
        for i, w in enumerate(self.next_workers):
            if i not in skip:
                w.abort(epoch)
        self.next_workers = self.workers


class LocalEngine:
    """``moeray.Engine``'s API in one process (see the module's docstring); ``Engine(config)`` returns one when
    ``config.backend == "local"``."""

    def __init__(self, config: EngineConfig) -> None:
        if config.backend != "local":
            raise ValueError(f"LocalEngine runs backend 'local'; the config asks for backend {config.backend!r}")
        self.config = config
        self.checkpoint: LoadedCheckpoint = inspect_checkpoint(config.model, config.torch_dtype)
        self.spec = self.checkpoint.spec
        self.initial_plan, self.slots_per_worker, self.budget = plan_placement(config, self.spec)
        self.expert_bytes = self.budget.expert_bytes
        self.limits = RequestLimits.of(self.spec, config.max_new_tokens_cap)
        # NOTE: torch's thread count is process-wide, and every worker and the router would set it: they are given
        # the one this process runs with (or router_threads), so that building them changes nothing.
        self._threads = config.router_threads or torch.get_num_threads()
        self.controller: PlacementController | None = None
        self.routers: list[Router] = []
        self._stopped = threading.Event()
        self._poller: threading.Thread | None = None
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    def _spawn_worker(self, index: int, experts_per_layer: list[list[int]] | None = None,
                      epoch: int = 0) -> ExpertWorker:
        return ExpertWorker(worker_index=index, checkpoint_path=self.checkpoint.checkpoint.ref, spec=self.spec,
                            sources=self.checkpoint.index.experts,
                            experts_per_layer=experts_per_layer or [[] for _ in self.spec.moe_layers],
                            dtype=self.config.torch_dtype, num_threads=self._threads, epoch=epoch,
                            max_forward_tokens=self.config.max_forward_tokens)

    def _start(self) -> None:
        config = self.config
        # Workers first: on a GPU, a KV pool sized as a fraction of free memory then leaves their slots room.
        workers = [self._spawn_worker(w, self.initial_plan.experts_of(w)) for w in range(config.workers)]
        router = Router(checkpoint_path=self.checkpoint.checkpoint.ref, dtype=config.torch_dtype,
                        plan=self.initial_plan, workers=workers, max_batch_size=config.max_batch_size,
                        max_new_tokens_cap=config.max_new_tokens_cap, max_forward_tokens=config.max_forward_tokens,
                        num_threads=self._threads,
                        track_tokens=config.track_tokens, transport="direct", kv_cache=config.kv_cache,
                        telemetry_config=config.telemetry.for_process("router", 0, routers=1),
                        restore_timeout_s=config.controller.restore_timeout_s, micro_batches=config.micro_batches,
                        replica_rule=config.controller.replica_rule)
        self.routers.append(router)
        self.kv_pool: KVStats = router.kv_stats()
        topology = Topology(worker_node=(0,) * config.workers, slots_per_worker=self.slots_per_worker)
        self.controller = PlacementController(config=config.controller, plan=self.initial_plan, topology=topology,
                                              budget=self.budget, ops=LocalOps(workers, router, self._spawn_worker))
        # The controller's actor polls the routers' load on a thread; so does this engine (automatic rebalances).
        self._poller = threading.Thread(target=self._poll, name="moeray-placement-loop", daemon=True)
        self._poller.start()
        log.info("moeray local engine ready: %d workers on %s", config.workers, workers[0].device)

    def _poll(self) -> None:
        while not self._stopped.wait(self.config.controller.poll_interval_s):
            try:
                self.controller.poll()
            except Exception:  # a failed poll or automatic rebalance must not stop the loop
                log.exception("placement poll failed")

    @property
    def router(self) -> Router:
        return self.routers[0]

    @property
    def workers(self) -> list[ExpertWorker]:
        """The workers of the plan in force (the controller's list: it may have scaled)."""
        return list(self.controller.ops.workers) if self.controller is not None else []

    # -- requests ----------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None, router: int = 0,
               request_id: str | None = None) -> LocalRequest:
        """Start one request; ``.result()`` on what it returns waits for its GenerationResult. Bad input raises
        here, at once. ``router`` is accepted for ``Engine``'s signature: there is one."""
        seq = self.router.new_sequence(list(prompt_ids), sampling or SamplingParams(), request_id)
        return LocalRequest(self.router.scheduler.submit(seq))

    def stream(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None, request_id: str | None = None,
               router: int = 0) -> Iterator[StreamChunk]:
        """Tokens as they are produced; the last chunk carries the finish reason. Bad input raises at once; the
        request starts when the first chunk is asked for, and closing the iterator early aborts it."""
        sampling = sampling or SamplingParams()
        ids = self.limits.check(prompt_ids, sampling)
        return self.router.stream(ids, sampling, request_id)

    def abort(self, request_id: str) -> bool:
        """Stop a running request; False if none runs under this id."""
        return self.router.abort(request_id)

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationResult]:
        """Run prompts concurrently (they share batched steps); results in prompt order."""
        samplings = self.limits.check_batch(prompts, sampling)
        pending: list[LocalRequest] = []
        try:
            for p, s in zip(prompts, samplings):
                pending.append(self.submit(p, s))
        except BaseException:  # e.g. one prompt too long for the KV pool: the ones already started stop
            for r in pending:
                self.abort(r.request_id)
            raise
        return [r.result() for r in pending]

    def score(self, input_ids_BT, attention_mask_BT=None, router: int = 0) -> np.ndarray:
        """Logits [B, T, V] for whole prompts (no generation)."""
        return self.router.score(np.asarray(input_ids_BT),
                                 None if attention_mask_BT is None else np.asarray(attention_mask_BT))

    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int = 0, router: int = 0) -> list:
        """Each prompt position's TokenLogprob given the tokens before it (None first), ``top`` alternatives each."""
        return self.router.prompt_logprobs(list(prompt_ids), top)

    # -- introspection -----------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        return {
            **model_memory(self.spec, self.checkpoint, self.config.torch_dtype),
            "router_resident_bytes": [self.router.resident_bytes()],
            "router_expert_bytes": [self.router.expert_bytes_held()],
            "worker_resident_bytes": [w.resident_bytes() for w in self.workers],
        }

    def workers_info(self) -> list[dict]:
        return [w.info() for w in self.workers]

    def take_load(self) -> tuple[np.ndarray, np.ndarray]:
        """Tokens per (MoE layer, logical expert) and per (MoE layer, worker) since the last call."""
        return self.controller.take_load()

    # -- placement ---------------------------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The plan in force (the controller's)."""
        return self.controller.plan

    def save_plan(self, path: str) -> None:
        """Write the plan in force to a plan file, which ``EngineConfig(initial_plan=path)`` starts from."""
        from moeray.placement.initial import write_plan

        write_plan(path, self.plan, slots_per_worker=self.slots_per_worker)

    def scale(self, workers: int) -> dict:
        """Grow or shrink the expert workers to ``workers`` while requests flow (new ones load from peers; all
        share this process's device)."""
        return self.controller.scale(workers)

    def rebalance(self, *, dry_run: bool = False, policy: str | None = None, params: dict | None = None) -> dict:
        """Rebalance now from the load window; returns the moves and the expected imbalance before and after."""
        self.controller.pull()  # NOTE: the window then holds every step run so far, not only those the poller saw
        return self.controller.rebalance(dry_run=dry_run, policy=policy, params=params)

    def set_policy(self, name: str, params: dict | None = None) -> None:
        self.controller.set_policy(name, params)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the step loop and the poller, and drop the workers (their memory is freed with them)."""
        self._stopped.set()
        if self._poller is not None:
            self._poller.join(timeout=10)
            self._poller = None
        for router in self.routers:
            router.shutdown()
        self.routers, self.controller = [], None

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
