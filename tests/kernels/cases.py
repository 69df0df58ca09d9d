"""Shared kernel test cases."""

import torch

from moeray.kernels.api import CLAMPED_SWIGLU, ExpertWeights, GatedActivation

ACTIVATIONS = [GatedActivation(), GatedActivation(act="gelu"), GatedActivation(kind=CLAMPED_SWIGLU, limit=0.5)]


def make_case(tokens, hidden, inter, slots, top_k, bias, seed=0, skew=False, interleaved=False):
    """Random experts and routing; `skew` puts every pair on slot 0 (the other slots get nothing)."""
    g = torch.Generator().manual_seed(seed)
    w = ExpertWeights(
        w_gate_up_S2IH=torch.randn(slots, 2 * inter, hidden, generator=g) / hidden**0.5,
        w_down_SHI=torch.randn(slots, hidden, inter, generator=g) / inter**0.5,
        b_gate_up_S2I=torch.randn(slots, 2 * inter, generator=g) if bias else None,
        b_down_SH=torch.randn(slots, hidden, generator=g) if bias else None,
        interleaved=interleaved,
    )
    x = torch.randn(tokens, hidden, generator=g)
    pair_token = torch.arange(tokens).repeat_interleave(top_k)
    if skew:
        pair_slot = torch.zeros(tokens * top_k, dtype=torch.long)
    else:
        pair_slot = torch.randint(0, slots, (tokens * top_k,), generator=g)
    pair_weight = torch.rand(tokens * top_k, generator=g)
    return x, pair_token, pair_slot, pair_weight, w
