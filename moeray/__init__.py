"""moeray: elastic expert-parallel inference for Mixture-of-Experts models on Ray.

One MoE layer of one step:

    request ─▶ router actor ────────────────────────────────────────────────────────────▶ tokens
                │ [Backbone]  transformers model, routed experts swapped out       (moeray.model)
                │ [Gate]      the model's own router code: top-k ids and weights
                │ [Dispatch]  (token, expert) pairs ─▶ a replica each ─▶ one call per worker  (moeray.router,
                │             sent through the object store or a compiled graph: moeray.transport)
                ├──▶ expert worker A ─┐ [Experts]  grouped GEMM over its slots    (moeray.experts, moeray.kernels)
                ├──▶ expert worker B ─┤
                │ [Combine]   weighted scatter-add back to token order
                │ [Load]      tokens per (layer, expert) ─▶ placement controller  (moeray.placement)

The placement controller is the only writer of the plan: it rebalances, scales and restores expert workers by
switching every worker and router to a new plan epoch in two phases, while requests keep flowing.

Entry points: ``moeray.Engine`` (Python API) and the ``moeray`` CLI. ``EngineConfig(backend="local")`` runs the same
router and workers as plain objects in this process, without Ray (``moeray.LocalEngine``).
"""

from moeray.request import GenerationResult, InvalidRequest, SamplingParams, StreamChunk

__all__ = ["Engine", "EngineConfig", "GenerationResult", "InvalidRequest", "LocalEngine", "SamplingParams",
           "StreamChunk"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # NOTE: the engine (and with it Ray) is imported on first use, so that moeray.kernels and moeray.model import
    # on a machine without Ray (``make gpu-check``). moeray.engine itself imports Ray only if it is installed, so
    # Engine(EngineConfig(backend="local")) and LocalEngine run without it.
    if name == "Engine":
        from moeray.engine import Engine

        return Engine
    if name == "EngineConfig":
        from moeray.config import EngineConfig

        return EngineConfig
    if name == "LocalEngine":
        from moeray.local_engine import LocalEngine

        return LocalEngine
    raise AttributeError(f"module 'moeray' has no attribute {name!r}")
