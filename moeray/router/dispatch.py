"""Dispatch and combine: the router's side of one MoE layer.

    top_k_index[T,K], top_k_weights[T,K]  (the model's own gate)
      -> pairs (token, expert, weight), pads dropped
      -> pick a replica per pair (spread evenly over an expert's slots)
      -> bucket by worker; one call per touched worker carrying only its tokens
      -> combine: scatter-add each worker's weighted partial sums back to token order

Shape legend: T tokens, H hidden, K top-k, N (token, expert) pairs, L MoE layers, E experts, W workers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import ray
import torch

from moeray.placement.plan import Plan
from moeray.router.load import LoadCounter
from moeray.transport.object_store import pack, unpack


class ExpertDispatcher:
    def __init__(self, plan: Plan, workers: Sequence[ray.actor.ActorHandle], track_tokens: bool = False) -> None:
        self.load = LoadCounter(num_layers=plan.num_layers, num_experts=plan.num_experts,
                                num_workers=plan.num_workers, track_tokens=track_tokens)
        self.set_plan(plan, workers)
        # Set by the scheduler around each forward: which of the flattened tokens are real (False for padding),
        # and their token ids (for the optional per-expert token histogram).
        self.token_mask_T: torch.Tensor | None = None
        self.token_ids_T: torch.Tensor | None = None
        self.dispatch_s = 0.0  # wall time in dispatch/combine, expert compute included

    def set_plan(self, plan: Plan, workers: Sequence[ray.actor.ActorHandle] | None = None) -> None:
        """Switch to a new epoch's plan (and worker handles, when they changed); call between forwards only."""
        workers = self.workers if workers is None else list(workers)
        if len(workers) != plan.num_workers:
            raise ValueError(f"the plan places experts on {plan.num_workers} workers; {len(workers)} were given")
        if getattr(self, "plan", None) is None or plan.num_workers != self.plan.num_workers:
            self.load.resize(plan.num_workers)
        self.plan, self.workers = plan, workers
        self._log2phy_LER = plan.log2phy_LER
        self._replicas_LE = plan.replica_count_LE
        self._slot_worker_LP = plan.slot_worker_LP
        self._local_slot_LP = plan.local_slot_LP

    def __call__(
        self, layer: int, x_TH: torch.Tensor, top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor
    ) -> torch.Tensor:
        started = time.perf_counter()
        try:
            return self._dispatch(layer, x_TH, top_k_index_TK, top_k_weights_TK)
        finally:
            self.dispatch_s += time.perf_counter() - started

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
        epoch = self.plan.epoch
        # 2. A replica per pair: consecutive pairs of one expert take its slots in turn.
        replica_N = torch.arange(pair_expert_N.numel()) % self._replicas_LE[layer, pair_expert_N]
        slot_N = self._log2phy_LER[layer, pair_expert_N, replica_N]
        worker_N = self._slot_worker_LP[layer, slot_N]
        local_slot_N = self._local_slot_LP[layer, slot_N]
        # 3. One call per touched worker, carrying only the tokens it needs.
        calls = []
        for worker in worker_N.unique().tolist():
            sel_N = worker_N == worker
            tokens_T = pair_token_N[sel_N].unique()  # sorted
            pair_local_token_N = torch.searchsorted(tokens_T, pair_token_N[sel_N])
            ref = self.workers[worker].forward.remote(
                epoch,
                layer,
                pack(x_TH.index_select(0, tokens_T.to(x_TH.device))),
                pair_local_token_N.to(torch.int32).numpy(),
                local_slot_N[sel_N].to(torch.int32).numpy(),
                pair_weight_N[sel_N].numpy(),
            )
            calls.append((tokens_T, ref))
        token_id_N = None if self.token_ids_T is None else self.token_ids_T.cpu()[pair_token_N]
        self.load.count(layer, pair_expert_N, worker_N, token_id_N)
        # 4. Combine.
        y_TH = torch.zeros_like(x_TH)
        results = ray.get([ref for _, ref in calls])
        for (tokens_T, _), wire in zip(calls, results):
            y_TH.index_add_(0, tokens_T.to(x_TH.device), unpack(wire, x_TH.device))
        return y_TH
