"""Expert compute kernels, imported as ``moeray.kernels``.

``grouped_experts`` is the one place that picks an implementation: the Triton kernels for CUDA tensors (for the
activations they implement; plain, FP8 or MXFP4 experts alike), the torch grouped path everywhere else (the
CPU panel layout, ``PackedExpertWeights``, included). ``reference_experts`` is the naive loop that tests hold
both to. On a CPU the router's dense linears run on the same panel kernel (``panel_linear``).
"""

if __name__ != "moeray.kernels":
    # NOTE: with a checkout's root on sys.path (Ray adds the driver's working directory to its workers'), this
    # folder is also importable as top-level `kernels`: the name of an unrelated PyPI package that transformers
    # probes for by importing it. Under that name this module stays inert and versionless, so transformers
    # treats the package as absent instead of importing moeray half-way through its own import.
    __all__: list[str] = []
else:
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
