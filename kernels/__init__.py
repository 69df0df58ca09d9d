"""Expert compute kernels, imported as ``moeray.kernels``.

``grouped_experts`` is the one place that picks an implementation for a device: the torch grouped path on CPU
(and, until the Triton kernels land, everywhere).
"""

if __name__ != "moeray.kernels":
    # NOTE: with a checkout's root on sys.path (Ray adds the driver's working directory to its workers'), this
    # folder is also importable as top-level `kernels`: the name of an unrelated PyPI package that transformers
    # probes for by importing it. Under that name this module stays inert and versionless, so transformers
    # treats the package as absent instead of importing moeray half-way through its own import.
    __all__: list[str] = []
else:
    from moeray.kernels.activation import CLAMPED_SWIGLU, GLU, GatedActivation
    from moeray.kernels.grouped import ExpertWeights, grouped_experts_torch, reference_experts

    grouped_experts = grouped_experts_torch

    __all__ = [
        "CLAMPED_SWIGLU",
        "GLU",
        "ExpertWeights",
        "GatedActivation",
        "grouped_experts",
        "grouped_experts_torch",
        "reference_experts",
    ]
