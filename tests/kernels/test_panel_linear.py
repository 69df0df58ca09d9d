"""The router's dense linears through the CPU panel kernel: equal to torch's linear (kernels/panel_linear.py)."""

import copy

import pytest
import torch

from moeray.kernels import cpu_rows, panel_linear

pytestmark = pytest.mark.skipif(not cpu_rows.available(), reason="the CPU rows kernel is not built here")


@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_linear_equals_torchs(bias):
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(72, 37, bias=bias), torch.nn.GELU(), torch.nn.Linear(37, 72))
    model = copy.deepcopy(reference)
    xs = [torch.randn(1, 72), torch.randn(3, 5, 72)]
    expected = [reference(x) for x in xs]
    assert panel_linear.use_panels(model, skip=("2",)) == 1  # "2": a module path left on torch
    assert "panels_PK16" in dict(model[0].named_buffers()) and "panels_PK16" not in dict(model[2].named_buffers())
    for x, want in zip(xs, expected):
        got = model(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a transposed (column-strided) input, and no rows at all
    x = torch.randn(72, 4).T
    torch.testing.assert_close(model[0](x), reference[0](x), rtol=1e-5, atol=1e-5)
    assert model[0](torch.randn(0, 72)).shape == (0, 37)


def test_only_cpu_float32_and_not_when_switched_off(monkeypatch):
    assert panel_linear.enabled("cpu", torch.float32)
    assert not panel_linear.enabled("cpu", torch.bfloat16)
    assert not panel_linear.enabled("cuda", torch.float32)
    monkeypatch.setenv(panel_linear.ENV, "0")
    assert not panel_linear.enabled("cpu", torch.float32)
    half = torch.nn.Linear(8, 8).to(torch.bfloat16)
    assert panel_linear.use_panels(half) == 0
