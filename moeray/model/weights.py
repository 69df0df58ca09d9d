"""Where each weight of a checkpoint lies, and reading just the ones a router or a worker needs.

Checkpoints keep routed experts in different layouts: Mixtral, Qwen, DeepSeek and OLMoE store one tensor per expert
and projection (``experts.{e}.w1`` / ``gate_proj``, ...); GPT-OSS stores fused ``[E, H, 2I]`` gate_up with
interleaved gate/up rows and biases; transformers 5 itself may store fused ``[E, 2I, H]``. ``WeightIndex`` maps
every checkpoint tensor to the model's own parameter name (with transformers' renaming rules, e.g. Mixtral's
``block_sparse_moe`` -> ``mlp``) and sorts it into dense or expert tensors. ``read_expert`` returns one expert in the
canonical layout of ``moeray.kernels`` without touching the other experts' bytes (safetensors slices).

Quantized experts (fine-grained FP8: ``weight`` + ``weight_scale_inv`` per expert, or transformers' fused
``gate_up_proj`` + ``gate_up_proj_scale_inv``; gpt-oss MXFP4: fused ``*_blocks`` + ``*_scales``) are read as stored,
with their scales beside them (``moeray.kernels.quantized``); every scale grid is checked against its weight at load.

Shape legend: E experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from safetensors import safe_open

from moeray.kernels.quantized import FP8, MXFP4, ExpertQuant
from moeray.model.architecture import MoELayerSpec, ModelSpec
from moeray.model.checkpoint import Checkpoint, CheckpointError, TensorLocation
from moeray.model.quant import FP8_DTYPES, SUPPORTED, CheckpointQuant, check_scale, quant_of, scale_to_float

# Per-expert projection names seen in the wild, in (gate, up, down) roles.
_SPLIT_NAMES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
# Fused tensors by role: transformers' own names, its FP8Experts' scales, gpt-oss's MXFP4 blocks and scales.
_FUSED_ROLES = {"gate_up": ("gate_up_proj", "gate_up_proj_blocks"), "down": ("down_proj", "down_proj_blocks"),
                "gate_up_scale": ("gate_up_proj_scale_inv", "gate_up_proj_scales"),
                "down_scale": ("down_proj_scale_inv", "down_proj_scales"),
                "gate_up_bias": ("gate_up_proj_bias",), "down_bias": ("down_proj_bias",)}
_SUFFIX_ROLE = {"weight": "", "bias": "_bias", "weight_scale_inv": "_scale"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertSource:
    """Where one MoE layer's experts lie: either fused tensors by role, or per-(expert, role) tensors; and how
    they are quantized (None: plain weights, read in the compute dtype)."""

    fused: dict[str, TensorLocation]
    split: dict[tuple[int, str], TensorLocation]
    quant: ExpertQuant | None = None  # as workers hold them
    stored: ExpertQuant | None = None  # as the checkpoint stores them (differs only in BN, see quant.py)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightIndex:
    dense: dict[str, TensorLocation]  # model parameter name -> location
    experts: tuple[ExpertSource, ...]  # one per MoE layer
    quant: CheckpointQuant = CheckpointQuant()


def _renamings(model: torch.nn.Module) -> list:
    """transformers' WeightRenaming rules for ``model`` (imported here: expert workers read weights without it)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    return [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]


def build_index(checkpoint: Checkpoint, meta_model: torch.nn.Module, spec: ModelSpec) -> WeightIndex:
    checkpoint_quant = quant_of(checkpoint.config)
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
        fused = {role: by_model_name[prefix + attr] for role, attrs in _FUSED_ROLES.items() for attr in attrs
                 if prefix + attr in by_model_name}
        split: dict[tuple[int, str], TensorLocation] = {}
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.(\w+)\.(weight|bias|weight_scale_inv)$")
        for name, loc in by_model_name.items():
            m = pattern.match(name)
            if not m:
                continue
            role = next((r for r, names in _SPLIT_NAMES.items() if m.group(2) in names), None)
            if role is None:
                raise CheckpointError(f"unrecognised expert tensor {loc.key!r} in {loc.file}")
            split[(int(m.group(1)), role + _SUFFIX_ROLE[m.group(3)])] = loc
            consumed.add(name)
        consumed.update(prefix + attr for attrs in _FUSED_ROLES.values() for attr in attrs)
        source = ExpertSource(fused=fused, split=split)
        stored = _stored_quant(layer, source, checkpoint_quant)
        source = dataclasses.replace(source, stored=stored, quant=stored and checkpoint_quant.expert_quant(
            layer.intermediate_size, stored_split=not source.fused))
        _check_complete(layer, source)
        sources.append(source)

    dense = {name: loc for name, loc in by_model_name.items() if name not in consumed}
    _check_dense_scales(dense, checkpoint_quant)
    return WeightIndex(dense=dense, experts=tuple(sources), quant=checkpoint_quant)


def _stored_quant(layer: MoELayerSpec, source: ExpertSource, checkpoint_quant: CheckpointQuant) -> ExpertQuant | None:
    """How this layer's experts are stored (None: unquantized), judged by their tensors against config.json."""
    where = f"MoE layer {layer.index} ({layer.module_path})"
    weights = [source.fused[r] for r in ("gate_up", "down") if r in source.fused] + \
              [loc for (_, role), loc in source.split.items() if role in _SPLIT_NAMES]
    fp8 = any(loc.dtype in FP8_DTYPES for loc in weights)
    mxfp4 = any(loc.key.endswith("_blocks") for loc in weights)
    if not (fp8 or mxfp4):
        scales = [loc.key for role, loc in source.fused.items() if role.endswith("_scale")] + \
                 [loc.key for (_, role), loc in source.split.items() if role.endswith("_scale")]
        if scales:
            raise CheckpointError(f"{where}: {scales[0]!r} is a scale of weights that are not quantized")
        return None
    method = MXFP4 if mxfp4 else FP8
    if checkpoint_quant.method != method:
        raise CheckpointError(f"{where} stores {method} experts, but config.json declares "
                              f"{checkpoint_quant.method or 'no quantization'}; moeray serves {', '.join(SUPPORTED)}")
    if mxfp4 and not source.fused:
        raise CheckpointError(f"{where}: mxfp4 experts must be gpt-oss's fused *_blocks/*_scales tensors")
    if fp8 and (layer.is_transposed or not layer.is_concatenated):
        raise CheckpointError(f"{where}: FP8 experts with transposed or interleaved gate/up are not supported; "
                              f"fp8 experts are served stored per expert or fused [E, 2I, H]")
    return checkpoint_quant.expert_quant(layer.intermediate_size, stored_split=False)


def _check_complete(layer: MoELayerSpec, source: ExpertSource) -> None:
    where = f"MoE layer {layer.index} ({layer.module_path})"
    if source.fused and source.split:
        raise CheckpointError(f"{where} has both fused and per-expert tensors")
    scales = ["gate_up_scale", "down_scale"] if source.quant else []
    needed = ["gate_up", "down"] + scales + (["gate_up_bias", "down_bias"] if layer.has_bias else [])
    if source.fused:
        missing = [r for r in needed if r not in source.fused]
        if missing and all(r.endswith("_scale") for r in missing):
            raise CheckpointError(f"{where}: quantized {source.fused['gate_up'].key!r} lacks its scale tensors "
                                  f"{missing}")
        if missing:
            raise CheckpointError(f"{where} lacks fused tensors {missing}")
        if source.fused["gate_up"].shape[0] != layer.num_experts:
            raise CheckpointError(f"{where}: fused gate_up has {source.fused['gate_up'].shape[0]} experts, "
                                  f"the config says {layer.num_experts}")
        if source.quant:
            h, i, e = layer.hidden_size, layer.intermediate_size, layer.num_experts
            for role, (m, k) in (("gate_up", (2 * i, h)), ("down", (h, i))):
                weight, scale = source.fused[role], source.fused[role + "_scale"]
                shape = (e, m, k // 32, 16) if source.quant.format == MXFP4 else (e, m, k)
                if tuple(weight.shape) != shape:
                    raise CheckpointError(f"{weight.key!r} has shape {tuple(weight.shape)}; {source.quant.format} "
                                          f"experts of this config need {shape}")
                check_scale(weight.key, weight.shape, scale.shape, source.quant)
        return
    roles = ("gate", "up", "down") + (("gate_bias", "up_bias", "down_bias") if layer.has_bias else ())
    for e in range(layer.num_experts):
        for role in roles + (tuple(r + "_scale" for r in ("gate", "up", "down")) if source.quant else ()):
            if (e, role) not in source.split:
                raise CheckpointError(f"{where} lacks the {role} tensor of expert {e}" + (
                    f" ({source.split[(e, role[:-6])].key!r} is quantized and needs its weight_scale_inv)"
                    if role.endswith("_scale") and (e, role[:-6]) in source.split else ""))
        if source.quant:
            for role in ("gate", "up", "down"):
                weight = source.split[(e, role)]
                check_scale(weight.key, weight.shape, source.split[(e, role + "_scale")].shape, source.stored)


def _check_dense_scales(dense: dict[str, TensorLocation], checkpoint_quant: CheckpointQuant) -> None:
    """Every FP8 dense weight has its scales, and declared so in config.json (checked from headers, at load)."""
    for name, loc in dense.items():
        if loc.dtype not in FP8_DTYPES:
            continue
        if checkpoint_quant.method != FP8:
            raise CheckpointError(f"{loc.key!r} is stored as FP8 but config.json declares "
                                  f"{checkpoint_quant.method or 'no quantization'}")
        scale = dense.get(name.removesuffix("weight") + "weight_scale_inv")
        if scale is None:
            raise CheckpointError(f"FP8 tensor {loc.key!r} has no weight_scale_inv beside it")
        check_scale(loc.key, loc.shape, scale.shape, ExpertQuant(format=FP8, block=checkpoint_quant.block))


class TensorReader:
    """Reads tensors or slices of them, keeping one open handle per safetensors file."""

    def __init__(self) -> None:
        self._handles: dict[str, object] = {}

    def _handle(self, file: str, hub=None):
        if file not in self._handles:
            # A hub checkpoint's shard is downloaded here, on first use: so each process fetches only what it reads.
            self._handles[file] = safe_open(file if hub is None else hub.fetch(), framework="pt")
        return self._handles[file]

    def read(self, loc: TensorLocation, index: int | None = None) -> torch.Tensor:
        handle = self._handle(loc.file, loc.hub)
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
    """One expert in the canonical layout: gate_up [2I, H] (gate rows first), down [H, I], optional biases, all in
    ``dtype``. Quantized experts keep their stored weights (fp8 [M, K], mxfp4 packed [M, K/2]) and add
    ``gate_up_scale`` / ``down_scale`` (``moeray.kernels.quantized``); their biases are in ``dtype``."""
    if not 0 <= expert < layer.num_experts:
        raise ValueError(f"expert {expert} is out of range [0, {layer.num_experts}) in MoE layer {layer.index}")
    quant, roles = source.quant, ("gate_up", "down", "gate_up_scale", "down_scale")
    if source.fused:
        out = {role: reader.read(source.fused[role], expert) for role in roles if role in source.fused}
        if quant is None and layer.is_transposed:  # [H, 2I] and [I, H] on disk; quantized ones are out-first
            out["gate_up"], out["down"] = out["gate_up"].t(), out["down"].t()
        if quant is not None and quant.format == MXFP4:  # [M, K/32, 16] blocks -> [M, K/2] bytes
            out["gate_up"], out["down"] = out["gate_up"].flatten(1), out["down"].flatten(1)
        if layer.has_bias:
            out["gate_up_bias"] = reader.read(source.fused["gate_up_bias"], expert)
            out["down_bias"] = reader.read(source.fused["down_bias"], expert)
        if not layer.is_concatenated:  # NOTE: quantized interleaved rows have one scale row each (BN = 1)
            for role in ("gate_up", "gate_up_bias", "gate_up_scale"):
                if role in out:
                    out[role] = _deinterleave(out[role])
    else:
        split = source.split
        out = {"gate_up": torch.cat([reader.read(split[(expert, "gate")]), reader.read(split[(expert, "up")])]),
               "down": reader.read(split[(expert, "down")])}
        if quant is not None:
            stored_bn = source.stored.block[0]
            rows = lambda s, m: s if quant.block[0] == stored_bn else s.repeat_interleave(stored_bn, 0)[:m]
            i = layer.intermediate_size
            out["gate_up_scale"] = torch.cat([rows(reader.read(split[(expert, "gate_scale")]), i),
                                              rows(reader.read(split[(expert, "up_scale")]), i)])
            out["down_scale"] = rows(reader.read(split[(expert, "down_scale")]), layer.hidden_size)
        if layer.has_bias:
            out["gate_up_bias"] = torch.cat([reader.read(split[(expert, "gate_bias")]),
                                             reader.read(split[(expert, "up_bias")])])
            out["down_bias"] = reader.read(split[(expert, "down_bias")])
    h, i = layer.hidden_size, layer.intermediate_size
    expected = ((2 * i, h), (h, i)) if quant is None else (quant.weight_shape(2 * i, h), quant.weight_shape(h, i))
    if (tuple(out["gate_up"].shape), tuple(out["down"].shape)) != expected:
        raise CheckpointError(
            f"expert {expert} of MoE layer {layer.index} has gate_up {tuple(out['gate_up'].shape)} and down "
            f"{tuple(out['down'].shape)}; the config says {expected[0]} and {expected[1]}"
        )
    if quant is not None and quant.format == FP8:
        for role, (m, k) in (("gate_up", (2 * i, h)), ("down", (h, i))):
            check_scale(f"expert {expert} {role} of MoE layer {layer.index}", (m, k), out[role + "_scale"].shape,
                        quant)
    return {k: _resident_dtype(k, v, quant, dtype).contiguous() for k, v in out.items()}


def _resident_dtype(role: str, t: torch.Tensor, quant: ExpertQuant | None, dtype: torch.dtype) -> torch.Tensor:
    if quant is None or role.endswith("_bias"):
        return t.to(dtype)
    if role.endswith("_scale"):
        return scale_to_float(t) if quant.format == FP8 else t
    return t
