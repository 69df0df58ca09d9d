"""The torch grouped path against transformers' own eager experts, on every architecture's real weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeray.kernels.api import ExpertWeights, grouped_experts_torch
from moeray.model.backbone import inspect_checkpoint
from moeray.model.tiny import ARCHITECTURES
from moeray.model.weights import TensorReader, read_expert


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_matches_transformers_eager(arch, tokens, checkpoints):
    info = inspect_checkpoint(checkpoints[arch])
    model = AutoModelForCausalLM.from_pretrained(checkpoints[arch], dtype=torch.float32)
    model.set_experts_implementation("eager")
    modules = dict(model.named_modules())
    reader = TensorReader()
    g = torch.Generator().manual_seed(tokens)
    for layer, source in zip(info.spec.moe_layers, info.index.experts):
        experts = [read_expert(reader, layer, source, e, torch.float32) for e in range(layer.num_experts)]
        stack = lambda key: torch.stack([e[key] for e in experts]) if key in experts[0] else None
        weights = ExpertWeights(w_gate_up_S2IH=stack("gate_up"), w_down_SHI=stack("down"),
                                b_gate_up_S2I=stack("gate_up_bias"), b_down_SH=stack("down_bias"))
        x_TH = torch.randn(tokens, layer.hidden_size, generator=g)
        scores = torch.rand(tokens, layer.num_experts, generator=g)
        top_w, top_i = torch.topk(scores, info.spec.top_k, dim=-1)
        with torch.no_grad():
            want = modules[layer.module_path](x_TH, top_i, top_w)
        got = grouped_experts_torch(x_TH, torch.arange(tokens).repeat_interleave(info.spec.top_k),
                                    top_i.reshape(-1), top_w.reshape(-1), weights, info.spec.activation)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
