"""Triton grouped expert kernels: the GPU implementation of ``moeray.kernels.api.grouped_experts``.

Shape legend: T tokens, H hidden, I expert intermediate, S local slots, N (token, slot) pairs, M a tile of pairs.

    flatten-sort-count (torch, on device, no host sync):
        pairs sorted by slot -> sorted_token_N, per-slot [start, end), tiles of BLOCK_M rows per slot
    kernel 1  gate_up + activation:  h_NI[n] = act(x_TH[sorted_token_N[n]] @ w_gate_up[s].T + b)   (gathered rows)
    kernel 2  down + routing weight: out_NH[n] = (h_NI[n] @ w_down[s].T + b) * pair_weight[n]
              deterministic=False: atomically added straight into y_TH (fused combine)
    kernel 3  combine (deterministic): y_TH[t] = sum of out_NH over t's pairs, in pair order

Each tile belongs to one slot, so no activations are padded or copied beyond the gathered rows; tiles past the
last slot's exit at once (the grid is an upper bound computed without reading counts back to the host).
fp32 accumulation throughout; fp32 inputs use IEEE dot products (no TF32); every edge is masked.

Weight variants (the constexpr QUANT of kernels 1 and 2; one kernel per stage serves all three):
    QUANT_NONE   ``ExpertWeights`` in the activations' dtype (fp32, bf16, fp16)
    QUANT_FP8    ``QuantizedExpertWeights`` fine-grained FP8: float8_e4m3fn weights, a float32 scale per (BN, BK) block
    QUANT_MXFP4  ``QuantizedExpertWeights`` MXFP4: two e2m1 codes per byte, an e8m0 scale per 32 columns
Quantized tiles are expanded in registers (value * scale[n // BN, k // BK], per element: BN and BK are runtime
values, and a K tile may straddle scale blocks or end in a partial one), cast to the activations' dtype and fed to
the same dot product; no dequantized copy of an expert ever exists in memory (see quantized.py for the formats).
Triton converts e4m3 only on sm_89 and later; on older GPUs FP8 weights go in as raw bytes, decoded arithmetically.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moeray.kernels.activation import CLAMPED_SWIGLU, GLU, GatedActivation
from moeray.kernels.grouped import ExpertWeights, check_inputs
from moeray.kernels.quantized import FP8, QuantizedExpertWeights

ACT_SILU, ACT_CLAMPED_SWIGLU = 0, 1
QUANT_NONE, QUANT_FP8, QUANT_MXFP4 = 0, 1, 2
DECODE_BLOCK_M, PREFILL_BLOCK_M = 16, 64


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _configs() -> list[triton.Config]:
    # Decode tiles (BLOCK_M=16) want wide N to stream weights; prefill tiles are square-ish. The key below keeps
    # the two buckets apart so each gets its own winner.
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for n, k, w, s in [(64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 4), (256, 64, 8, 3), (64, 128, 4, 4)]
    ]


@triton.jit
def _tile_rows(tile_slot_ptr, tile_row_ptr, slot_end_ptr, tile, BLOCK_M: tl.constexpr):
    slot = tl.load(tile_slot_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.load(slot_end_ptr + tl.maximum(slot, 0))
    rows = row0 + tl.arange(0, BLOCK_M)
    return slot, rows, rows < row_end


@triton.jit
def _weight_tile(w_base, s_base, rows, ks, mask, stride_wn, stride_sn, scale_bn, scale_bk, QUANT: tl.constexpr):
    """The tile ``w[rows, ks].T`` ([BLOCK_K, BLOCK_N]) of one slot's projection: as stored for QUANT_NONE, else
    dequantized to fp32 in registers, ``value(q[n, k]) * scale[n // scale_bn, k // scale_bk]`` per element."""
    if QUANT == 0:
        w = tl.load(w_base + rows[None, :] * stride_wn + ks[:, None], mask=mask, other=0.0)
    else:
        scale_offs = (rows // scale_bn)[None, :] * stride_sn + (ks // scale_bk)[:, None]
        if QUANT == 1:  # float8_e4m3fn, float32 block scales
            if w_base.dtype.element_ty == tl.uint8:  # e4m3 bits (_fp8_as_bits): (8 + m) * 2 ** (e - 10), m * 2 ** -9
                bits = tl.load(w_base + rows[None, :] * stride_wn + ks[:, None], mask=mask, other=0).to(tl.int32)
                exponent, mantissa = (bits >> 3) & 0xF, bits & 7
                magnitude = tl.where(exponent == 0, mantissa, 8 + mantissa).to(tl.float32)
                power = ((tl.maximum(exponent, 1) + 117) << 23).to(tl.float32, bitcast=True)
                w = tl.where((bits & 0x80) != 0, -magnitude, magnitude) * power
            else:
                w = tl.load(w_base + rows[None, :] * stride_wn + ks[:, None], mask=mask, other=0.0).to(tl.float32)
            scale = tl.load(s_base + scale_offs, mask=mask, other=0.0).to(tl.float32)
        else:  # mxfp4: column k is nibble k % 2 (low first) of byte k // 2
            byte = tl.load(w_base + rows[None, :] * stride_wn + (ks // 2)[:, None], mask=mask, other=0).to(tl.int32)
            code = (byte >> ((ks & 1) * 4)[:, None]) & 0xF
            exponent, mantissa = (code >> 1) & 3, code & 1
            # e2m1 magnitude in quarters: 2m when the exponent is 0 (subnormal 0.5m), else (2 + m) << e
            quarters = tl.where(exponent == 0, 2 * mantissa, (2 + mantissa) << exponent)
            w = tl.where((code & 8) != 0, -0.25, 0.25) * quarters.to(tl.float32)
            # e8m0: the byte is a float32 exponent field, 2 ** (byte - 127) exactly (byte 0 reads as 0, not 2**-127)
            e8m0 = tl.load(s_base + scale_offs, mask=mask, other=127).to(tl.int32)
            scale = (e8m0 << 23).to(tl.float32, bitcast=True)
        w = w * scale
    return w


@triton.jit
def _gate_up_act_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, h_ptr, sorted_token_ptr, tile_slot_ptr, tile_row_ptr, slot_end_ptr,
    I, H, stride_xt, stride_ws, stride_wn, stride_ss, stride_sn, scale_bn, scale_bk, stride_bs, stride_hn, alpha,
    limit, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, INTERLEAVED: tl.constexpr, QUANT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    slot, rows, row_mask = _tile_rows(tile_slot_ptr, tile_row_ptr, slot_end_ptr, tl.program_id(0), BLOCK_M)
    if slot < 0:
        return
    tokens = tl.load(sorted_token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    if INTERLEAVED:  # [g0, u0, g1, u1, ...]
        gate_rows, up_rows = 2 * cols, 2 * cols + 1
    else:  # [g0, g1, ..., u0, u1, ...]
        gate_rows, up_rows = cols, I + cols
    w_base = w_ptr + slot.to(tl.int64) * stride_ws
    s_base = s_ptr + slot.to(tl.int64) * stride_ss
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        a = tl.load(x_ptr + tokens[:, None] * stride_xt + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        wg = _weight_tile(w_base, s_base, gate_rows, ks, w_mask, stride_wn, stride_sn, scale_bn, scale_bk,
                          QUANT).to(a.dtype)
        wu = _weight_tile(w_base, s_base, up_rows, ks, w_mask, stride_wn, stride_sn, scale_bn, scale_bk,
                          QUANT).to(a.dtype)
        if UPCAST:
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_gate = tl.dot(a, wg, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, wu, acc_up, input_precision=PRECISION)
    if HAS_BIAS:
        b_base = b_ptr + slot.to(tl.int64) * stride_bs
        acc_gate += tl.load(b_base + gate_rows, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(b_base + up_rows, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if ACT == 0:  # SiLU(gate) * up
        h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    else:  # GPT-OSS: clamped gate and up, (up + 1) * gate * sigmoid(alpha * gate)
        gate = tl.minimum(acc_gate, limit)
        up = tl.minimum(tl.maximum(acc_up, -limit), limit)
        h = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_hn + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, s_ptr, b_ptr, out_ptr, y_ptr, sorted_token_ptr, sorted_weight_ptr, tile_slot_ptr, tile_row_ptr,
    slot_end_ptr, H, I, stride_hn, stride_ws, stride_wh, stride_ss, stride_sh, scale_bn, scale_bk, stride_bs,
    stride_on, stride_yt, HAS_BIAS: tl.constexpr, FUSED_COMBINE: tl.constexpr, QUANT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    slot, rows, row_mask = _tile_rows(tile_slot_ptr, tile_row_ptr, slot_end_ptr, tl.program_id(0), BLOCK_M)
    if slot < 0:
        return
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    w_base = w_ptr + slot.to(tl.int64) * stride_ws
    s_base = s_ptr + slot.to(tl.int64) * stride_ss
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < I
        a = tl.load(h_ptr + rows64[:, None] * stride_hn + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = _weight_tile(w_base, s_base, cols, ks, k_mask[:, None] & col_mask[None, :], stride_wh, stride_sh,
                         scale_bn, scale_bk, QUANT).to(a.dtype)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + slot.to(tl.int64) * stride_bs + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc *= tl.load(sorted_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    mask = row_mask[:, None] & col_mask[None, :]
    if FUSED_COMBINE:
        tokens = tl.load(sorted_token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        tl.atomic_add(y_ptr + tokens[:, None] * stride_yt + cols[None, :], acc, mask=mask)
    else:
        tl.store(out_ptr + rows64[:, None] * stride_on + cols[None, :], acc, mask=mask)


@triton.jit
def _combine_kernel(out_ptr, y_ptr, pos_ptr, token_start_ptr, H, stride_on, stride_yt, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    start = tl.load(token_start_ptr + t)
    end = tl.load(token_start_ptr + t + 1)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in range(start, end):  # fixed order: deterministic
        p = tl.load(pos_ptr + j).to(tl.int64)
        acc += tl.load(out_ptr + p * stride_on + cols, mask=mask, other=0.0)
    tl.store(y_ptr + t.to(tl.int64) * stride_yt + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


_gate_up_tuned = triton.autotune(configs=_configs(), key=["I", "H", "BLOCK_M", "QUANT"])(_gate_up_act_kernel)
_down_tuned = triton.autotune(configs=_configs(), key=["H", "I", "BLOCK_M", "QUANT"],
                              reset_to_zero=["y_ptr"])(_down_kernel)


def _act_code(activation: GatedActivation) -> int:
    if activation.kind == CLAMPED_SWIGLU:
        return ACT_CLAMPED_SWIGLU
    if activation.kind == GLU and activation.act == "silu":
        return ACT_SILU
    raise ValueError(f"the Triton kernels implement SiLU and GPT-OSS's clamped SwiGLU; got {activation}")


def tile_schedule(pair_slot_N: torch.Tensor, num_slots: int, block_m: int):
    """Flatten-sort-count, all on device: sort order, per-slot ends, and (slot, first row) per tile.

    The number of tiles is bounded by ceil(N / BLOCK_M) + S without reading the counts back to the host; tiles
    past the last are marked slot -1 and exit at once.
    """
    n = pair_slot_N.numel()
    order_N = torch.argsort(pair_slot_N, stable=True)
    counts_S = torch.bincount(pair_slot_N, minlength=num_slots)
    slot_end_S = torch.cumsum(counts_S, 0)
    slot_start_S = slot_end_S - counts_S
    tiles_S = (counts_S + block_m - 1) // block_m
    tile_end_S = torch.cumsum(tiles_S, 0)
    max_tiles = (n + block_m - 1) // block_m + num_slots
    tile_ids = torch.arange(max_tiles, device=pair_slot_N.device)
    tile_slot = torch.searchsorted(tile_end_S, tile_ids, right=True)
    valid = tile_slot < num_slots
    slot_c = tile_slot.clamp(max=num_slots - 1)
    tile_row = slot_start_S[slot_c] + (tile_ids - (tile_end_S - tiles_S)[slot_c]) * block_m
    tile_slot = torch.where(valid, tile_slot, -1).to(torch.int32)
    return order_N, slot_end_S.to(torch.int32), tile_slot, tile_row.to(torch.int32), max_tiles


def _fp8_as_bits(device: torch.device) -> bool:
    """Whether FP8 weights go to the kernels as raw bytes: Triton converts e4m3 only on sm_89 and later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)


def _projections(weights: ExpertWeights | QuantizedExpertWeights):
    """``(QUANT, intermediate, gate_up, down, (scale_bn, scale_bk))``, each projection a (weight, scale) pair; the
    scale of plain weights is a dummy pointer the kernels never read."""
    if isinstance(weights, QuantizedExpertWeights):
        quant = QUANT_FP8 if weights.quant.format == FP8 else QUANT_MXFP4
        q_gu, q_down = weights.q_gate_up, weights.q_down
        if quant == QUANT_FP8 and _fp8_as_bits(q_gu.device):
            q_gu, q_down = q_gu.view(torch.uint8), q_down.view(torch.uint8)
        return quant, weights.intermediate, (q_gu, weights.s_gate_up), (q_down, weights.s_down), weights.quant.block
    if isinstance(weights, ExpertWeights):
        gate_up, down = weights.w_gate_up_S2IH, weights.w_down_SHI
        return QUANT_NONE, down.shape[2], (gate_up, gate_up), (down, down), (1, 1)
    raise TypeError(f"the Triton kernels take ExpertWeights or QuantizedExpertWeights; got {type(weights).__name__}")


def grouped_experts_triton(
    x_TH: torch.Tensor,
    pair_token_N: torch.Tensor,
    pair_slot_N: torch.Tensor,
    pair_weight_N: torch.Tensor,
    weights: ExpertWeights | QuantizedExpertWeights,
    activation: GatedActivation,
    *,
    deterministic: bool = True,
    block_m: int | None = None,
) -> torch.Tensor:
    """``grouped_experts`` on Triton (see the module docstring), for plain or quantized (FP8, MXFP4) experts.
    ``deterministic=False`` adds each pair's output into y_TH atomically instead of running the combine kernel."""
    quant, inter, (w_gu, s_gu), (w_down, s_down), (scale_bn, scale_bk) = _projections(weights)
    check_inputs(x_TH, pair_token_N, pair_slot_N, pair_weight_N, weights)
    if x_TH.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1); x is on {x_TH.device}")
    num_tokens, hidden = x_TH.shape
    num_slots = weights.num_slots
    n = pair_token_N.numel()
    y_TH = torch.zeros(num_tokens, hidden, dtype=torch.float32 if not deterministic else x_TH.dtype,
                       device=x_TH.device)
    if n == 0:
        return y_TH.to(x_TH.dtype)
    if block_m is None:  # decode: a few pairs per slot; prefill: many
        block_m = DECODE_BLOCK_M if n <= 4 * DECODE_BLOCK_M * num_slots else PREFILL_BLOCK_M
    order_N, slot_end_S, tile_slot, tile_row, max_tiles = tile_schedule(pair_slot_N, num_slots, block_m)
    sorted_token_N = pair_token_N[order_N].to(torch.int32).contiguous()
    sorted_weight_N = pair_weight_N[order_N].float().contiguous()
    h_NI = torch.empty(n, inter, dtype=x_TH.dtype, device=x_TH.device)
    out_NH = torch.empty(n if deterministic else 1, hidden, dtype=torch.float32, device=x_TH.device)
    has_bias = weights.b_gate_up_S2I is not None
    bias_gu = weights.b_gate_up_S2I if has_bias else h_NI  # a dummy pointer when unused
    bias_down = weights.b_down_SH if has_bias else h_NI
    precision = "ieee" if x_TH.dtype == torch.float32 else "tf32"
    # NOTE: Triton 3.9's interpreter gets bfloat16 dot products wrong (a 16x16 product off by 1e10); there, and only
    # there, bf16 tiles are upcast to fp32 before the dot. GPUs keep bf16 operands with fp32 accumulation.
    upcast = interpreting() and x_TH.dtype == torch.bfloat16
    if upcast:
        precision = "ieee"
    common_gu = (x_TH, w_gu, s_gu, bias_gu, h_NI, sorted_token_N, tile_slot, tile_row, slot_end_S, inter, hidden,
                 x_TH.stride(0), w_gu.stride(0), w_gu.stride(1), s_gu.stride(0), s_gu.stride(1), scale_bn, scale_bk,
                 bias_gu.stride(0), h_NI.stride(0), activation.alpha, activation.limit)
    gu_flags = dict(HAS_BIAS=has_bias, ACT=_act_code(activation), INTERLEAVED=weights.interleaved, QUANT=quant,
                    PRECISION=precision, UPCAST=upcast, BLOCK_M=block_m)
    common_down = (h_NI, w_down, s_down, bias_down, out_NH, y_TH, sorted_token_N, sorted_weight_N, tile_slot,
                   tile_row, slot_end_S, hidden, inter, h_NI.stride(0), w_down.stride(0), w_down.stride(1),
                   s_down.stride(0), s_down.stride(1), scale_bn, scale_bk, bias_down.stride(0), out_NH.stride(0),
                   y_TH.stride(0))
    down_flags = dict(HAS_BIAS=has_bias, FUSED_COMBINE=not deterministic, QUANT=quant, PRECISION=precision,
                      UPCAST=upcast, BLOCK_M=block_m)
    if interpreting():  # autotuning under the interpreter would run every config: one small config instead
        blocks = dict(BLOCK_N=32, BLOCK_K=32)
        _gate_up_act_kernel[(max_tiles, triton.cdiv(inter, 32))](*common_gu, **gu_flags, **blocks)
        _down_kernel[(max_tiles, triton.cdiv(hidden, 32))](*common_down, **down_flags, **blocks)
    else:
        _gate_up_tuned[lambda meta: (max_tiles, triton.cdiv(inter, meta["BLOCK_N"]))](*common_gu, **gu_flags)
        _down_tuned[lambda meta: (max_tiles, triton.cdiv(hidden, meta["BLOCK_N"]))](*common_down, **down_flags)
    if not deterministic:
        return y_TH.to(x_TH.dtype)
    # Pairs grouped by token, each pointing at its row of out_NH: a fixed summation order per token.
    pos_of_pair_N = torch.empty_like(order_N)
    pos_of_pair_N[order_N] = torch.arange(n, device=x_TH.device)
    by_token_N = torch.argsort(pair_token_N, stable=True)
    pos_by_token_N = pos_of_pair_N[by_token_N].to(torch.int32)
    token_start = torch.zeros(num_tokens + 1, dtype=torch.int32, device=x_TH.device)
    token_start[1:] = torch.cumsum(torch.bincount(pair_token_N, minlength=num_tokens), 0)
    block_h = 64 if interpreting() else 256
    _combine_kernel[(num_tokens, triton.cdiv(hidden, block_h))](out_NH, y_TH, pos_by_token_N, token_start, hidden,
                                                                out_NH.stride(0), y_TH.stride(0), BLOCK_H=block_h)
    return y_TH
