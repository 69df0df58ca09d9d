"""Where each weight of a checkpoint lies, and reading just the ones a router or a worker needs.

Checkpoints keep routed experts in different layouts: Mixtral, Qwen, DeepSeek and OLMoE store one tensor per expert
and projection (``experts.{e}.w1`` / ``gate_proj``, ...); GPT-OSS stores fused ``[E, H, 2I]`` gate_up with
interleaved gate/up rows and biases; transformers 5 itself may store fused ``[E, 2I, H]``. ``WeightIndex`` maps
every checkpoint tensor to the model's own parameter name (with transformers' renaming rules, e.g. Mixtral's
``block_sparse_moe`` -> ``mlp``) and sorts it into dense or expert tensors. ``read_expert`` returns one expert in the
canonical layout of ``moeray.kernels`` without touching the other experts' bytes (safetensors slices).

Shape legend: E experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from safetensors import safe_open
from transformers.core_model_loading import WeightRenaming

from moeray.model.architecture import MoELayerSpec, ModelSpec
from moeray.model.checkpoint import Checkpoint, CheckpointError, TensorLocation

# Per-expert projection names seen in the wild, in (gate, up, down) roles.
_SPLIT_NAMES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
_FUSED_ROLES = {"gate_up": "gate_up_proj", "down": "down_proj",
                "gate_up_bias": "gate_up_proj_bias", "down_bias": "down_proj_bias"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertSource:
    """Where one MoE layer's experts lie: either fused tensors by role, or per-(expert, role) tensors."""

    fused: dict[str, TensorLocation]
    split: dict[tuple[int, str], TensorLocation]


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightIndex:
    dense: dict[str, TensorLocation]  # model parameter name -> location
    experts: tuple[ExpertSource, ...]  # one per MoE layer


def _renamings(model: torch.nn.Module) -> list[WeightRenaming]:
    from transformers.conversion_mapping import get_model_conversion_mapping

    return [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]


def build_index(checkpoint: Checkpoint, meta_model: torch.nn.Module, spec: ModelSpec) -> WeightIndex:
    renamings = _renamings(meta_model)
    by_model_name: dict[str, TensorLocation] = {}
    for key, loc in checkpoint.tensors.items():
        name = key
        for renaming in renamings:
            name, _ = renaming.rename_source_key(name)
        by_model_name[name] = loc

    sources = []
    consumed: set[str] = set()
    for layer in spec.moe_layers:
        prefix = layer.module_path + "."
        fused = {role: by_model_name[prefix + attr] for role, attr in _FUSED_ROLES.items()
                 if prefix + attr in by_model_name}
        split: dict[tuple[int, str], TensorLocation] = {}
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.(\w+)\.(weight|bias)$")
        for name, loc in by_model_name.items():
            m = pattern.match(name)
            if not m:
                continue
            role = next((r for r, names in _SPLIT_NAMES.items() if m.group(2) in names), None)
            if role is None:
                raise CheckpointError(f"unrecognised expert tensor {loc.key!r} in {loc.file}")
            split[(int(m.group(1)), role if m.group(3) == "weight" else role + "_bias")] = loc
            consumed.add(name)
        consumed.update(prefix + _FUSED_ROLES[r] for r in fused)
        source = ExpertSource(fused=fused, split=split)
        _check_complete(layer, source)
        sources.append(source)

    dense = {name: loc for name, loc in by_model_name.items() if name not in consumed}
    return WeightIndex(dense=dense, experts=tuple(sources))


def _check_complete(layer: MoELayerSpec, source: ExpertSource) -> None:
    where = f"MoE layer {layer.index} ({layer.module_path})"
    if source.fused and source.split:
        raise CheckpointError(f"{where} has both fused and per-expert tensors")
    needed = ["gate_up", "down"] + (["gate_up_bias", "down_bias"] if layer.has_bias else [])
    if source.fused:
        missing = [r for r in needed if r not in source.fused]
        if missing:
            raise CheckpointError(f"{where} lacks fused tensors {missing}")
        if source.fused["gate_up"].shape[0] != layer.num_experts:
            raise CheckpointError(f"{where}: fused gate_up has {source.fused['gate_up'].shape[0]} experts, "
                                  f"the config says {layer.num_experts}")
        return
    for e in range(layer.num_experts):
        for role in ("gate", "up", "down") + (("gate_bias", "up_bias", "down_bias") if layer.has_bias else ()):
            if (e, role) not in source.split:
                raise CheckpointError(f"{where} lacks the {role} tensor of expert {e}")


class TensorReader:
    """Reads tensors or slices of them, keeping one open handle per safetensors file."""

    def __init__(self) -> None:
        self._handles: dict[str, object] = {}

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def read(self, loc: TensorLocation, index: int | None = None) -> torch.Tensor:
        handle = self._handle(loc.file)
        if index is None:
            return handle.get_tensor(loc.key)
        return handle.get_slice(loc.key)[index]

    def close(self) -> None:
        self._handles.clear()


def _deinterleave(rows_2I: torch.Tensor) -> torch.Tensor:
    """[g0, u0, g1, u1, ...] -> [g0, g1, ..., u0, u1, ...] along dim 0."""
    return torch.cat([rows_2I[0::2], rows_2I[1::2]], dim=0)


def read_expert(
    reader: TensorReader, layer: MoELayerSpec, source: ExpertSource, expert: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """One expert in the canonical layout: gate_up [2I, H] (gate rows first), down [H, I], optional biases."""
    if not 0 <= expert < layer.num_experts:
        raise ValueError(f"expert {expert} is out of range [0, {layer.num_experts}) in MoE layer {layer.index}")
    if source.fused:
        gate_up = reader.read(source.fused["gate_up"], expert)
        down = reader.read(source.fused["down"], expert)
        if layer.is_transposed:  # [H, 2I] and [I, H] on disk
            gate_up, down = gate_up.t(), down.t()
        out = {"gate_up": gate_up, "down": down}
        if layer.has_bias:
            out["gate_up_bias"] = reader.read(source.fused["gate_up_bias"], expert)
            out["down_bias"] = reader.read(source.fused["down_bias"], expert)
        if not layer.is_concatenated:
            out["gate_up"] = _deinterleave(out["gate_up"])
            if layer.has_bias:
                out["gate_up_bias"] = _deinterleave(out["gate_up_bias"])
    else:
        split = source.split
        out = {
            "gate_up": torch.cat([reader.read(split[(expert, "gate")]), reader.read(split[(expert, "up")])]),
            "down": reader.read(split[(expert, "down")]),
        }
        if layer.has_bias:
            out["gate_up_bias"] = torch.cat([reader.read(split[(expert, "gate_bias")]),
                                             reader.read(split[(expert, "up_bias")])])
            out["down_bias"] = reader.read(split[(expert, "down_bias")])
    h, i = layer.hidden_size, layer.intermediate_size
    if tuple(out["gate_up"].shape) != (2 * i, h) or tuple(out["down"].shape) != (h, i):
        raise CheckpointError(
            f"expert {expert} of MoE layer {layer.index} has gate_up {tuple(out['gate_up'].shape)} and down "
            f"{tuple(out['down'].shape)}; the config says {(2 * i, h)} and {(h, i)}"
        )
    return {k: v.to(dtype).contiguous() for k, v in out.items()}
