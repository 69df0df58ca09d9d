"""Gated activations that sit between an expert's gate_up and down projections.

An activation takes the ``[N, 2I]`` gate_up output and returns ``[N, I]``. Its gate and up halves are either
concatenated (``[g0, g1, ..., u0, u1, ...]``, Mixtral, Qwen, DeepSeek, OLMoE) or interleaved
(``[g0, u0, g1, u1, ...]``, GPT-OSS's on-disk layout).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

GLU = "glu"
CLAMPED_SWIGLU = "clamped_swiglu"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedActivation:
    """How ``[gate; up]`` becomes the expert's hidden activation.

    - ``glu``: ``act(gate) * up`` with ``act`` a transformers activation name (Mixtral, Qwen, DeepSeek, OLMoE: silu).
    - ``clamped_swiglu``: GPT-OSS: ``gate.clamp(max=limit)``, ``up.clamp(-limit, limit)``,
      ``(up + 1) * gate * sigmoid(alpha * gate)``.
    """

    kind: str = GLU
    act: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.kind not in (GLU, CLAMPED_SWIGLU):
            raise ValueError(f"activation kind {self.kind!r} is not one of {GLU!r}, {CLAMPED_SWIGLU!r}")
        if self.kind == GLU and self.act not in _TORCH:
            from transformers.activations import ACT2FN

            if self.act not in ACT2FN:
                raise ValueError(f"activation {self.act!r} is not a transformers activation name")

    def __call__(self, gate_up_N2I: torch.Tensor, interleaved: bool = False, dim: int = -1) -> torch.Tensor:
        """``dim`` is the feature dimension: -1 for [N, 2I], 0 for the transposed [2I, N]."""
        if interleaved:
            gate_NI = gate_up_N2I[0::2] if dim == 0 else gate_up_N2I[..., 0::2]
            up_NI = gate_up_N2I[1::2] if dim == 0 else gate_up_N2I[..., 1::2]
        else:
            gate_NI, up_NI = gate_up_N2I.chunk(2, dim=dim)
        if self.kind == GLU:
            return _activation(self.act)(gate_NI) * up_NI
        gate_NI = gate_NI.clamp(max=self.limit)
        up_NI = up_NI.clamp(min=-self.limit, max=self.limit)
        return (up_NI + 1) * (gate_NI * torch.sigmoid(gate_NI * self.alpha))


# NOTE: transformers' own classes for these names (ACT2CLS; tests/kernels keep them equal), taken from torch so an
# expert worker does not import transformers.activations, a second of its start on 2 cores.
_TORCH = {"silu": torch.nn.SiLU, "swish": torch.nn.SiLU, "relu": torch.nn.ReLU}


@functools.cache
def _activation(name: str) -> torch.nn.Module:
    """transformers' activation module ``name``, made once: ``ACT2FN[name]`` builds a new module on every lookup,
    which cost 12 us per expert slot and layer (a third of a small worker call's time, measured)."""
    if name in _TORCH:
        return _TORCH[name]()
    from transformers.activations import ACT2FN

    return ACT2FN[name]
