"""Triton kernels on quantized experts (FP8 block-scaled, MXFP4) under TRITON_INTERPRET=1 or on CUDA.

The reference is the naive loop on experts expanded by transformers' own dequantization (``_dequantize_fp8_weight``
for FP8, ``convert_moe_packed_tensors`` for MXFP4), not by moeray's. FP8 sizes are not block multiples: H=40 and
I=24 against scale blocks (16, 16), (8, 4) and (1, 48) (partial edge blocks; a 32-wide K tile straddles blocks).
"""

import dataclasses
import os

import pytest
import torch
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from cases import make_case
from moeray.kernels.api import CLAMPED_SWIGLU, ExpertQuant, ExpertWeights, GatedActivation, QuantizedExpertWeights
from moeray.kernels.api import reference_experts
from moeray.kernels.quantized import MXFP4_BLOCK, quantize_experts

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)
triton_grouped = pytest.importorskip("moeray.kernels.triton_grouped")

SILU, CLAMPED = GatedActivation(), GatedActivation(kind=CLAMPED_SWIGLU, limit=0.6)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _transformers_dequantized(qw: QuantizedExpertWeights) -> ExpertWeights:
    """float32 experts expanded by transformers' dequantization of the same bytes."""
    def expand(q_SMK, s):
        if qw.quant.format == "fp8":
            return _dequantize_fp8_weight(q_SMK.clone(), s, list(qw.quant.block), torch.float32)
        slots, m, half_k = q_SMK.shape
        blocks = q_SMK.reshape(slots, m, half_k * 2 // MXFP4_BLOCK, MXFP4_BLOCK // 2)
        return convert_moe_packed_tensors(blocks, s, dtype=torch.float32).transpose(1, 2).contiguous()

    bias = lambda b: None if b is None else b.float()
    return ExpertWeights(w_gate_up_S2IH=expand(qw.q_gate_up, qw.s_gate_up), w_down_SHI=expand(qw.q_down, qw.s_down),
                         b_gate_up_S2I=bias(qw.b_gate_up_S2I), b_down_SH=bias(qw.b_down_SH),
                         interleaved=qw.interleaved)


def _on(qw: QuantizedExpertWeights, device) -> QuantizedExpertWeights:
    tensors = {f.name: getattr(qw, f.name) for f in dataclasses.fields(qw)}
    return dataclasses.replace(qw, **{k: t.to(device) for k, t in tensors.items() if isinstance(t, torch.Tensor)})


def _check(case, dtype=torch.float32, deterministic=True, atol=1e-4, block_m=None):
    fmt, block, tokens, hidden, inter, slots, top_k, bias, act, interleaved = case
    x, pt, ps, pw, w = make_case(tokens, hidden, inter, slots, top_k, bias, interleaved=interleaved)
    if dtype != torch.float32:  # activations and biases scaled by 1/10, as in test_triton_interpret.py
        x = x / 10
        if bias:
            w = dataclasses.replace(w, b_gate_up_S2I=w.b_gate_up_S2I / 10, b_down_SH=w.b_down_SH / 10)
    qw = quantize_experts(w, ExpertQuant(format=fmt, block=block), dtype)
    want = reference_experts(x.to(dtype).float(), pt, ps, pw, _transformers_dequantized(qw), act)
    got = triton_grouped.grouped_experts_triton(x.to(DEVICE, dtype), pt.to(DEVICE), ps.to(DEVICE), pw.to(DEVICE),
                                                _on(qw, DEVICE), act, deterministic=deterministic, block_m=block_m)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float().cpu(), want, atol=atol, rtol=0 if dtype != torch.float32 else 1e-4)


FP8_CASES = [  # format, block, tokens, hidden, inter, slots, top_k, bias, activation, interleaved
    ("fp8", (16, 16), 7, 40, 24, 4, 2, True, SILU, False),
    ("fp8", (8, 4), 33, 40, 24, 8, 4, False, CLAMPED, True),
    ("fp8", (1, 48), 1, 40, 24, 2, 1, True, CLAMPED, False),  # BN = 1; BK wider than the K tile and than H, I
]
MXFP4_CASES = [
    ("mxfp4", (1, 32), 7, 64, 32, 4, 2, True, CLAMPED, True),  # GPT-OSS's layout
    ("mxfp4", (1, 32), 33, 64, 32, 8, 4, False, SILU, False),
    ("mxfp4", (1, 32), 1, 96, 160, 2, 2, True, SILU, True),
]
_id = lambda c: f"{c[0]}-{c[1][0]}x{c[1][1]}-T{c[2]}-H{c[3]}-I{c[4]}-{'bias' if c[7] else 'nobias'}"


@pytest.mark.parametrize("case", FP8_CASES + MXFP4_CASES, ids=_id)
def test_fp32_activations_match_transformers_dequantized(case):
    _check(case)


@pytest.mark.parametrize("case", [FP8_CASES[1], MXFP4_CASES[1]], ids=_id)
def test_atomic_combine(case):
    _check(case, deterministic=False)


@pytest.mark.parametrize("case", [FP8_CASES[1], MXFP4_CASES[1]], ids=_id)
def test_prefill_tiling(case):
    _check(case, block_m=64)


@pytest.mark.parametrize("case", [FP8_CASES[0], MXFP4_CASES[0]], ids=_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations_within_2e_2(case, dtype):
    _check(case, dtype=dtype, atol=2e-2)


@pytest.mark.parametrize("case", [FP8_CASES[0], FP8_CASES[1]], ids=_id)
def test_fp8_bit_decoding_for_gpus_before_sm89(case, monkeypatch):
    """Where Triton cannot convert e4m3 (sm_80), the kernels decode the raw bytes; forced here on any device."""
    monkeypatch.setattr(triton_grouped, "_fp8_as_bits", lambda device: True)
    _check(case)


@pytest.mark.parametrize("smallest", [False, True], ids=["finite-bytes", "subnormal-bytes"])
@pytest.mark.parametrize("as_bits", [False, True], ids=["triton-cast", "bit-decoding"])
def test_fp8_decodes_every_byte(as_bits, smallest, monkeypatch):
    """All 254 finite e4m3 bytes through both projections, by either decoder; then only the subnormal and
    smallest normal bytes, scaled up so that their values, not the large ones, decide the result."""
    monkeypatch.setattr(triton_grouped, "_fp8_as_bits", lambda device: as_bits)
    hidden, inter = 64, 32
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # 0x7F and 0xFF are NaN
    if smallest:
        codes = codes[(codes & 0x70) == 0]  # exponent field 0 (subnormal) or 1
    scale = 2.0**4 if smallest else 2.0**-8
    g = torch.Generator().manual_seed(0)

    def spread(m, k):  # every code at least once, in random places
        picks = torch.cat([codes, codes[torch.randint(len(codes), (m * k - len(codes),), generator=g)]])
        return picks[torch.randperm(m * k, generator=g)].view(1, m, k)

    q_gu, q_down = spread(2 * inter, hidden), spread(hidden, inter)
    qw = QuantizedExpertWeights(quant=ExpertQuant(format="fp8", block=(16, 16)),
                                q_gate_up=q_gu.view(torch.float8_e4m3fn), s_gate_up=torch.full((1, 4, 4), scale),
                                q_down=q_down.view(torch.float8_e4m3fn), s_down=torch.full((1, 4, 2), scale),
                                hidden=hidden, intermediate=inter, compute_dtype=torch.float32)
    x = torch.randn(3, hidden, generator=g)
    pt, ps, pw = torch.arange(3), torch.zeros(3, dtype=torch.long), torch.ones(3)
    want = reference_experts(x, pt, ps, pw, _transformers_dequantized(qw), SILU)
    assert want.abs().max() > 1  # the small values decide a result well above the tolerance
    got = triton_grouped.grouped_experts_triton(x.to(DEVICE), pt.to(DEVICE), ps.to(DEVICE), pw.to(DEVICE),
                                                _on(qw, DEVICE), SILU)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_mxfp4_decodes_every_code_and_scale():
    """One expert whose weights hold every byte (all 16 e2m1 codes in both nibbles) under several exponents."""
    hidden, inter = 64, 32
    g = torch.Generator().manual_seed(0)

    def spread(values, shape):  # every value at least once, in random places
        n = shape[0] * shape[1]
        picks = torch.cat([values, values[torch.randint(len(values), (n - len(values),), generator=g)]])
        return picks[torch.randperm(n, generator=g)].view(1, *shape)

    codes, exps = torch.arange(256, dtype=torch.uint8), torch.tensor([119, 123, 126, 127, 128], dtype=torch.uint8)
    qw = QuantizedExpertWeights(quant=ExpertQuant(format="mxfp4", block=(1, 32)),
                                q_gate_up=spread(codes, (2 * inter, hidden // 2)),
                                s_gate_up=spread(exps, (2 * inter, 2)),
                                q_down=spread(codes, (hidden, inter // 2)), s_down=spread(exps, (hidden, 1)),
                                hidden=hidden, intermediate=inter, compute_dtype=torch.float32)
    x = torch.randn(3, hidden, generator=g) / 8
    pt, ps, pw = torch.arange(3), torch.zeros(3, dtype=torch.long), torch.ones(3)
    want = reference_experts(x, pt, ps, pw, _transformers_dequantized(qw), SILU)
    assert want.abs().max() > 1
    got = triton_grouped.grouped_experts_triton(x.to(DEVICE), pt.to(DEVICE), ps.to(DEVICE), pw.to(DEVICE),
                                                _on(qw, DEVICE), SILU)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_packed_weights_are_rejected():
    from moeray.kernels.api import PackedExpertWeights

    x, pt, ps, pw, w = make_case(2, 16, 16, 1, 1, bias=False)
    packed = PackedExpertWeights(gate_up_panels=torch.zeros(1, 2, 16, 16), down_panels=torch.zeros(1, 1, 16, 16),
                                 hidden=16, intermediate=16)
    with pytest.raises(TypeError, match="ExpertWeights or QuantizedExpertWeights"):
        triton_grouped.grouped_experts_triton(x, pt, ps, pw, packed, SILU)
