"""Dispatch and combine: the router's side of one MoE layer.

    top_k_index[T,K], top_k_weights[T,K]  (the model's own gate)
      -> pairs (token, expert, weight), pads dropped
      -> pick a replica per pair (each expert deals its pairs to its live slots in turn:
         moeray/placement/algorithms/routing.py)
      -> bucket by worker; one call per touched worker carrying only its tokens, sent by the transport
         (object store: an actor call each; compiled graph: one execute over every worker; moeray.transport)
      -> combine: scatter-add each worker's weighted partial sums back to token order
      (a worker found dead: its pairs go round again on the expert's other replicas; with none left,
       ExpertsUnavailable, and the router waits for the controller to re-place the experts and retries the step)

A step split into micro-batches calls the dispatcher from several threads at once (``moeray.router.overlap``), so
everything set per forward (the token ids, the workers a call touched) is per thread, counters are
updated under a lock, and the send gives up the router's turn while the tokens are away. A transport that is not
safe to call from two threads at once (``concurrent_sends`` false or absent: a compiled graph's one in-flight
execution, a process group's ordered messages) is sent through one at a time; the other micro-batch's dense
compute still runs meanwhile.

Shape legend: T tokens, H hidden, K top-k, N (token, expert) pairs, L MoE layers, E experts, W workers.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch

from moeray import telemetry
from moeray.placement.algorithms.plan import Plan
from moeray.placement.algorithms.routing import RULES
from moeray.router import overlap
from moeray.router.load import LoadCounter
from moeray.transport.base import Transport
from moeray.transport.wire import WorkerCall, pack, unpack

log = logging.getLogger(__name__)


class ExpertsUnavailable(RuntimeError):
    """Experts of a layer have no live replica: the step waits for the controller to re-place them."""

    def __init__(self, layer: int, experts: list[int], dead_workers: list[int]) -> None:
        super().__init__(f"MoE layer {layer}: experts {experts} have no live replica (dead workers {dead_workers})")
        self.layer, self.experts, self.dead_workers = layer, experts, dead_workers

    def __reduce__(self):  # so that it crosses Ray's process boundaries intact
        return type(self), (self.layer, self.experts, self.dead_workers)


@dataclasses.dataclass
class DispatchTimes:
    """Where the dispatcher's time went, summed over layer calls (and over micro-batches running at once)."""

    calls: int = 0
    prepare_s: float = 0.0  # pairs, replicas, buckets and the per-worker calls, on the router
    send_s: float = 0.0  # in the transport: submission, the workers' round trip, results back
    combine_s: float = 0.0  # unpacking results, scatter-add, load counting, on the router

    @property
    def total_s(self) -> float:
        return self.prepare_s + self.send_s + self.combine_s


class _PerForward(threading.local):
    """What the scheduler sets around each forward, per thread: micro-batches run their forwards at once."""

    token_ids_T: np.ndarray | None = None  # their token ids (for the optional per-expert token histogram)
    workers_touched: int = 0  # by this thread's last layer call (telemetry)


def _host(t: torch.Tensor | np.ndarray | None) -> np.ndarray | None:
    return t.cpu().numpy() if isinstance(t, torch.Tensor) else t


def _scatter_add(y_TH: torch.Tensor, answered: list[tuple[np.ndarray, torch.Tensor]]) -> None:
    """y_TH[tokens_T] += part_TH for each worker's (tokens_T, part_TH); a worker's tokens are distinct.

    NOTE: on a CPU in a numpy dtype this runs in numpy, not as torch's index_add_: that op always starts torch's
    OpenMP team, and right after a layer's wait the team's other threads are asleep. On a busy machine waking them
    cost milliseconds per layer (measured: a one-token layer's combine, 2 router threads, 20 ms at a median against
    0.1 ms; ``moeray bench layer``'s breakdown). numpy never spreads an add over threads."""
    if y_TH.device.type == "cpu" and y_TH.dtype in (torch.float32, torch.float64):
        y_np = y_TH.numpy()
        for tokens_T, part_TH in answered:
            y_np[tokens_T] += part_TH.numpy()
        return
    for tokens_T, part_TH in answered:
        y_TH.index_add_(0, torch.from_numpy(tokens_T).to(y_TH.device), part_TH.to(y_TH.device, non_blocking=True))


class ExpertDispatcher:
    """Dispatch and combine over ``transport``, which holds the worker handles ``plan`` numbers (see
    ``moeray.transport.make_transport``)."""

    def __init__(self, plan: Plan, transport: Transport, *, track_tokens: bool = False,
                 replica_rule: str = "even") -> None:
        self.dead_workers: set[int] = set()
        self._route = RULES[replica_rule]  # ControllerConfig.replica_rule
        self.transport = transport
        self.on_worker_lost = None  # called with a worker index when a call to it finds it dead
        self.load = LoadCounter(num_layers=plan.num_layers, num_experts=plan.num_experts,
                                num_workers=plan.num_workers, track_tokens=track_tokens)
        self._per_forward = _PerForward()
        self._lock = threading.Lock()  # the counters, and the live routing a worker's death rebuilds
        self._send_lock = threading.Lock()  # for transports that take one send at a time (module docstring)
        self.plan: Plan | None = None
        self.set_plan(plan)
        self.dispatch_s = 0.0  # wall time in dispatch/combine, expert compute included
        self.times = DispatchTimes()

    # Set by the scheduler around each forward, for the forward on the calling thread; kept as numpy, made once per
    # forward rather than once per MoE layer.
    token_ids_T = property(lambda self: self._per_forward.token_ids_T,
                           lambda self, v: setattr(self._per_forward, "token_ids_T", _host(v)))

    @property
    def workers_touched(self) -> int:
        return self._per_forward.workers_touched

    def set_plan(self, plan: Plan, workers: Sequence | None = None) -> None:
        """Switch to a new epoch's plan (and worker handles, when they changed); call between forwards only."""
        count = len(self.transport.workers if workers is None else workers)
        if count != plan.num_workers:
            raise ValueError(f"the plan places experts on {plan.num_workers} workers; {count} were given")
        if workers is not None:  # a new worker list (the controller scaled): earlier deaths no longer apply
            self.dead_workers = set()
            self.transport.set_workers(list(workers))
        if self.plan is None or plan.num_workers != self.plan.num_workers:
            self.load.resize(plan.num_workers)
        self.plan = plan
        self._slot_worker_LP = plan.slot_worker_LP.numpy()
        self._local_slot_LP = plan.local_slot_LP.numpy()
        self._route_live_slots()

    def mark_dead(self, worker: int) -> None:
        """Stop routing to a worker whose actor died; its experts' other replicas take its tokens. Two
        micro-batches may find the same death: it is acted on once."""
        with self._lock:
            if worker in self.dead_workers:
                return
            self.dead_workers.add(worker)
            self._route_live_slots()
        if self.on_worker_lost is not None:
            self.on_worker_lost(worker)

    def _route_live_slots(self) -> None:
        """log2phy and replica counts over the slots of live workers only (the plan's own when none died),
        replaced as one pair: a micro-batch dispatching meanwhile reads either the old routing or the new."""
        phy2log_LP = self.plan.phy2log_LP.numpy()
        live_LP = ~np.isin(self._slot_worker_LP, sorted(self.dead_workers))
        replicas_LE = np.zeros((self.plan.num_layers, self.plan.num_experts), dtype=np.int64)
        np.add.at(replicas_LE, (np.arange(self.plan.num_layers)[:, None], phy2log_LP), live_LP)
        log2phy_LER = np.full((self.plan.num_layers, self.plan.num_experts, max(1, int(replicas_LE.max()))), -1,
                              dtype=np.int64)
        for l in range(self.plan.num_layers):
            seen = [0] * self.plan.num_experts
            for p, (e, live) in enumerate(zip(phy2log_LP[l].tolist(), live_LP[l].tolist())):
                if live:
                    log2phy_LER[l, e, seen[e]] = p
                    seen[e] += 1
        self._routing = (replicas_LE, log2phy_LER)
        self._cursor_LE = np.zeros_like(replicas_LE)  # each expert's turn among its replicas (routing.py)

    def __call__(
        self, layer: int, x_TH: torch.Tensor, top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor
    ) -> torch.Tensor:
        started = time.perf_counter()
        span = telemetry.dispatch_span(layer, self.plan.epoch) if telemetry.STATE.on else None
        try:
            return self._dispatch(layer, x_TH, top_k_index_TK, top_k_weights_TK)
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.dispatch_s += elapsed
                self.times.calls += 1
            if telemetry.STATE.on:
                telemetry.dispatched(span, layer, elapsed, len(x_TH), self.workers_touched)

    def _dispatch(self, layer: int, x_TH: torch.Tensor, top_k_index_TK: torch.Tensor,
                  top_k_weights_TK: torch.Tensor) -> torch.Tensor:
        # NOTE: the bookkeeping is numpy, not torch: each torch call costs microseconds of dispatch, and at one
        # token a layer makes some thirty of them (measured over a transport that echoes: a one-token layer
        # 105 -> 33 us, a 256-token one 1.14 -> 0.30 ms).
        started = time.perf_counter()
        num_tokens, top_k = top_k_index_TK.shape
        # 1. Flatten to (token, expert, weight) pairs (forwards are packed: no token is padding).
        pair_token_N = np.arange(num_tokens).repeat(top_k)
        pair_expert_N = top_k_index_TK.reshape(-1).cpu().numpy()
        pair_weight_N = top_k_weights_TK.reshape(-1).to("cpu", torch.float32).numpy()
        token_id_N = None if self.token_ids_T is None else self.token_ids_T[pair_token_N]
        y_TH = torch.zeros_like(x_TH)
        self._run_pairs(layer, x_TH, y_TH, pair_token_N, pair_expert_N, pair_weight_N, token_id_N, started)
        return y_TH

    def _run_pairs(self, layer: int, x_TH: torch.Tensor, y_TH: torch.Tensor, pair_token_N: np.ndarray,
                   pair_expert_N: np.ndarray, pair_weight_N: np.ndarray, token_id_N: np.ndarray | None,
                   started: float) -> None:
        """Steps 2-4 for a set of pairs; the pairs of a worker that died are run again on live replicas.
        ``started``: when this layer's preparation began (for ``times``)."""
        # 2. A replica per pair: each expert deals its pairs to its live slots in turn, from where its last call
        # stopped, or (replica_rule least_loaded) then moves shares toward this call's least loaded workers
        # (moeray/placement/algorithms/routing.py: the rule the load model follows too).
        replicas_LE, log2phy_LER = self._routing
        replicas_N = replicas_LE[layer, pair_expert_N]
        if not replicas_N.all():
            lost = sorted(set(pair_expert_N[replicas_N == 0].tolist()))
            raise ExpertsUnavailable(layer, lost, sorted(self.dead_workers))
        with self._lock:  # NOTE: micro-batches dispatch on several threads; each takes the turn the last left
            cursor_LE = self._cursor_LE
            slot_N, cursor_LE[layer] = self._route(pair_expert_N, replicas_LE[layer], log2phy_LER[layer],
                                                   cursor_LE[layer], self._slot_worker_LP[layer], self.plan.num_workers)
        worker_N = self._slot_worker_LP[layer, slot_N]
        local_slot_N = self._local_slot_LP[layer, slot_N]
        # 3. One call per touched worker, carrying only the tokens it needs; the transport sends them all.
        calls: dict[int, WorkerCall] = {}
        shares = []
        for worker in np.unique(worker_N).tolist():
            sel_N = worker_N == worker
            tokens_T = np.unique(pair_token_N[sel_N])  # sorted
            pair_local_token_N = np.searchsorted(tokens_T, pair_token_N[sel_N])
            # every token (one token, or a worker holding all the experts asked for): send x_TH itself
            x_sent_TH = x_TH if len(tokens_T) == len(x_TH) else x_TH.index_select(
                0, torch.from_numpy(tokens_T).to(x_TH.device))
            calls[worker] = WorkerCall(self.plan.epoch, layer, pack(x_sent_TH), pair_local_token_N.astype(np.int32),
                                       local_slot_N[sel_N].astype(np.int32), pair_weight_N[sel_N])
            shares.append((worker, sel_N, tokens_T))
        self._per_forward.workers_touched = len(calls)
        sending = time.perf_counter()
        with overlap.away():  # another micro-batch computes while these tokens are with the workers
            if getattr(self.transport, "concurrent_sends", False):
                sent = self.transport.send(calls)
            else:
                with self._send_lock:
                    sent = self.transport.send(calls)
        sent_at = time.perf_counter()
        # 4. Combine what came back; a dead worker's pairs go round again, on the replicas that remain.
        retry_N = np.zeros(len(worker_N), dtype=bool)
        for worker in sorted(sent.lost):
            log.warning("expert worker %d died during MoE layer %d; re-dispatching its %d pairs",
                        worker, layer, int((worker_N == worker).sum()))
            self.mark_dead(worker)
        answered = []
        for worker, sel_N, tokens_T in shares:
            if worker in sent.lost:
                retry_N |= sel_N
            else:
                answered.append((tokens_T, unpack(sent.results[worker])))
        if answered:
            _scatter_add(y_TH, answered)
            done_N = ~retry_N  # one count for the layer, not one per worker
            self.load.count(layer, pair_expert_N[done_N], worker_N[done_N],
                            None if token_id_N is None else token_id_N[done_N])
        with self._lock:
            self.times.prepare_s += sending - started
            self.times.send_s += sent_at - sending
            self.times.combine_s += time.perf_counter() - sent_at
        if retry_N.any():
            self._run_pairs(layer, x_TH, y_TH, pair_token_N[retry_N], pair_expert_N[retry_N], pair_weight_N[retry_N],
                            None if token_id_N is None else token_id_N[retry_N], time.perf_counter())
