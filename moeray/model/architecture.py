"""What moeray needs to know about an MoE architecture, read off transformers' own modules.

transformers 5.x gives every MoE model one seam: an ``*Experts`` module decorated with
``@use_experts_implementation`` and called as ``experts(hidden[T,H], top_k_index[T,K], top_k_weights[T,K])``.
We build the model on the meta device (no memory), find those modules, and record per MoE layer its shapes and
weight layout. The router's gate code stays the model's own, so routing is exactly what its authors wrote.
"""

from __future__ import annotations

import dataclasses
import functools

from typing import TYPE_CHECKING

import torch

from moeray.kernels.api import CLAMPED_SWIGLU, GLU, ExpertQuant, GatedActivation
from moeray.model.checkpoint import CheckpointError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# NOTE: transformers is imported where a model is built or described, not here: expert workers import this module
# for ModelSpec alone, and transformers costs them a second of their start.

EXPERTS_IMPLEMENTATION = "moeray"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoELayerSpec:
    """One MoE layer. ``index`` is its ordinal among MoE layers (the ``l`` of plans and load)."""

    index: int
    decoder_layer: int
    module_path: str  # e.g. "model.layers.1.mlp.experts"
    num_experts: int
    hidden_size: int
    intermediate_size: int
    has_bias: bool
    is_transposed: bool  # the model stores gate_up as [E, H, 2I] rather than [E, 2I, H]
    is_concatenated: bool  # [gate; up] halves, rather than interleaved rows (GPT-OSS)
    quant: ExpertQuant | None = None  # how workers hold this layer's experts (None: plain, in the compute dtype)

    @property
    def params_per_expert(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        return 3 * h * i + (2 * i + h if self.has_bias else 0)

    def bytes_per_expert(self, itemsize: int) -> int:
        """Resident bytes of one expert: its weights (quantized ones with their scales) and biases, the biases
        and plain weights at ``itemsize`` bytes (the compute dtype)."""
        h, i = self.hidden_size, self.intermediate_size
        if self.quant is None:
            return self.params_per_expert * itemsize
        biases = (2 * i + h) * itemsize if self.has_bias else 0
        return self.quant.bytes_of(2 * i, h) + self.quant.bytes_of(h, i) + biases


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    model_type: str
    architecture: str
    num_hidden_layers: int
    vocab_size: int
    max_positions: int
    top_k: int
    activation: GatedActivation
    moe_layers: tuple[MoELayerSpec, ...]
    dense_params: int  # everything a router holds: embeddings, attention, norms, gates, shared experts, lm_head
    kv_elements_per_token: int = 0  # what the KV cache holds per token, all layers (MLA: the compressed latent)

    def kv_bytes_per_token(self, itemsize: int) -> int:
        return self.kv_elements_per_token * itemsize

    @property
    def num_experts(self) -> int:
        return self.moe_layers[0].num_experts

    def expert_bytes(self, itemsize: int) -> int:
        """Resident bytes of every expert of every MoE layer (see ``MoELayerSpec.bytes_per_expert``)."""
        return sum(spec.num_experts * spec.bytes_per_expert(itemsize) for spec in self.moe_layers)

    @property
    def expert_params(self) -> int:
        return sum(spec.num_experts * spec.params_per_expert for spec in self.moe_layers)

    @property
    def total_params(self) -> int:
        return self.dense_params + self.expert_params

    @property
    def active_params(self) -> int:
        """Parameters one token touches: the dense parts plus top_k experts per MoE layer."""
        return self.dense_params + sum(self.top_k * spec.params_per_expert for spec in self.moe_layers)


def _moeray_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    # NOTE: the backbone attaches `_moeray_dispatch` to every experts module it builds; see backbone.py.
    return self._moeray_dispatch(self._moeray_layer, hidden_states, top_k_index, top_k_weights)


@functools.cache
def register_experts_implementation() -> None:
    from transformers.integrations import moe as hf_moe

    hf_moe.ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, _moeray_experts_forward)


def is_experts_module(module: torch.nn.Module) -> bool:
    # `use_experts_implementation` sets these in the wrapped __init__; nothing else in transformers has them all.
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "is_concatenated", "_is_expert_parallel"))


def build_meta_model(config: PretrainedConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The full model on the meta device, with its experts routed through moeray's implementation."""
    from transformers import AutoModelForCausalLM

    register_experts_implementation()
    config._experts_implementation = EXPERTS_IMPLEMENTATION
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        raise CheckpointError(f"architecture {config.model_type!r} is not a causal LM transformers can build: {e}")


def _activation_of(module: torch.nn.Module, config: PretrainedConfig) -> GatedActivation:
    from transformers.integrations import moe as hf_moe

    apply_gate = type(module)._apply_gate
    if apply_gate is hf_moe._default_apply_gate:
        return GatedActivation(kind=GLU, act=config.hidden_act)
    if config.model_type == "gpt_oss":
        return GatedActivation(kind=CLAMPED_SWIGLU, alpha=float(module.alpha), limit=float(module.limit))
    raise CheckpointError(f"{type(module).__name__} has a custom gated activation moeray does not implement yet")


@dataclasses.dataclass(frozen=True)
class LayerKV:
    """What one attention layer caches per token: ``key`` and ``value`` as (heads, size). For MLA, the compressed
    latent and the shared rotary key."""

    key: tuple[int, int]
    value: tuple[int, int]

    @property
    def elements(self) -> int:
        return self.key[0] * self.key[1] + self.value[0] * self.value[1]


def kv_layout_of(model: torch.nn.Module) -> list[LayerKV]:
    """Per attention layer (in layer order), what its cache holds per token."""
    attention = {}
    for module in model.modules():
        if not hasattr(module, "layer_idx") or not type(module).__name__.endswith("Attention"):
            continue
        if hasattr(module, "kv_a_proj_with_mqa"):  # MLA: transformers caches the latent and the rotary key
            attention[module.layer_idx] = LayerKV((1, module.kv_lora_rank), (1, module.qk_rope_head_dim))
        elif hasattr(module, "k_proj") and hasattr(module, "head_dim"):
            heads = module.k_proj.out_features // module.head_dim
            attention[module.layer_idx] = LayerKV((heads, module.head_dim), (heads, module.head_dim))
        else:
            raise CheckpointError(f"{type(module).__name__}: moeray's KV cache does not know what it caches")
    if sorted(attention) != list(range(len(attention))) or not attention:
        raise CheckpointError(f"attention layers {sorted(attention)} are not numbered 0..n-1")
    return [attention[i] for i in range(len(attention))]


def describe(model: torch.nn.Module, config: PretrainedConfig) -> ModelSpec:
    """Find the experts modules of a (meta) model and describe the architecture."""
    layers = []
    activation = None
    for path, module in model.named_modules():
        if not is_experts_module(module):
            continue
        if not module.has_gate or getattr(module, "has_post_expert_norm", False):
            raise CheckpointError(f"{type(module).__name__} (ungated or post-normed experts) is not supported yet")
        parts = path.split(".")
        decoder_layer = next((int(p) for p in parts if p.isdigit()), len(layers))
        w = module.gate_up_proj  # [E, 2I, H], or [E, H, 2I] when transposed
        num_experts, hidden = w.shape[0], (w.shape[1] if module.is_transposed else w.shape[2])
        intermediate = (w.shape[2] if module.is_transposed else w.shape[1]) // 2
        layers.append(MoELayerSpec(
            index=len(layers), decoder_layer=decoder_layer, module_path=path, num_experts=num_experts,
            hidden_size=hidden, intermediate_size=intermediate, has_bias=bool(module.has_bias),
            is_transposed=bool(module.is_transposed), is_concatenated=bool(module.is_concatenated),
        ))
        activation = activation or _activation_of(module, config)
    if not layers:
        raise CheckpointError(f"{config.model_type!r} has no routed experts: it is not a Mixture-of-Experts model")
    expert_paths = tuple(spec.module_path + "." for spec in layers)
    dense = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(expert_paths))
    text = config.get_text_config()
    return ModelSpec(
        model_type=config.model_type,
        architecture=type(model).__name__,
        num_hidden_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        max_positions=text.max_position_embeddings,
        top_k=text.num_experts_per_tok,
        activation=activation,
        moe_layers=tuple(layers),
        dense_params=dense,
        kv_elements_per_token=sum(layer.elements for layer in kv_layout_of(model)),
    )
