"""Dispatch and combine: the router's side of one MoE layer.

    top_k_index[T,K], top_k_weights[T,K]  (the model's own gate)
      -> pairs (token, expert, weight), pads dropped
      -> pick a replica per pair (spread evenly over an expert's slots on live workers)
      -> bucket by worker; one call per touched worker carrying only its tokens, sent by the transport
         (object store: an actor call each; compiled graph: one execute over every worker; moeray.transport)
      -> combine: scatter-add each worker's weighted partial sums back to token order
      (a worker found dead: its pairs go round again on the expert's other replicas; with none left,
       ExpertsUnavailable, and the router waits for the controller to re-place the experts and retries the step)

Shape legend: T tokens, H hidden, K top-k, N (token, expert) pairs, L MoE layers, E experts, W workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from moeray import telemetry
from moeray.placement.algorithms.plan import Plan
from moeray.router.load import LoadCounter
from moeray.transport.base import Transport
from moeray.transport.wire import WorkerCall, unpack

log = logging.getLogger(__name__)


class ExpertsUnavailable(RuntimeError):
    """Experts of a layer have no live replica: the step waits for the controller to re-place them."""

    def __init__(self, layer: int, experts: list[int], dead_workers: list[int]) -> None:
        super().__init__(f"MoE layer {layer}: experts {experts} have no live replica (dead workers {dead_workers})")
        self.layer, self.experts, self.dead_workers = layer, experts, dead_workers

    def __reduce__(self):  # so that it crosses Ray's process boundaries intact
        return type(self), (self.layer, self.experts, self.dead_workers)


class ExpertDispatcher:
    """Dispatch and combine over ``transport``, which holds the worker handles ``plan`` numbers (see
    ``moeray.transport.make_transport``)."""

    def __init__(self, plan: Plan, transport: Transport, *, track_tokens: bool = False) -> None:
        self.dead_workers: set[int] = set()
        self.transport = transport
        self.on_worker_lost = None  # called with a worker index when a call to it finds it dead
        self.load = LoadCounter(num_layers=plan.num_layers, num_experts=plan.num_experts,
                                num_workers=plan.num_workers, track_tokens=track_tokens)
        self.plan: Plan | None = None
        self.set_plan(plan)
        # Set by the scheduler around each forward: which of the flattened tokens are real (False for padding),
        # and their token ids (for the optional per-expert token histogram).
        self.token_mask_T: torch.Tensor | None = None
        self.token_ids_T: torch.Tensor | None = None
        self.dispatch_s = 0.0  # wall time in dispatch/combine, expert compute included
        self.workers_touched = 0  # by the last layer call (telemetry)

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
        self._slot_worker_LP = plan.slot_worker_LP
        self._local_slot_LP = plan.local_slot_LP
        self._route_live_slots()

    def mark_dead(self, worker: int) -> None:
        """Stop routing to a worker whose actor died; its experts' other replicas take its tokens."""
        self.dead_workers.add(worker)
        self._route_live_slots()
        if self.on_worker_lost is not None:
            self.on_worker_lost(worker)

    def _route_live_slots(self) -> None:
        """log2phy and replica counts over the slots of live workers only (the plan's own when none died)."""
        live_LP = ~torch.isin(self.plan.slot_worker_LP, torch.tensor(sorted(self.dead_workers), dtype=torch.long))
        self._replicas_LE = torch.zeros(self.plan.num_layers, self.plan.num_experts, dtype=torch.long).scatter_add_(
            1, self.plan.phy2log_LP, live_LP.long())
        log2phy_LER = torch.full((self.plan.num_layers, self.plan.num_experts, max(1, int(self._replicas_LE.max()))),
                                 -1, dtype=torch.long)
        for l in range(self.plan.num_layers):
            seen = [0] * self.plan.num_experts
            for p, (e, live) in enumerate(zip(self.plan.phy2log_LP[l].tolist(), live_LP[l].tolist())):
                if live:
                    log2phy_LER[l, e, seen[e]] = p
                    seen[e] += 1
        self._log2phy_LER = log2phy_LER

    def __call__(
        self, layer: int, x_TH: torch.Tensor, top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor
    ) -> torch.Tensor:
        started = time.perf_counter()
        span = telemetry.dispatch_span(layer, self.plan.epoch) if telemetry.STATE.on else None
        try:
            return self._dispatch(layer, x_TH, top_k_index_TK, top_k_weights_TK)
        finally:
            elapsed = time.perf_counter() - started
            self.dispatch_s += elapsed
            if telemetry.STATE.on:
                tokens = len(x_TH) if self.token_mask_T is None else int(self.token_mask_T.sum())
                telemetry.dispatched(span, layer, elapsed, tokens, self.workers_touched)

    def _dispatch(self, layer: int, x_TH: torch.Tensor, top_k_index_TK: torch.Tensor,
                  top_k_weights_TK: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = top_k_index_TK.shape
        # 1. Flatten to (token, expert, weight) pairs, dropping padding tokens.
        pair_token_N = torch.arange(num_tokens).repeat_interleave(top_k)
        pair_expert_N = top_k_index_TK.reshape(-1).cpu()
        pair_weight_N = top_k_weights_TK.reshape(-1).float().cpu()
        if self.token_mask_T is not None:
            keep_N = self.token_mask_T.repeat_interleave(top_k)
            pair_token_N, pair_expert_N, pair_weight_N = pair_token_N[keep_N], pair_expert_N[keep_N], pair_weight_N[keep_N]
        token_id_N = None if self.token_ids_T is None else self.token_ids_T.cpu()[pair_token_N]
        y_TH = torch.zeros_like(x_TH)
        self._run_pairs(layer, x_TH, y_TH, pair_token_N, pair_expert_N, pair_weight_N, token_id_N)
        return y_TH

    def _run_pairs(self, layer: int, x_TH: torch.Tensor, y_TH: torch.Tensor, pair_token_N: torch.Tensor,
                   pair_expert_N: torch.Tensor, pair_weight_N: torch.Tensor, token_id_N: torch.Tensor | None) -> None:
        """Steps 2-4 for a set of pairs; the pairs of a worker that died are run again on live replicas."""
        # 2. A replica per pair: consecutive pairs of one expert take its live slots in turn.
        replicas_N = self._replicas_LE[layer, pair_expert_N]
        if (replicas_N == 0).any():
            lost = sorted(set(pair_expert_N[replicas_N == 0].tolist()))
            raise ExpertsUnavailable(layer, lost, sorted(self.dead_workers))
        replica_N = torch.arange(pair_expert_N.numel()) % replicas_N
        slot_N = self._log2phy_LER[layer, pair_expert_N, replica_N]
        worker_N = self._slot_worker_LP[layer, slot_N]
        local_slot_N = self._local_slot_LP[layer, slot_N]
        # 3. One call per touched worker, carrying only the tokens it needs; the transport sends them all.
        calls: dict[int, WorkerCall] = {}
        shares = []
        for worker in worker_N.unique().tolist():
            sel_N = worker_N == worker
            tokens_T = pair_token_N[sel_N].unique()  # sorted
            pair_local_token_N = torch.searchsorted(tokens_T, pair_token_N[sel_N])
            calls[worker] = WorkerCall.of(self.plan.epoch, layer, x_TH.index_select(0, tokens_T.to(x_TH.device)),
                                          pair_local_token_N, local_slot_N[sel_N], pair_weight_N[sel_N])
            shares.append((worker, sel_N, tokens_T))
        self.workers_touched = len(calls)
        sent = self.transport.send(calls)
        # 4. Combine what came back; a dead worker's pairs go round again, on the replicas that remain.
        retry_N = torch.zeros_like(worker_N, dtype=torch.bool)
        for worker in sorted(sent.lost):
            log.warning("expert worker %d died during MoE layer %d; re-dispatching its %d pairs",
                        worker, layer, int((worker_N == worker).sum()))
            self.mark_dead(worker)
        for worker, sel_N, tokens_T in shares:
            if worker in sent.lost:
                retry_N |= sel_N
                continue
            y_TH.index_add_(0, tokens_T.to(x_TH.device), unpack(sent.results[worker], x_TH.device))
            self.load.count(layer, pair_expert_N[sel_N], worker_N[sel_N],
                            None if token_id_N is None else token_id_N[sel_N])
        if retry_N.any():
            self._run_pairs(layer, x_TH, y_TH, pair_token_N[retry_N], pair_expert_N[retry_N], pair_weight_N[retry_N],
                            None if token_id_N is None else token_id_N[retry_N])
