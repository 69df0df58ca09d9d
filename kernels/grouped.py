"""Grouped expert compute: every (token, slot) pair through its slot's expert, weighted, summed per token.

Shape legend: T tokens, H hidden, I expert intermediate, S local slots, N (token, slot) pairs.

    y_TH[t] = sum over pairs n with pair_token_N[n] == t of
              pair_weight_N[n] * down_s(act(gate_up_s(x_TH[t])))      with s = pair_slot_N[n]

Two implementations share this interface:
- ``grouped_experts_torch``: sort pairs by slot once, one GEMM pair per slot that has tokens (the CPU path).
- ``reference_experts``: the naive per-pair loop, the ground truth in tests.
"""

from __future__ import annotations

import dataclasses

import torch

from moeray.kernels.activation import GatedActivation


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertWeights:
    """The weights of S resident slots of one MoE layer, in the canonical layout (out-features first)."""

    w_gate_up_S2IH: torch.Tensor
    w_down_SHI: torch.Tensor
    b_gate_up_S2I: torch.Tensor | None = None
    b_down_SH: torch.Tensor | None = None

    def __post_init__(self) -> None:
        s, two_i, h = self.w_gate_up_S2IH.shape
        if two_i % 2:
            raise ValueError(f"gate_up has {two_i} output rows; it must be even (gate and up halves)")
        if tuple(self.w_down_SHI.shape) != (s, h, two_i // 2):
            raise ValueError(
                f"down weights have shape {tuple(self.w_down_SHI.shape)}; expected {(s, h, two_i // 2)} "
                f"to match gate_up {tuple(self.w_gate_up_S2IH.shape)}"
            )
        if (self.b_gate_up_S2I is None) != (self.b_down_SH is None):
            raise ValueError("expert biases must be given for both projections or for neither")

    @property
    def num_slots(self) -> int:
        return self.w_gate_up_S2IH.shape[0]

    @property
    def nbytes(self) -> int:
        tensors = (self.w_gate_up_S2IH, self.w_down_SHI, self.b_gate_up_S2I, self.b_down_SH)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def check_inputs(
    x_TH: torch.Tensor,
    pair_token_N: torch.Tensor,
    pair_slot_N: torch.Tensor,
    pair_weight_N: torch.Tensor,
    weights: ExpertWeights,
) -> None:
    """Reject inputs that would otherwise give a silent wrong answer or an opaque crash."""
    if x_TH.dim() != 2:
        raise ValueError(f"x must be [T, H]; got shape {tuple(x_TH.shape)}")
    hidden = weights.w_gate_up_S2IH.shape[2]
    if x_TH.shape[1] != hidden:
        raise ValueError(f"x has hidden size {x_TH.shape[1]}; the experts expect {hidden}")
    n = pair_token_N.shape[0]
    for name, t in (("pair_token", pair_token_N), ("pair_slot", pair_slot_N), ("pair_weight", pair_weight_N)):
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{name} must be 1-D with {n} entries; got shape {tuple(t.shape)}")
        if t.device != x_TH.device:
            raise ValueError(f"{name} is on {t.device}; x is on {x_TH.device}")
    if x_TH.dtype != weights.w_gate_up_S2IH.dtype:
        raise ValueError(f"x has dtype {x_TH.dtype}; the experts hold {weights.w_gate_up_S2IH.dtype}")
    if n:
        lo, hi = int(pair_slot_N.min()), int(pair_slot_N.max())
        if lo < 0 or hi >= weights.num_slots:
            bad = lo if lo < 0 else hi
            raise ValueError(f"slot id {bad} is out of range [0, {weights.num_slots})")
        lo, hi = int(pair_token_N.min()), int(pair_token_N.max())
        if lo < 0 or hi >= x_TH.shape[0]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token index {bad} is out of range [0, {x_TH.shape[0]})")


def grouped_experts_torch(
    x_TH: torch.Tensor,
    pair_token_N: torch.Tensor,
    pair_slot_N: torch.Tensor,
    pair_weight_N: torch.Tensor,
    weights: ExpertWeights,
    activation: GatedActivation,
) -> torch.Tensor:
    """Sort pairs by slot once, run each slot's tokens as one contiguous GEMM, scatter-add back."""
    check_inputs(x_TH, pair_token_N, pair_slot_N, pair_weight_N, weights)
    y_TH = torch.zeros_like(x_TH)
    if pair_token_N.numel() == 0:
        return y_TH
    # 1. Flatten-sort-count: pairs grouped by slot, with per-slot offsets.
    order_N = torch.argsort(pair_slot_N, stable=True)
    token_sorted_N = pair_token_N[order_N]
    counts_S = torch.bincount(pair_slot_N, minlength=weights.num_slots)
    x_sorted_NH = x_TH.index_select(0, token_sorted_N)
    out_NH = torch.empty_like(x_sorted_NH)
    # 2. One GEMM pair per slot that has tokens (a single host sync for the offsets).
    start = 0
    for slot, count in enumerate(counts_S.tolist()):
        if count == 0:
            continue
        rows = slice(start, start + count)
        gate_up = torch.mm(x_sorted_NH[rows], weights.w_gate_up_S2IH[slot].t())
        if weights.b_gate_up_S2I is not None:
            gate_up += weights.b_gate_up_S2I[slot]
        torch.mm(activation(gate_up), weights.w_down_SHI[slot].t(), out=out_NH[rows])
        if weights.b_down_SH is not None:
            out_NH[rows] += weights.b_down_SH[slot]
        start += count
    # 3. Weight and combine back to token order.
    out_NH *= pair_weight_N[order_N].to(out_NH.dtype).unsqueeze(1)
    return y_TH.index_add_(0, token_sorted_N, out_NH)


def reference_experts(
    x_TH: torch.Tensor,
    pair_token_N: torch.Tensor,
    pair_slot_N: torch.Tensor,
    pair_weight_N: torch.Tensor,
    weights: ExpertWeights,
    activation: GatedActivation,
) -> torch.Tensor:
    """The naive loop: one pair at a time, in fp32. Slow on purpose; only tests call it."""
    y_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
    for t, s, w in zip(pair_token_N.tolist(), pair_slot_N.tolist(), pair_weight_N.tolist()):
        x_H = x_TH[t].float()
        gate_up = weights.w_gate_up_S2IH[s].float() @ x_H
        if weights.b_gate_up_S2I is not None:
            gate_up = gate_up + weights.b_gate_up_S2I[s].float()
        out = weights.w_down_SHI[s].float() @ activation(gate_up)
        if weights.b_down_SH is not None:
            out = out + weights.b_down_SH[s].float()
        y_TH[t] += w * out
    return y_TH.to(x_TH.dtype)
