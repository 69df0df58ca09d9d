"""The torch grouped path against the naive per-pair loop, and its input checks."""

import dataclasses

import pytest
import torch

from cases import ACTIVATIONS, make_case as _case
from moeray.kernels.api import ExpertWeights, GatedActivation, grouped_experts_torch, reference_experts


@pytest.mark.parametrize("tokens,hidden,inter,slots,top_k", [(1, 96, 200, 1, 1), (7, 33, 20, 8, 2), (120, 33, 20, 8, 2), (33, 40, 24, 64, 4),
                                                             (300, 16, 12, 8, 8)])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["silu", "gelu", "clamped"])
@pytest.mark.parametrize("bias,interleaved", [(False, False), (True, False), (True, True)])
def test_grouped_matches_reference(tokens, hidden, inter, slots, top_k, activation, bias, interleaved):
    x, pt, ps, pw, w = _case(tokens, hidden, inter, slots, top_k, bias, interleaved=interleaved)
    got = grouped_experts_torch(x, pt, ps, pw, w, activation)
    want = reference_experts(x, pt, ps, pw, w, activation)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_all_tokens_on_one_expert_and_empty_experts():
    x, pt, ps, pw, w = _case(33, 40, 24, 8, 2, bias=True, skew=True)
    got = grouped_experts_torch(x, pt, ps, pw, w, GatedActivation())
    torch.testing.assert_close(got, reference_experts(x, pt, ps, pw, w, GatedActivation()), atol=1e-4, rtol=1e-4)


def test_no_pairs_gives_zeros():
    x, _, _, _, w = _case(5, 40, 24, 4, 1, bias=False)
    empty = torch.empty(0, dtype=torch.long)
    got = grouped_experts_torch(x, empty, empty, torch.empty(0), w, GatedActivation())
    assert torch.equal(got, torch.zeros_like(x))


def test_bfloat16_close_to_fp32_reference():
    x, pt, ps, pw, w = _case(33, 40, 24, 8, 2, bias=False)
    w16 = ExpertWeights(w_gate_up_S2IH=w.w_gate_up_S2IH.bfloat16(), w_down_SHI=w.w_down_SHI.bfloat16())
    got = grouped_experts_torch((x / 10).bfloat16(), pt, ps, pw, w16, GatedActivation())
    want = reference_experts(x / 10, pt, ps, pw, w, GatedActivation())
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)


@pytest.mark.parametrize("mutate,message", [
    (lambda c: {**c, "x": c["x"][:, :-1].contiguous()}, "hidden size"),
    (lambda c: {**c, "x": c["x"].t().contiguous().t()}, "x must be contiguous"),
    (lambda c: {**c, "ps": c["ps"].float()}, "pair_slot must hold integers"),
    (lambda c: {**c, "ps": c["ps"] + 100}, "slot id"),
    (lambda c: {**c, "pt": c["pt"] - 1}, "token index -1"),
    (lambda c: {**c, "pw": c["pw"][:-1]}, "pair_weight"),
    (lambda c: {**c, "x": c["x"].double()}, "dtype"),
])
def test_bad_input_is_rejected(mutate, message):
    x, pt, ps, pw, w = _case(7, 40, 24, 4, 2, bias=False)
    c = mutate({"x": x, "pt": pt, "ps": ps, "pw": pw})
    with pytest.raises(ValueError, match=message):
        grouped_experts_torch(c["x"], c["pt"], c["ps"], c["pw"], w, GatedActivation())


def test_weights_shapes_are_checked():
    with pytest.raises(ValueError, match="down weights"):
        ExpertWeights(w_gate_up_S2IH=torch.zeros(2, 8, 5), w_down_SHI=torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="activation kind"):
        GatedActivation(kind="relu2")


def test_padded_rows_keep_tiles_of_eight():
    from moeray.kernels.grouped import padded_rows

    assert [padded_rows(c) for c in (0, 1, 2, 3, 5, 7, 8, 9, 31, 32, 33)] == [0, 1, 2, 4, 5, 7, 8, 16, 32, 32, 40]


def test_workspace_reuse_across_shapes_and_dtypes():
    # The torch path reuses its gather buffers between calls: a big call, a small one, a bf16 one and a big one
    # again must each match the reference (stale rows from an earlier call must never leak into a later one).
    for tokens, dtype in [(120, torch.float32), (7, torch.float32), (33, torch.bfloat16), (120, torch.float32)]:
        x, pt, ps, pw, w = _case(tokens, 40, 24, 8, 2, bias=True)
        x = x / 10
        got = grouped_experts_torch(x.to(dtype), pt, ps, pw, _cast(w, dtype), GatedActivation())
        want = reference_experts(x, pt, ps, pw, w, GatedActivation())
        atol, rtol = (2e-2, 1e-2) if dtype == torch.bfloat16 else (1e-4, 1e-4)  # bf16: biases of ~1 round at 1e-2
        torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)


def _cast(w: ExpertWeights, dtype: torch.dtype) -> ExpertWeights:
    tensors = {f.name: getattr(w, f.name) for f in dataclasses.fields(w) if f.name != "interleaved"}
    return ExpertWeights(**{k: None if t is None else t.to(dtype) for k, t in tensors.items()},
                         interleaved=w.interleaved)


@pytest.mark.parametrize("name", ["silu", "swish", "relu"])
def test_the_activations_taken_from_torch_are_transformers_own(name):
    """The names an expert worker builds from torch (no transformers import) compute what ACT2FN's do."""
    from transformers.activations import ACT2FN

    from moeray.kernels.activation import _TORCH, _activation

    assert name in _TORCH
    x = torch.linspace(-6, 6, 97)
    torch.testing.assert_close(_activation(name)(x), ACT2FN[name](x), rtol=0, atol=0)


def test_an_expert_worker_imports_no_transformers():
    """transformers costs a worker a second of its start on 2 cores; the worker module and its weights code
    import it only where a model is built (the router, the driver)."""
    import subprocess
    import sys

    code = "import sys, moeray.experts.worker; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
