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
    """The weights of S resident slots of one MoE layer, out-features first (as nn.Linear stores them).

    ``interleaved``: gate_up rows (and bias) alternate gate and up, as GPT-OSS stores them; otherwise all gate rows
    come first, then all up rows.
    """

    w_gate_up_S2IH: torch.Tensor
    w_down_SHI: torch.Tensor
    b_gate_up_S2I: torch.Tensor | None = None
    b_down_SH: torch.Tensor | None = None
    interleaved: bool = False

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
        tensors = {"w_gate_up": self.w_gate_up_S2IH, "w_down": self.w_down_SHI, "b_gate_up": self.b_gate_up_S2I,
                   "b_down": self.b_down_SH}
        for name, t in tensors.items():
            if t is None:
                continue
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous; got strides {t.stride()} for shape {tuple(t.shape)}")
            if t.dtype != self.w_gate_up_S2IH.dtype or t.device != self.w_gate_up_S2IH.device:
                raise ValueError(f"{name} is {t.dtype} on {t.device}; w_gate_up is {self.w_gate_up_S2IH.dtype} "
                                 f"on {self.w_gate_up_S2IH.device}")

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
    if not x_TH.is_contiguous():
        raise ValueError(f"x must be contiguous; got strides {x_TH.stride()} for shape {tuple(x_TH.shape)}")
    if x_TH.device != weights.w_gate_up_S2IH.device:
        raise ValueError(f"x is on {x_TH.device}; the experts are on {weights.w_gate_up_S2IH.device}")
    hidden = weights.w_gate_up_S2IH.shape[2]
    if x_TH.shape[1] != hidden:
        raise ValueError(f"x has hidden size {x_TH.shape[1]}; the experts expect {hidden}")
    n = pair_token_N.shape[0]
    for name, t in (("pair_token", pair_token_N), ("pair_slot", pair_slot_N), ("pair_weight", pair_weight_N)):
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{name} must be 1-D with {n} entries; got shape {tuple(t.shape)}")
        if t.device != x_TH.device:
            raise ValueError(f"{name} is on {t.device}; x is on {x_TH.device}")
        if name != "pair_weight" and t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must hold integers; got {t.dtype}")
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


# A slot's GEMMs run weight-major (W @ x.T) for between these many rows, token-major (x @ W.T) otherwise:
# weight-major measured 1.4-1.6x faster for 8-64 rows on this project's CPUs (BLAS picks a poor kernel for
# short-wide x @ W.T), while token-major wins for 1-2 rows (a weight-streaming GEMV) and for long runs of rows,
# where weight-major's transposed write-back costs more than it saves. See BENCHMARKS.md.
WEIGHT_MAJOR_ROWS = range(3, 97)
# Decode batches (at most this many rows per touched slot on average) go through torch's grouped GEMM instead.
GROUPED_MM_MAX_ROWS_PER_SLOT = 4
_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None)


def _grouped_mm_fits(weights: ExpertWeights) -> bool:
    """torch's grouped GEMM exists (torch >= 2.10) and the 16-byte stride alignment it requires holds."""
    _, two_i, hidden = weights.w_gate_up_S2IH.shape
    size = weights.w_gate_up_S2IH.element_size()
    return _GROUPED_MM is not None and (hidden * size) % 16 == 0 and (two_i // 2 * size) % 16 == 0


def grouped_experts_torch(
    x_TH: torch.Tensor,
    pair_token_N: torch.Tensor,
    pair_slot_N: torch.Tensor,
    pair_weight_N: torch.Tensor,
    weights: ExpertWeights,
    activation: GatedActivation,
) -> torch.Tensor:
    """Sort pairs by slot once, run each slot's rows as one GEMM pair, weight, scatter-add back to token order."""
    check_inputs(x_TH, pair_token_N, pair_slot_N, pair_weight_N, weights)
    y_TH = torch.zeros_like(x_TH)
    if pair_token_N.numel() == 0:
        return y_TH
    # 1. Flatten-sort-count: pairs grouped by slot, with per-slot counts (one host sync).
    order_N = torch.argsort(pair_slot_N, stable=True)
    token_sorted_N = pair_token_N[order_N]
    counts = torch.bincount(pair_slot_N, minlength=weights.num_slots).tolist()
    x_sorted_NH = x_TH.index_select(0, token_sorted_N)
    out_NH = torch.empty_like(x_sorted_NH)
    w_gu, w_down, b_gu, b_down = weights.w_gate_up_S2IH, weights.w_down_SHI, weights.b_gate_up_S2I, weights.b_down_SH
    if _grouped_mm_fits(weights) and len(order_N) <= GROUPED_MM_MAX_ROWS_PER_SLOT * sum(c > 0 for c in counts):
        # 2a. Decode: a few rows per slot. One grouped GEMM per projection streams the weights best.
        offsets_S = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x_TH.device)
        slot_sorted_N = pair_slot_N[order_N]
        gate_up_N2I = _GROUPED_MM(x_sorted_NH, w_gu.transpose(1, 2), offs=offsets_S)
        if b_gu is not None:
            gate_up_N2I += b_gu[slot_sorted_N]
        out_NH = _GROUPED_MM(activation(gate_up_N2I, weights.interleaved), w_down.transpose(1, 2), offs=offsets_S)
        if b_down is not None:
            out_NH += b_down[slot_sorted_N]
        out_NH *= pair_weight_N[order_N].to(out_NH.dtype).unsqueeze(1)
        return y_TH.index_add_(0, token_sorted_N, out_NH)
    # 2b. One GEMM pair per slot that has rows.
    start = 0
    for slot, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        start += count
        x_nH = x_sorted_NH[rows]
        if count not in WEIGHT_MAJOR_ROWS:
            gate_up_n2I = x_nH @ w_gu[slot].t() if b_gu is None else torch.addmm(b_gu[slot], x_nH, w_gu[slot].t())
            h_nI = activation(gate_up_n2I, weights.interleaved)
            if b_down is None:
                torch.mm(h_nI, w_down[slot].t(), out=out_NH[rows])
            else:
                torch.addmm(b_down[slot], h_nI, w_down[slot].t(), out=out_NH[rows])
        else:
            gate_up_2In = w_gu[slot] @ x_nH.t()
            if b_gu is not None:
                gate_up_2In += b_gu[slot].unsqueeze(1)
            h_In = activation(gate_up_2In, weights.interleaved, dim=0)
            y_Hn = w_down[slot] @ h_In
            if b_down is not None:
                y_Hn += b_down[slot].unsqueeze(1)
            out_NH[rows] = y_Hn.t()
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
        out = weights.w_down_SHI[s].float() @ activation(gate_up, weights.interleaved)
        if weights.b_down_SH is not None:
            out = out + weights.b_down_SH[s].float()
        y_TH[t] += w * out
    return y_TH.to(x_TH.dtype)
