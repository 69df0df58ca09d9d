"""The CPU kernels on quantized experts (rows_gemm.c: fp8_/mxfp4_rows_gemm, fp8_/mxfp4_panels_gemm) and the torch
path that runs them, against transformers.

The reference expands the same bytes with transformers' own dequantization (``_dequantize_fp8_weight`` for FP8,
``convert_moe_packed_tensors`` for MXFP4), not moeray's. FP8 sizes are not block multiples: H=40 and I=24 against
scale blocks (16, 16), (8, 4), (1, 8) and (128, 128) (partial edge blocks, blocks narrower than a vector, K not a
multiple of 8). The conversions themselves are checked bit for bit over every byte value against torch's. The MXFP4
rows kernel runs twice where the CPU has AVX-512: its AVX-512 variant (the default there) and the AVX2 one.
"""

import ctypes
import functools
import shutil
import subprocess

import pytest
import torch
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

from cases import make_case
from moeray.kernels.api import CLAMPED_SWIGLU, ExpertQuant, ExpertWeights, GatedActivation, QuantizedExpertWeights
from moeray.kernels import cpu_rows
from moeray.kernels.api import grouped_experts_torch, reference_experts
from moeray.kernels import grouped as grouped_module
from moeray.kernels.quantized import MXFP4_BLOCK, quantize_experts, quantize_fp8, quantize_mxfp4

pytestmark = pytest.mark.skipif(not cpu_rows._cpu_has_avx2_fma(), reason="the kernels need an x86 CPU with AVX2")

SILU, CLAMPED = GatedActivation(), GatedActivation(kind=CLAMPED_SWIGLU, limit=0.6)
FP8_BLOCKS = [(16, 16), (8, 4), (1, 8), (128, 128)]
ROWS = [*range(1, 14), 33]
KERNELS = {"rows": cpu_rows.quantized_rows_matmul, "panels": cpu_rows.quantized_panels_matmul}
# MXFP4's rows kernel also forced onto AVX2 ("rows" is the AVX-512 one on a CPU that has it)
MXFP4_KERNELS = {**KERNELS, "rows_avx2": functools.partial(cpu_rows.quantized_rows_matmul, avx512=False)}
NOT_NAN = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)  # e4m3fn NaN: 0x7F, 0xFF


def _fp8_hf(q_MK: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    return _dequantize_fp8_weight(q_MK.clone(), scale, list(block), torch.float32)


def _mxfp4_hf(q_MK2: torch.Tensor, e_MK32: torch.Tensor) -> torch.Tensor:
    m, half_k = q_MK2.shape
    blocks = q_MK2.reshape(1, m, half_k * 2 // MXFP4_BLOCK, MXFP4_BLOCK // 2)
    return convert_moe_packed_tensors(blocks, e_MK32[None], dtype=torch.float32)[0].t()  # [K, M] -> [M, K]


def test_kernels_build_on_this_machine():
    assert cpu_rows.available()


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("k", [8, 3])  # a whole vector, and the scalar tail
def test_fp8_decoding_is_exact(kind, k):
    # Row m holds one byte value in every column; x = e_0 picks column 0, so out[0, m] is the decoded weight itself.
    m = len(NOT_NAN)
    q = NOT_NAN[:, None].expand(m, k).contiguous().view(torch.float8_e4m3fn)
    x = torch.zeros(1, k)
    x[0, 0] = 1.0
    quant = ExpertQuant(format="fp8", block=(1, 8))
    for scale in (torch.ones(m, 1), torch.full((m, 1), 0.3)):
        got = KERNELS[kind](x, q, scale, quant, torch.full((1, m), float("nan")))
        assert torch.equal(got[0], NOT_NAN.view(torch.float8_e4m3fn).to(torch.float32) * scale[:, 0])


@pytest.mark.parametrize("kind", MXFP4_KERNELS)
def test_e8m0_scales_are_exact(kind):
    # Row m's scale byte is m (2^(m-127): subnormal for m = 0, 1; 255 is NaN), every weight 1.0; x = e_0.
    e = torch.arange(255, dtype=torch.uint8)[:, None]
    q = torch.full((len(e), 16), 0x22, dtype=torch.uint8)
    x = torch.zeros(1, 32)
    x[0, 0] = 1.0
    got = MXFP4_KERNELS[kind](x, q, e, ExpertQuant(format="mxfp4", block=(1, 32)), torch.empty(1, len(e)))
    assert torch.equal(got[0], e[:, 0].view(torch.float8_e8m0fnu).to(torch.float32))


@pytest.mark.parametrize("kind", MXFP4_KERNELS)
def test_e2m1_values_are_exact(kind):
    # Column k holds code k % 16; x = identity, so out[k, m] is weight [m, k]. Scales from subnormal to 2^125.
    e = torch.tensor([0, 1, 2, 100, 127, 128, 200, 252], dtype=torch.uint8)[:, None]
    codes = torch.arange(32) % 16
    q = (codes[0::2] | codes[1::2] << 4).to(torch.uint8).expand(len(e), 16).contiguous()
    got = MXFP4_KERNELS[kind](torch.eye(32), q, e, ExpertQuant(format="mxfp4", block=(1, 32)),
                              torch.empty(32, len(e)))
    scales = e[:, 0].view(torch.float8_e8m0fnu).to(torch.float32)
    assert torch.equal(got, torch.tensor(FP4_VALUES)[codes][:, None] * scales[None, :])
    assert torch.equal(got, _mxfp4_hf(q, e).t())


@functools.cache
def _projection(fmt, block, m, k):
    """A random [m, k] projection quantized by moeray's quantizers, and transformers' expansion of its bytes."""
    w = torch.randn(m, k, generator=torch.Generator().manual_seed(m * 100 + k)) / k**0.5
    if fmt == "fp8":
        q, scale = quantize_fp8(w, block)
        return q, scale, _fp8_hf(q, scale, block)
    q, scale = quantize_mxfp4(w)
    return q, scale, _mxfp4_hf(q, scale)


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("fmt,block,m,k", [("fp8", b, *mk) for b in FP8_BLOCKS for mk in [(48, 40), (40, 24)]]
                         + [("mxfp4", (1, 32), 192, 64), ("mxfp4", (1, 32), 64, 96)])
def test_quantized_matmul_matches_transformers(kind, rows, fmt, block, m, k):
    q, scale, w_hf = _projection(fmt, block, m, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    got = KERNELS[kind](x, q, scale, ExpertQuant(format=fmt, block=block), torch.full((rows, m), float("nan")))
    torch.testing.assert_close(got, x @ w_hf.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_quantized_matmul_splits_rows_over_threads(fmt, threads):
    # Several 8-row pieces and 16-row panels per thread, the last ones partial; strided x and out.
    q, scale, w_hf = _projection(fmt, (128, 128) if fmt == "fp8" else (1, 32), 300, 1024)
    x = torch.randn(40, 1030)[:, 3:1027]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows, kind in [(5, "rows"), (40, "panels")]:
            out = torch.zeros(rows, 310)
            KERNELS[kind](x[:rows], q, scale, ExpertQuant(format=fmt, block=(128, 128) if fmt == "fp8" else (1, 32)),
                          out[:, 4:304])
            torch.testing.assert_close(out[:, 4:304], x[:rows] @ w_hf.t(), atol=1e-4, rtol=1e-5)
            assert not out[:, :4].any() and not out[:, 304:].any()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(not cpu_rows.cpu_has_avx512(), reason="the AVX-512 kernel needs AVX-512 F, BW, VL and DQ")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("m,k", [(192, 64), (64, 96), (300, 1024), (37, 2080)])
def test_mxfp4_rows_kernel_avx512_and_avx2_agree(m, k, rows, threads):
    # Both variants run, each matches transformers' expansion and they agree; strided x and out, rows of W split
    # over threads (partial 8-row pieces and weight-row groups), K of 2-65 blocks (2080: past one 64-block segment
    # of scales, and not a multiple of 128).
    q, scale, w_hf = _projection("mxfp4", (1, 32), m, k)
    x = torch.randn(rows, k + 5, generator=torch.Generator().manual_seed(rows))[:, 2 : k + 2]
    want = x @ w_hf.t()
    quant = ExpertQuant(format="mxfp4", block=(1, 32))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = {}
        for avx512 in (True, False):
            out = torch.full((rows, m + 6), float("nan"))
            cpu_rows.quantized_rows_matmul(x, q, scale, quant, out[:, 3 : m + 3], avx512=avx512)
            assert out[:, :3].isnan().all() and out[:, m + 3 :].isnan().all()
            got[avx512] = out[:, 3 : m + 3]
            torch.testing.assert_close(got[avx512], want, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(got[True], got[False], atol=1e-5, rtol=1e-5)


def test_avx512_is_the_default_where_the_cpu_has_it(monkeypatch):
    monkeypatch.delenv("MOERAY_CPU_AVX512", raising=False)
    assert cpu_rows.avx512_enabled() == cpu_rows.cpu_has_avx512()
    monkeypatch.setenv("MOERAY_CPU_AVX512", "0")
    assert not cpu_rows.avx512_enabled()
    monkeypatch.setattr(cpu_rows, "cpu_has_avx512", lambda: False)
    q, scale, _ = _projection("mxfp4", (1, 32), 64, 96)
    with pytest.raises(RuntimeError, match="no AVX-512"):
        cpu_rows.quantized_rows_matmul(torch.randn(2, 96), q, scale, ExpertQuant(format="mxfp4", block=(1, 32)),
                                       torch.empty(2, 64), avx512=True)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_the_build_without_avx512_runs_the_avx2_kernel(tmp_path):
    # What cpu_rows builds when the compiler lacks AVX-512 support: no AVX-512 code; mxfp4_rows_gemm is AVX2's.
    lib_path = tmp_path / "rows_gemm_no_avx512.so"
    subprocess.run([shutil.which("cc") or shutil.which("gcc"), "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared",
                    "-fPIC", "-DMOERAY_NO_AVX512", "-o", str(lib_path), str(cpu_rows._SOURCE)], check=True)
    lib = ctypes.CDLL(str(lib_path))
    assert lib.rows_gemm_avx512() == 0
    q, scale, w_hf = _projection("mxfp4", (1, 32), 64, 96)
    x, out = torch.randn(3, 96), torch.full((3, 64), float("nan"))
    p = ctypes.c_void_p
    lib.mxfp4_rows_gemm.argtypes = [p, p, ctypes.c_long, p, ctypes.c_long, p, ctypes.c_long, ctypes.c_long,
                                    ctypes.c_long, ctypes.c_int]
    assert lib.mxfp4_rows_gemm(q.data_ptr(), scale.data_ptr(), 96, x.data_ptr(), 96, out.data_ptr(), 64, 3, 64, 1) == 0
    torch.testing.assert_close(out, x @ w_hf.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,message", [
    (lambda x, q, s, o: (x, q.view(torch.uint8), s, o), "float8_e4m3fn"),
    (lambda x, q, s, o: (x, q, s[:, :-1].contiguous(), o), r"\(3, 2\)"),
    (lambda x, q, s, o: (x, q, s.double(), o), "float32"),
    (lambda x, q, s, o: (x[:, :-1], q, s, o), "float8_e4m3fn"),
    (lambda x, q, s, o: (x, q, s, o[:-1]), "do not fit"),
    (lambda x, q, s, o: (x.double(), q, s, o), "float32 CPU"),
])
def test_quantized_matmul_rejects_bad_input(bad, message):
    q, scale, _ = _projection("fp8", (16, 16), 48, 40)
    x, q, scale, out = bad(torch.randn(4, 40), q, scale, torch.empty(4, 48))
    with pytest.raises(ValueError, match=message):
        cpu_rows.quantized_rows_matmul(x, q, scale, ExpertQuant(format="fp8", block=(16, 16)), out)


def test_mxfp4_matmul_rejects_partial_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_rows.quantized_panels_matmul(torch.randn(2, 48), torch.zeros(8, 24, dtype=torch.uint8),
                                         torch.zeros(8, 2, dtype=torch.uint8),
                                         ExpertQuant(format="mxfp4", block=(1, 32)), torch.empty(2, 8))


def _transformers_dequantized(qw: QuantizedExpertWeights) -> ExpertWeights:
    def expand(q_SMK, s):
        if qw.quant.format == "fp8":
            return torch.stack([_fp8_hf(q, scale, qw.quant.block) for q, scale in zip(q_SMK, s)])
        return torch.stack([_mxfp4_hf(q, scale) for q, scale in zip(q_SMK, s)])

    return ExpertWeights(w_gate_up_S2IH=expand(qw.q_gate_up, qw.s_gate_up), w_down_SHI=expand(qw.q_down, qw.s_down),
                         b_gate_up_S2I=qw.b_gate_up_S2I, b_down_SH=qw.b_down_SH, interleaved=qw.interleaved)


QUANTS = [("fp8", b, 40, 24) for b in FP8_BLOCKS] + [("mxfp4", (1, 32), 64, 96)]


@pytest.mark.parametrize("activation", [SILU, CLAMPED], ids=["silu", "clamped"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens,skew", [(1, True), (5, True), (12, True), (13, True), (33, True), (40, False)])
@pytest.mark.parametrize("fmt,block,hidden,inter", QUANTS, ids=lambda v: str(v).replace(" ", ""))
def test_torch_path_on_quantized_experts(fmt, block, hidden, inter, tokens, skew, bias, activation):
    # skew: every pair on slot 0 (rows kernel up to QUANT_KERNEL_ROWS rows, panel kernel above); else random slots.
    x, pt, ps, pw, w = make_case(tokens, hidden, inter, 4, 1 if skew else 2, bias, skew=skew, interleaved=bias)
    qw = quantize_experts(w, ExpertQuant(format=fmt, block=block), torch.float32)
    want = reference_experts(x, pt, ps, pw, _transformers_dequantized(qw), activation)
    torch.testing.assert_close(grouped_experts_torch(x, pt, ps, pw, qw, activation), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt,block,hidden,inter", [QUANTS[0], QUANTS[-1]], ids=["fp8", "mxfp4"])
def test_torch_path_on_quantized_experts_without_the_kernels(monkeypatch, fmt, block, hidden, inter):
    # No compiler or no AVX2: each slot with rows is dequantized into a reused buffer and runs on BLAS. Same answers.
    monkeypatch.setattr(cpu_rows, "available", lambda: False)
    monkeypatch.setattr(cpu_rows, "quantized_rows_matmul", None)  # would raise if the path still reached them
    x, pt, ps, pw, w = make_case(33, hidden, inter, 4, 2, True)
    qw = quantize_experts(w, ExpertQuant(format=fmt, block=block), torch.float32)
    want = reference_experts(x, pt, ps, pw, _transformers_dequantized(qw), SILU)
    torch.testing.assert_close(grouped_experts_torch(x, pt, ps, pw, qw, SILU), want, atol=1e-4, rtol=1e-4)


def test_crossover_is_the_rows_kernels_limit():
    # Beyond QUANT_KERNEL_ROWS rows the rows kernels decode the weights once per chunk of MAX_ROWS rows.
    assert cpu_rows.MAX_ROWS <= grouped_module.QUANT_KERNEL_ROWS <= 2 * cpu_rows.MAX_ROWS
