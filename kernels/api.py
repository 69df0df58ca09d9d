"""The public face of ``moeray.kernels`` (the top-level ``kernels/`` folder): its types and ``grouped_experts``.

``grouped_experts`` is the one place that picks an implementation: the Triton kernels for CUDA tensors (for the
activations they implement; plain, FP8 or MXFP4 experts alike), the torch grouped path everywhere else (the
CPU panel layout, ``PackedExpertWeights``, included). ``reference_experts`` is the naive loop that tests hold
both to. On a CPU the router's dense linears run on the same panel kernel (``panel_linear``).

NOTE: ``kernels/`` has no ``__init__.py`` on purpose. A checkout's root lands on ``sys.path`` (Ray adds the driver's
working directory to its workers', ``python -m`` adds the current one), and a regular package there named
``kernels`` would shadow Hugging Face's ``kernels``, which transformers imports at start-up. As a namespace portion
it never wins over an installed package; ``moeray/kernels`` links here, so the only name it answers to is
``moeray.kernels``.
"""

import torch

from moeray.kernels.activation import CLAMPED_SWIGLU, GLU, GatedActivation
from moeray.kernels.grouped import ExpertWeights, PackedExpertWeights, grouped_experts_torch, reference_experts
from moeray.kernels.quantized import ExpertQuant, QuantizedExpertWeights


def triton_supports(activation: GatedActivation) -> bool:
    return activation.kind == CLAMPED_SWIGLU or activation.act == "silu"


def grouped_experts(
    x_TH: torch.Tensor,
    pair_token_N: torch.Tensor,
    pair_slot_N: torch.Tensor,
    pair_weight_N: torch.Tensor,
    weights: ExpertWeights | PackedExpertWeights | QuantizedExpertWeights,
    activation: GatedActivation,
) -> torch.Tensor:
    """y_TH = sum over a token's pairs of pair_weight * expert_slot(x_TH[token]); see grouped.py."""
    if x_TH.is_cuda and triton_supports(activation) and not isinstance(weights, PackedExpertWeights):
        from moeray.kernels.triton_grouped import grouped_experts_triton

        return grouped_experts_triton(x_TH, pair_token_N, pair_slot_N, pair_weight_N, weights, activation)
    return grouped_experts_torch(x_TH, pair_token_N, pair_slot_N, pair_weight_N, weights, activation)


__all__ = [
    "CLAMPED_SWIGLU",
    "GLU",
    "ExpertQuant",
    "ExpertWeights",
    "GatedActivation",
    "PackedExpertWeights",
    "QuantizedExpertWeights",
    "grouped_experts",
    "grouped_experts_torch",
    "reference_experts",
    "triton_supports",
]
