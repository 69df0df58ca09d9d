"""The CPU rows kernel (rows_gemm.c, built on first use) against torch, and the torch path with and without it."""

import pytest
import torch

from cases import ACTIVATIONS, make_case
from moeray.kernels import cpu_rows
from moeray.kernels.api import ExpertWeights, PackedExpertWeights, grouped_experts_torch, reference_experts
from moeray.kernels import grouped as grouped_module

needs_kernel = pytest.mark.skipif(not cpu_rows._cpu_has_avx2_fma(), reason="the rows kernel needs an x86 CPU with AVX2")


@needs_kernel
def test_kernel_builds_on_this_machine():
    # CI runs on AVX2 machines with a C compiler: the kernel must build there, not silently fall back to BLAS.
    assert cpu_rows.available()


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 17])
@pytest.mark.parametrize("k,m", [(96, 200), (33, 7), (8, 1), (1024, 64)])
def test_rows_matmul_matches_torch(rows, k, m, threads):
    g = torch.Generator().manual_seed(rows * 1000 + k + m)
    w_MK, x_nK = torch.randn(m, k, generator=g), torch.randn(rows, k, generator=g)
    out_nM = torch.full((rows, m), float("nan"))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu_rows.rows_matmul(x_nK, w_MK, out_nM)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(out_nM, x_nK @ w_MK.t(), atol=1e-4, rtol=1e-4)


@needs_kernel
def test_rows_matmul_writes_into_strided_rows():
    # The torch path hands it row slices of a wider buffer (leading dimension > M) and of its gather buffer.
    x_nK = torch.randn(10, 40)[2:7]
    big = torch.zeros(5, 30)
    cpu_rows.rows_matmul(x_nK, torch.randn(12, 40), big[:, 4:16])
    assert torch.equal(big[:, :4], torch.zeros(5, 4)) and torch.equal(big[:, 16:], torch.zeros(5, 14))


@needs_kernel
@pytest.mark.parametrize("bad,message", [
    (lambda x, w, o: (x.double(), w, o), "float32"),
    (lambda x, w, o: (x.t(), w, o), "contiguous rows"),
    (lambda x, w, o: (x, w[:, :-1], o), "do not fit"),
    (lambda x, w, o: (x, w, o[:, :-1]), "do not fit"),
    (lambda x, w, o: (x, w.t().contiguous().t(), o), "contiguous rows"),
    (lambda x, w, o: (x[0], w, o), "dimensions"),
])
def test_rows_matmul_rejects_bad_input(bad, message):
    x, w, o = bad(torch.randn(4, 16), torch.randn(16, 16), torch.empty(4, 16))
    with pytest.raises(ValueError, match=message):
        cpu_rows.rows_matmul(x, w, o)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["silu", "gelu", "clamped"])
@pytest.mark.parametrize("bias,interleaved", [(False, False), (True, True)])
def test_torch_path_without_the_kernel(monkeypatch, activation, bias, interleaved):
    # Where the kernel cannot be built (no compiler, no AVX2, bf16) every slot runs on BLAS GEMMs: same answers.
    monkeypatch.setattr(cpu_rows, "available", lambda: False)
    x, pt, ps, pw, w = make_case(33, 40, 24, 8, 2, bias, interleaved=interleaved)
    got = grouped_experts_torch(x, pt, ps, pw, w, activation)
    torch.testing.assert_close(got, reference_experts(x, pt, ps, pw, w, activation), atol=1e-4, rtol=1e-4)


def test_rows_kernel_leaves_small_segments_unpadded():
    assert grouped_module.padded_rows(3, rows_kernel=True) == 3
    assert grouped_module.padded_rows(12, rows_kernel=True) == 12
    assert grouped_module.padded_rows(13, rows_kernel=True) == 16


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 31, 64])
@pytest.mark.parametrize("m,k", [(40, 33), (4096, 64), (17, 8), (16, 1)])
def test_panels_matmul_matches_torch(rows, m, k):
    g = torch.Generator().manual_seed(rows * 7 + m + k)
    w_SMK, x_nK = torch.randn(2, m, k, generator=g), torch.randn(rows, k, generator=g)
    panels = cpu_rows.pack_panels(w_SMK)
    assert panels.shape == (2, -(-m // 16), k, 16)
    assert torch.equal(cpu_rows.unpack_panels(panels[1], m), w_SMK[1])
    out_nM = torch.full((rows, m), float("nan"))
    cpu_rows.panels_matmul(x_nK, panels[1], m, out_nM)
    torch.testing.assert_close(out_nM, x_nK @ w_SMK[1].t(), atol=1e-4, rtol=1e-4)


@needs_kernel
def test_panels_matmul_rejects_panels_of_another_matrix():
    panels = cpu_rows.pack_panels(torch.randn(1, 40, 16))[0]
    with pytest.raises(ValueError, match="do not fit"):
        cpu_rows.panels_matmul(torch.randn(3, 16), panels, 64, torch.empty(3, 64))


@needs_kernel
@pytest.mark.parametrize("tokens,hidden,inter,slots,top_k", [(1, 96, 200, 1, 1), (33, 40, 24, 64, 4),
                                                             (120, 33, 20, 8, 2), (300, 16, 12, 8, 8)])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["silu", "gelu", "clamped"])
@pytest.mark.parametrize("bias,interleaved", [(False, False), (True, True)])
def test_packed_experts_match_reference(tokens, hidden, inter, slots, top_k, activation, bias, interleaved):
    x, pt, ps, pw, w = make_case(tokens, hidden, inter, slots, top_k, bias, interleaved=interleaved)
    packed = PackedExpertWeights.pack(w)
    assert packed.num_slots == w.num_slots and packed.nbytes >= w.nbytes
    got = grouped_experts_torch(x, pt, ps, pw, packed, activation)
    torch.testing.assert_close(got, reference_experts(x, pt, ps, pw, w, activation), atol=1e-4, rtol=1e-4)
    unpacked = packed.unpacked()
    assert torch.equal(unpacked.w_gate_up_S2IH, w.w_gate_up_S2IH) and torch.equal(unpacked.w_down_SHI, w.w_down_SHI)


def test_only_float32_cpu_experts_pack():
    _, _, _, _, w = make_case(3, 16, 8, 2, 1, bias=False)
    w16 = ExpertWeights(w_gate_up_S2IH=w.w_gate_up_S2IH.bfloat16(), w_down_SHI=w.w_down_SHI.bfloat16())
    with pytest.raises(ValueError, match="float32 CPU"):
        PackedExpertWeights.pack(w16)


@pytest.mark.parametrize("bias", [False, True])
def test_packed_bytes_per_expert_is_what_packing_holds(bias):
    _, _, _, _, w = make_case(3, 40, 24, 5, 1, bias)
    assert PackedExpertWeights.pack(w).nbytes == 5 * PackedExpertWeights.bytes_per_expert(40, 24, bias, 4)
    _, _, _, _, w = make_case(3, 32, 16, 2, 1, bias)  # multiples of 16: no padding, the same bytes as unpacked
    assert PackedExpertWeights.pack(w).nbytes == w.nbytes
