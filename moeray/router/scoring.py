"""Scoring: logits for whole prompts, no generation and no cache kept (KServe ModelInfer, prompt log-probabilities).
Rows are packed like a step's prefill chunks and run under the scheduler's forward lock, between its steps.

Shape legend: B rows, T positions (padded), Q real tokens packed, V vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moeray.request import InvalidRequest
from moeray.router.kv_pool import Row, StepLayout

if TYPE_CHECKING:
    from moeray.router.scheduler import Scheduler


def score(sched: Scheduler, ids_BT: torch.Tensor, mask_BT: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """Logits for every position of a padded batch (no cache kept), [B, T, V], zero at padding; with
    ``last_only``, each row's logits at its last real position only, [B, V]. Rows are packed like a step's
    prefill chunks, so padding costs nothing; a batch of more than ``max_forward_tokens`` real tokens runs as
    several forwards of whole rows."""
    real_BT = mask_BT.bool()
    lengths = real_BT.sum(dim=1).tolist()
    longest = max(lengths)
    if longest > sched.max_forward_tokens:
        raise InvalidRequest(f"a row of {longest} tokens is over this engine's max_forward_tokens "
                             f"{sched.max_forward_tokens} (a scored row runs in one forward)")
    groups, size = [[]], 0
    for b, n in enumerate(lengths):
        if size + n > sched.max_forward_tokens:
            groups, size = [*groups, []], 0
        groups[-1].append(b)
        size += n
    logits = [_score_rows(sched, ids_BT, real_BT, rows, last_only) for rows in groups]
    if last_only:
        return torch.cat(logits)
    logits_BTV = logits[0].new_zeros(*ids_BT.shape, logits[0].shape[-1])
    for rows, logits_QV in zip(groups, logits):
        start = 0
        for b in rows:
            logits_BTV[b, real_BT[b].to(logits_QV.device)] = logits_QV[start:start + lengths[b]]
            start += lengths[b]
    return logits_BTV


def _score_rows(sched: Scheduler, ids_BT: torch.Tensor, real_BT: torch.Tensor, rows: list[int],
                last_only: bool) -> torch.Tensor:
    """One forward over ``rows`` of the batch: logits [Q, V] for their real tokens in row order, or with
    ``last_only`` [len(rows), V]."""
    lengths = [int(real_BT[b].sum()) for b in rows]
    order = sorted(range(len(rows)), key=lambda i: lengths[i] != 1)  # one-token rows: the decode block
    layout = StepLayout([Row(0, lengths[i]) for i in order], None, sched.device)
    ids_Q = torch.cat([ids_BT[rows[i]][real_BT[rows[i]]] for i in order])
    pos_Q = torch.cat([torch.arange(lengths[i]) for i in order])
    start = dict(zip(order, torch.tensor([0] + [lengths[i] for i in order]).cumsum(0).tolist()))
    with sched.forward_lock, torch.no_grad(), layout.active():
        sched.on_forward(ids_Q)
        try:
            keep = None if not last_only else \
                torch.tensor([start[i] + lengths[i] - 1 for i in range(len(rows))], device=sched.device)
            out = sched.model(input_ids=ids_Q[None].to(sched.device), position_ids=pos_Q[None].to(sched.device),
                             cache=layout, use_cache=True, logits_to_keep=0 if keep is None else keep)
        finally:
            sched.on_forward(None)
            if sched.on_step_end is not None:
                sched.on_step_end()
    logits_QV = out.logits[0]
    if last_only:
        return logits_QV
    return torch.cat([logits_QV[start[i]:start[i] + lengths[i]] for i in range(len(rows))])
