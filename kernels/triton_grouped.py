"""Triton grouped expert kernels: the GPU implementation of ``moeray.kernels.grouped_experts``.

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
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moeray.kernels.activation import CLAMPED_SWIGLU, GLU, GatedActivation
from moeray.kernels.grouped import ExpertWeights, check_inputs

ACT_SILU, ACT_CLAMPED_SWIGLU = 0, 1
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
def _gate_up_act_kernel(
    x_ptr, w_ptr, b_ptr, h_ptr, sorted_token_ptr, tile_slot_ptr, tile_row_ptr, slot_end_ptr,
    I, H, stride_xt, stride_ws, stride_wn, stride_bs, stride_hn, alpha, limit,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, INTERLEAVED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        a = tl.load(x_ptr + tokens[:, None] * stride_xt + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        wg = tl.load(w_base + gate_rows[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)
        wu = tl.load(w_base + up_rows[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)
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
    h_ptr, w_ptr, b_ptr, out_ptr, y_ptr, sorted_token_ptr, sorted_weight_ptr, tile_slot_ptr, tile_row_ptr,
    slot_end_ptr, H, I, stride_hn, stride_ws, stride_wh, stride_bs, stride_on, stride_yt,
    HAS_BIAS: tl.constexpr, FUSED_COMBINE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    slot, rows, row_mask = _tile_rows(tile_slot_ptr, tile_row_ptr, slot_end_ptr, tl.program_id(0), BLOCK_M)
    if slot < 0:
        return
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    w_base = w_ptr + slot.to(tl.int64) * stride_ws
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < I
        a = tl.load(h_ptr + rows64[:, None] * stride_hn + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wh + ks[:, None], mask=k_mask[:, None] & col_mask[None, :],
                    other=0.0)
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


_gate_up_tuned = triton.autotune(configs=_configs(), key=["I", "H", "BLOCK_M"])(_gate_up_act_kernel)
_down_tuned = triton.autotune(configs=_configs(), key=["H", "I", "BLOCK_M"],
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


def grouped_experts_triton(
    x_TH: torch.Tensor,
    pair_token_N: torch.Tensor,
    pair_slot_N: torch.Tensor,
    pair_weight_N: torch.Tensor,
    weights: ExpertWeights,
    activation: GatedActivation,
    *,
    deterministic: bool = True,
    block_m: int | None = None,
) -> torch.Tensor:
    check_inputs(x_TH, pair_token_N, pair_slot_N, pair_weight_N, weights)
    if x_TH.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1); x is on {x_TH.device}")
    num_tokens, hidden = x_TH.shape
    num_slots, two_i, _ = weights.w_gate_up_S2IH.shape
    inter = two_i // 2
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
    common_gu = (x_TH, weights.w_gate_up_S2IH, bias_gu, h_NI, sorted_token_N, tile_slot, tile_row, slot_end_S,
                 inter, hidden, x_TH.stride(0), weights.w_gate_up_S2IH.stride(0), weights.w_gate_up_S2IH.stride(1),
                 bias_gu.stride(0), h_NI.stride(0), activation.alpha, activation.limit)
    gu_flags = dict(HAS_BIAS=has_bias, ACT=_act_code(activation), INTERLEAVED=weights.interleaved,
                    PRECISION=precision, UPCAST=upcast, BLOCK_M=block_m)
    common_down = (h_NI, weights.w_down_SHI, bias_down, out_NH, y_TH, sorted_token_N, sorted_weight_N, tile_slot,
                   tile_row, slot_end_S, hidden, inter, h_NI.stride(0), weights.w_down_SHI.stride(0),
                   weights.w_down_SHI.stride(1), bias_down.stride(0), out_NH.stride(0), y_TH.stride(0))
    down_flags = dict(HAS_BIAS=has_bias, FUSED_COMBINE=not deterministic, PRECISION=precision, UPCAST=upcast,
                      BLOCK_M=block_m)
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
