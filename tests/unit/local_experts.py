"""An in-process stand-in for the expert workers, for tests of the backbone and scheduler without Ray."""

import torch

from moeray.kernels.api import ExpertWeights, grouped_experts
from moeray.model.backbone import inspect_checkpoint
from moeray.model.weights import TensorReader, read_expert


class LocalExperts:
    """Holds every expert of a checkpoint and computes a layer like one worker owning all slots."""

    def __init__(self, path: str):
        info = inspect_checkpoint(path)
        self.activation = info.spec.activation
        reader = TensorReader()
        self.layers = []
        for spec, source in zip(info.spec.moe_layers, info.index.experts):
            experts = [read_expert(reader, spec, source, e, torch.float32) for e in range(spec.num_experts)]
            stack = lambda k: torch.stack([x[k] for x in experts]) if spec.has_bias or "bias" not in k else None
            self.layers.append(ExpertWeights(w_gate_up_S2IH=stack("gate_up"), w_down_SHI=stack("down"),
                                             b_gate_up_S2I=stack("gate_up_bias"), b_down_SH=stack("down_bias")))
        self.tokens_seen = 0

    def __call__(self, layer, x_TH, top_k_index_TK, top_k_weights_TK):
        num_tokens, top_k = top_k_index_TK.shape
        pair_token = torch.arange(num_tokens).repeat_interleave(top_k)
        pair_slot, pair_weight = top_k_index_TK.reshape(-1), top_k_weights_TK.reshape(-1)
        self.tokens_seen += pair_token.numel()
        return grouped_experts(x_TH, pair_token, pair_slot, pair_weight.float(), self.layers[layer], self.activation)
