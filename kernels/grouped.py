"""Grouped expert compute: every (token, slot) pair through its slot's expert, weighted, summed per token.

Shape legend: T tokens, H hidden, I expert intermediate, S local slots, N (token, slot) pairs.

    y_TH[t] = sum over pairs n with pair_token_N[n] == t of
              pair_weight_N[n] * down_s(act(gate_up_s(x_TH[t])))      with s = pair_slot_N[n]

Two implementations share this interface:
- ``grouped_experts_torch``: sort pairs by slot once, one GEMM pair per slot that has tokens (the CPU path). On
  ``PackedExpertWeights`` (experts in 16-row panels, as CPU workers hold them) every slot runs through the panel
  kernel; on ``ExpertWeights`` small segments use the rows kernel and the rest BLAS (cpu_rows.py, rows_gemm.c).
  On ``QuantizedExpertWeights`` (FP8 / MXFP4 experts), float32 where the C kernels run, every slot goes through
  kernels that dequantize inside (in registers for a few rows, 16 weight rows at a time into L2 for more), so no
  float32 expert is written; elsewhere (bfloat16, no compiler) each slot that has rows is dequantized into a reused
  per-thread buffer, then runs as above.
- ``reference_experts``: the naive per-pair loop, the ground truth in tests.
"""

from __future__ import annotations

import dataclasses
import threading

import torch

from moeray.kernels import cpu_rows
from moeray.kernels.activation import GatedActivation
from moeray.kernels.quantized import QuantizedExpertWeights


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
    def hidden(self) -> int:
        return self.w_gate_up_S2IH.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.w_gate_up_S2IH.dtype

    @property
    def device(self) -> torch.device:
        return self.w_gate_up_S2IH.device

    @property
    def nbytes(self) -> int:
        tensors = (self.w_gate_up_S2IH, self.w_down_SHI, self.b_gate_up_S2I, self.b_down_SH)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackedExpertWeights:
    """``ExpertWeights`` with both projections held in the CPU panel layout (``cpu_rows.pack_panels``): each
    16 output rows of a projection stored column by column, ``[S, ceil(M/16), K, 16]``. CPU workers keep their
    experts this way when the CPU kernels run here, so no GEMM repacks the weights on every call (see
    BENCHMARKS.md); the memory is the same, but for M rounded up to 16. ``unpack_slot`` gives one expert back in
    the canonical layout, for migration and export."""

    gate_up_panels: torch.Tensor  # [S, ceil(2I/16), H, 16]
    down_panels: torch.Tensor  # [S, ceil(H/16), I, 16]
    hidden: int
    intermediate: int
    b_gate_up_S2I: torch.Tensor | None = None
    b_down_SH: torch.Tensor | None = None
    interleaved: bool = False

    @classmethod
    def pack(cls, weights: ExpertWeights) -> PackedExpertWeights:
        if weights.dtype != torch.float32 or weights.device.type != "cpu":
            raise ValueError(f"the panel layout is for float32 CPU experts; got {weights.dtype} on {weights.device}")
        return cls(gate_up_panels=cpu_rows.pack_panels(weights.w_gate_up_S2IH),
                   down_panels=cpu_rows.pack_panels(weights.w_down_SHI), hidden=weights.hidden,
                   intermediate=weights.w_down_SHI.shape[2], b_gate_up_S2I=weights.b_gate_up_S2I,
                   b_down_SH=weights.b_down_SH, interleaved=weights.interleaved)

    @staticmethod
    def bytes_per_expert(hidden: int, intermediate: int, has_bias: bool, itemsize: int) -> int:
        """What one packed expert holds: its parameters, plus zero rows up to a multiple of 16 per projection
        (none for real models, whose sizes are multiples of 16; the placement budget counts parameters only)."""
        up16 = lambda m: -(-m // 16) * 16
        biases = 2 * intermediate + hidden if has_bias else 0
        return itemsize * (up16(2 * intermediate) * hidden + up16(hidden) * intermediate + biases)

    def unpack_slot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's (gate_up [2I, H], down [H, I]) in the canonical layout (copies)."""
        return (cpu_rows.unpack_panels(self.gate_up_panels[slot], 2 * self.intermediate),
                cpu_rows.unpack_panels(self.down_panels[slot], self.hidden))

    def unpacked(self) -> ExpertWeights:
        slots = [self.unpack_slot(s) for s in range(self.num_slots)]
        return ExpertWeights(w_gate_up_S2IH=torch.stack([g for g, _ in slots]),
                             w_down_SHI=torch.stack([d for _, d in slots]), b_gate_up_S2I=self.b_gate_up_S2I,
                             b_down_SH=self.b_down_SH, interleaved=self.interleaved)

    @property
    def num_slots(self) -> int:
        return self.gate_up_panels.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_up_panels.dtype

    @property
    def device(self) -> torch.device:
        return self.gate_up_panels.device

    @property
    def nbytes(self) -> int:
        tensors = (self.gate_up_panels, self.down_panels, self.b_gate_up_S2I, self.b_down_SH)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def check_inputs(
    x_TH: torch.Tensor,
    pair_token_N: torch.Tensor,
    pair_slot_N: torch.Tensor,
    pair_weight_N: torch.Tensor,
    weights: ExpertWeights | PackedExpertWeights | QuantizedExpertWeights,
) -> None:
    """Reject inputs that would otherwise give a silent wrong answer or an opaque crash."""
    if x_TH.dim() != 2:
        raise ValueError(f"x must be [T, H]; got shape {tuple(x_TH.shape)}")
    if not x_TH.is_contiguous():
        raise ValueError(f"x must be contiguous; got strides {x_TH.stride()} for shape {tuple(x_TH.shape)}")
    if x_TH.device != weights.device:
        raise ValueError(f"x is on {x_TH.device}; the experts are on {weights.device}")
    hidden = weights.hidden
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
    if x_TH.dtype != weights.dtype:
        raise ValueError(f"x has dtype {x_TH.dtype}; the experts hold {weights.dtype}")
    if n:
        lo, hi = int(pair_slot_N.min()), int(pair_slot_N.max())
        if lo < 0 or hi >= weights.num_slots:
            bad = lo if lo < 0 else hi
            raise ValueError(f"slot id {bad} is out of range [0, {weights.num_slots})")
        lo, hi = int(pair_token_N.min()), int(pair_token_N.max())
        if lo < 0 or hi >= x_TH.shape[0]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token index {bad} is out of range [0, {x_TH.shape[0]})")


# How a slot's rows run, measured on this project's CPUs (AMD EPYC, AVX2, MKL; see BENCHMARKS.md):
# - Weight-major (W @ x.T) beats token-major (x @ W.T) 1.1-2.2x from 2 rows up to a few hundred: BLAS picks a
#   poor kernel for short-wide x @ W.T. Its right operand must be a transposed [rows, K] view (a row-major
#   [K, rows] one runs 2x slower below ~16 rows), so the activation is written back row-major before the down GEMM.
# - Past TOKEN_MAJOR_ROWS rows the transposed copies in and out of weight-major cost more than it saves.
# - A row count that is a multiple of 8 keeps BLAS on its 8-float AVX2 kernels: 31 rows run at half the rate of 32,
#   so each slot's rows are padded to ``padded_rows(count)`` (zero rows, weight 0), the padding tiling needs.
# - Up to KERNEL_ROWS rows, float32 on an AVX2 CPU, the rows kernel (cpu_rows.py) beats both: 1.2-2x MKL's
#   weight-major GEMM at 1-8 rows, in chunks of 8 up to 12. Its output is token-major, so nothing is transposed.
# - Quantized experts (float32 on an AVX2 CPU) never expand a whole expert: up to QUANT_KERNEL_ROWS rows the rows
#   kernels decode the weights in registers, above the panel kernels dequantize 16 rows at a time into L2 (see
#   _quantized_rows). Per slot, 2 threads, rows kernels vs panel kernels at 8/12/16/24 rows: FP8 0.78/1.13/1.45/2.05
#   vs 1.10/1.23/1.44/1.83 ms (H=1024, I=2048), 0.59/0.86/1.14/1.67 vs 0.81/0.90/1.05/1.28 (I=1408); MXFP4
#   0.60/0.91/1.19/1.84 vs 0.97/1.09/1.27/1.74, 0.47/0.69/0.93/1.35 vs 0.73/0.78/0.92/1.18. Past 8 rows the rows
#   kernels decode the weights once per 8 rows; the panel kernels dequantize once and run float32 panels.
TOKEN_MAJOR_ROWS = 256
KERNEL_ROWS = 12
QUANT_KERNEL_ROWS = 12


def padded_rows(count: int, rows_kernel: bool = False) -> int:
    """Rows a slot with ``count`` pairs computes: as is for the rows kernel; otherwise 3 -> 4, from 8 up the next
    multiple of 8, else as is."""
    if rows_kernel and count <= KERNEL_ROWS:
        return count
    if count == 3:
        return 4
    return count if count < 8 else -(-count // 8) * 8


class _Workspace(threading.local):
    """Two per-thread buffers reused across calls: fresh multi-MB tensors cost more in page faults than the
    gathers that fill them (a 50 MB index_select: 22 ms into a new tensor, 4 ms into a used one)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.dtype, like.device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < rows * cols:
            buf = self.buffers[key] = torch.empty(rows * cols, dtype=like.dtype, device=like.device)
        return buf[: rows * cols].view(rows, cols)


_WORKSPACE = _Workspace()


def grouped_experts_torch(
    x_TH: torch.Tensor,
    pair_token_N: torch.Tensor,
    pair_slot_N: torch.Tensor,
    pair_weight_N: torch.Tensor,
    weights: ExpertWeights | PackedExpertWeights | QuantizedExpertWeights,
    activation: GatedActivation,
) -> torch.Tensor:
    """Sort pairs by slot once into padded segments, run each segment as one GEMM pair with the routing weight
    applied as it is written, then scatter-add back to token order. P below counts padded rows. Packed experts run
    every segment, unpadded, through the panel kernel."""
    check_inputs(x_TH, pair_token_N, pair_slot_N, pair_weight_N, weights)
    y_TH = torch.zeros_like(x_TH)
    n = pair_token_N.numel()
    if n == 0:
        return y_TH
    # 1. Flatten-sort-count (one host sync), then each slot's segment padded.
    order_N = torch.argsort(pair_slot_N, stable=True)
    counts = torch.bincount(pair_slot_N, minlength=weights.num_slots).tolist()
    packed = isinstance(weights, PackedExpertWeights)
    rows_kernel = not packed and x_TH.dtype == torch.float32 and x_TH.device.type == "cpu" and cpu_rows.available()
    quantized_kernels = rows_kernel and isinstance(weights, QuantizedExpertWeights)
    padded = counts if packed or quantized_kernels else [padded_rows(c, rows_kernel) for c in counts]
    token_P, weight_P, pad_rows = _padded_layout(pair_token_N[order_N], pair_weight_N[order_N], counts, padded)
    x_PH = torch.index_select(x_TH, 0, token_P, out=_WORKSPACE.get("x", len(token_P), x_TH.shape[1], x_TH))
    if pad_rows is not None:
        x_PH.index_fill_(0, pad_rows, 0)  # zero inputs keep the padding finite; its weight of 0 then adds nothing
    out_PH = _WORKSPACE.get("out", len(token_P), x_TH.shape[1], x_TH)
    weight_P1 = weight_P.to(x_TH.dtype).unsqueeze(1)
    # 2. One GEMM pair per slot that has rows.
    start = 0
    for slot, rows in enumerate(padded):
        if rows == 0:
            continue
        seg = slice(start, start + rows)
        start += rows
        if packed:
            _panel_rows(x_PH[seg], out_PH[seg], weight_P1[seg], slot, weights, activation)
        elif quantized_kernels:
            _quantized_rows(x_PH[seg], out_PH[seg], weight_P1[seg], slot, weights, activation)
        else:
            _slot_rows(x_PH[seg], out_PH[seg], weight_P1[seg], _slot_tensors(weights, slot), activation,
                       weights.interleaved, rows_kernel)
    # 3. Combine back to token order.
    return y_TH.index_add_(0, token_P, out_PH)


def _padded_layout(token_sorted_N, weight_sorted_N, counts, padded):
    """Token and weight per padded row (a pad row: token 0, weight 0; its input is zeroed), and the pad rows."""
    if counts == padded:
        return token_sorted_N, weight_sorted_N, None
    is_real_P = torch.zeros(sum(padded), dtype=torch.bool)
    start = 0
    for count, rows in zip(counts, padded):
        is_real_P[start : start + count] = True
        start += rows
    real_P = is_real_P.nonzero().squeeze(1).to(token_sorted_N.device)
    token_P = torch.zeros(len(is_real_P), dtype=token_sorted_N.dtype, device=token_sorted_N.device)
    weight_P = torch.zeros(len(is_real_P), dtype=weight_sorted_N.dtype, device=weight_sorted_N.device)
    token_P[real_P] = token_sorted_N
    weight_P[real_P] = weight_sorted_N
    return token_P, weight_P, (~is_real_P).nonzero().squeeze(1).to(token_sorted_N.device)


def _panel_rows(x_nH, out_nH, weight_n1, slot, weights: PackedExpertWeights, activation: GatedActivation) -> None:
    """out_nH = weight_n1 * down(act(gate_up(x_nH))) through one packed slot."""
    two_i = 2 * weights.intermediate
    gate_up_n2I = cpu_rows.panels_matmul(x_nH, weights.gate_up_panels[slot], two_i, x_nH.new_empty(len(x_nH), two_i))
    if weights.b_gate_up_S2I is not None:
        gate_up_n2I += weights.b_gate_up_S2I[slot]
    h_nI = activation(gate_up_n2I, weights.interleaved).contiguous()
    cpu_rows.panels_matmul(h_nI, weights.down_panels[slot], weights.hidden, out_nH)
    if weights.b_down_SH is not None:
        out_nH += weights.b_down_SH[slot]
    out_nH.mul_(weight_n1)


def _quantized_rows(x_nH, out_nH, weight_n1, slot, weights: QuantizedExpertWeights,
                    activation: GatedActivation) -> None:
    """out_nH = weight_n1 * down(act(gate_up(x_nH))) through one quantized slot, dequantized inside the C kernels:
    in registers up to QUANT_KERNEL_ROWS rows, one 16-row panel at a time above."""
    matmul = cpu_rows.quantized_rows_matmul if len(x_nH) <= QUANT_KERNEL_ROWS else cpu_rows.quantized_panels_matmul
    two_i, quant = 2 * weights.intermediate, weights.quant
    gate_up_n2I = matmul(x_nH, weights.q_gate_up[slot], weights.s_gate_up[slot], quant,
                         x_nH.new_empty(len(x_nH), two_i))
    if weights.b_gate_up_S2I is not None:
        gate_up_n2I += weights.b_gate_up_S2I[slot]
    h_nI = activation(gate_up_n2I, weights.interleaved).contiguous()
    matmul(h_nI, weights.q_down[slot], weights.s_down[slot], quant, out_nH)
    if weights.b_down_SH is not None:
        out_nH += weights.b_down_SH[slot]
    out_nH.mul_(weight_n1)


def _slot_tensors(weights: ExpertWeights | QuantizedExpertWeights, slot: int):
    """One slot's (gate_up [2I, H], down [H, I], gate_up bias or None, down bias or None) in the compute dtype:
    views of ExpertWeights; quantized slots dequantized into this thread's reused buffers."""
    b_gu = None if weights.b_gate_up_S2I is None else weights.b_gate_up_S2I[slot]
    b_down = None if weights.b_down_SH is None else weights.b_down_SH[slot]
    if isinstance(weights, QuantizedExpertWeights):
        h, i, like = weights.hidden, weights.intermediate, weights.b_gate_up_S2I
        like = torch.empty(0, dtype=weights.compute_dtype, device=weights.device) if like is None else like
        w_gu, w_down = weights.dequantize_slot(slot, _WORKSPACE.get("w_gate_up", 2 * i, h, like),
                                               _WORKSPACE.get("w_down", h, i, like))
        return w_gu, w_down, b_gu, b_down
    return weights.w_gate_up_S2IH[slot], weights.w_down_SHI[slot], b_gu, b_down


def _slot_rows(x_nH, out_nH, weight_n1, tensors, activation: GatedActivation, interleaved: bool,
               rows_kernel: bool) -> None:
    """out_nH = weight_n1 * down(act(gate_up(x_nH))) through one slot's weights (``_slot_tensors``)."""
    w_gu, w_down, b_gu, b_down = tensors
    if rows_kernel and len(x_nH) <= KERNEL_ROWS:
        gate_up_n2I = cpu_rows.rows_matmul(x_nH, w_gu, x_nH.new_empty(len(x_nH), w_gu.shape[0]))
        if b_gu is not None:
            gate_up_n2I += b_gu
        cpu_rows.rows_matmul(activation(gate_up_n2I, interleaved).contiguous(), w_down, out_nH)
        if b_down is not None:
            out_nH += b_down
        out_nH.mul_(weight_n1)
        return
    if len(x_nH) >= TOKEN_MAJOR_ROWS:
        gate_up_n2I = x_nH @ w_gu.t() if b_gu is None else torch.addmm(b_gu, x_nH, w_gu.t())
        h_nI = activation(gate_up_n2I, interleaved)
        if b_down is None:
            torch.mm(h_nI, w_down.t(), out=out_nH)
        else:
            torch.addmm(b_down, h_nI, w_down.t(), out=out_nH)
        out_nH.mul_(weight_n1)
        return
    gate_up_2In = w_gu @ x_nH.t()
    if b_gu is not None:
        gate_up_2In += b_gu.unsqueeze(1)
    h_nI = activation(gate_up_2In, interleaved, dim=0).t().contiguous()
    y_Hn = w_down @ h_nI.t()
    if b_down is not None:
        y_Hn += b_down.unsqueeze(1)
    torch.mul(y_Hn.t(), weight_n1, out=out_nH)


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
