"""The router's model: transformers' own modules with the routed experts swapped for remote dispatch.

The model is built on the meta device, then every module except the ``*Experts`` ones is given real storage and
its weights are read from the checkpoint (FP8 ones dequantized to the compute dtype). Expert parameters stay on meta, so a router never holds them; calling an
experts module runs ``dispatch(moe_layer, hidden[T,H], top_k_index[T,K], top_k_weights[T,K])`` instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import torch

from moeray.model.architecture import ModelSpec, build_meta_model, describe
from moeray.model.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from moeray.model.quant import dequantize_dense, quant_of
from moeray.model.weights import TensorReader, WeightIndex, build_index

log = logging.getLogger(__name__)

Dispatch = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadedCheckpoint:
    """A checkpoint with its architecture understood and its tensors indexed; no weights read yet."""

    checkpoint: Checkpoint
    spec: ModelSpec
    index: WeightIndex


def inspect_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedCheckpoint:
    """Validate a checkpoint directory and describe it, reading only headers (cheap; safe in the driver)."""
    checkpoint = open_checkpoint(path)
    quant_of(checkpoint.config)  # an unsupported quantization is refused before anything is built
    meta_model = build_meta_model(checkpoint.config, dtype)
    spec = describe(meta_model, checkpoint.config)
    index = build_index(checkpoint, meta_model, spec)
    return LoadedCheckpoint(checkpoint=checkpoint, spec=_with_quant(spec, index), index=index)


def _with_quant(spec: ModelSpec, index: WeightIndex) -> ModelSpec:
    """The spec with each MoE layer's expert quantization, which only the checkpoint's tensors tell."""
    layers = tuple(dataclasses.replace(layer, quant=source.quant) for layer, source in zip(spec.moe_layers,
                                                                                          index.experts))
    return dataclasses.replace(spec, moe_layers=layers)


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers that have real storage (meta tensors cost nothing)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def build_backbone(
    path: str | os.PathLike, dtype: torch.dtype, dispatch: Dispatch, device: str = "cpu"
) -> tuple[torch.nn.Module, LoadedCheckpoint]:
    checkpoint = open_checkpoint(path)
    quant_of(checkpoint.config)
    model = build_meta_model(checkpoint.config, dtype)
    spec = describe(model, checkpoint.config)
    index = build_index(checkpoint, model, spec)
    spec = _with_quant(spec, index)
    expert_paths = {layer.module_path: layer.index for layer in spec.moe_layers}

    # 1. Real (uninitialised) storage for every module but the experts, which keep their meta parameters.
    for name, module in model.named_modules():
        if name in expert_paths:
            module._moeray_layer = expert_paths[name]
            module._moeray_dispatch = dispatch
            module._is_hf_initialized = True  # keeps transformers' weight init away from the meta tensors
        elif not any(name.startswith(p + ".") for p in expert_paths):
            module._apply(lambda t: torch.empty_like(t, device=device), recurse=False)

    # 2. Dense weights from the checkpoint, by the model's own parameter names.
    reader = TensorReader()
    persistent = set(model.state_dict().keys())
    named = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers()) if n in persistent]
    dense = [(n, t) for n, t in named if t.device.type != "meta"]
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for done, (name, tensor) in enumerate(dense, 1):
        loc = index.dense.get(name)
        if loc is None:
            if name in tied:
                continue
            raise CheckpointError(f"checkpoint {checkpoint.path} has no tensor for {name!r}")
        scale = index.dense.get(name.removesuffix("weight") + "weight_scale_inv") if name.endswith("weight") else None
        value = dequantize_dense(loc.key, reader.read(loc), None if scale is None else reader.read(scale),
                                 index.quant, tensor.dtype)
        if tuple(value.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{loc.key!r} has shape {tuple(value.shape)}; the model expects {tuple(tensor.shape)}")
        with torch.no_grad():
            tensor.copy_(value.to(tensor.dtype))
        tensor._is_hf_initialized = True
        if done % 200 == 0 or done == len(dense):
            log.info("router: loaded %d/%d dense tensors of %s", done, len(dense), checkpoint.path)
    reader.close()

    # 3. Ties and non-persistent buffers (rotary frequencies) through transformers' own init, which skips
    #    every tensor flagged as loaded above.
    model.tie_weights()
    model.initialize_weights()
    model.eval().requires_grad_(False)

    # 4. On a CPU, the dense linears through the panel kernel, as the expert workers run theirs (decode's few rows
    #    are where torch's GEMM is slowest: moeray/kernels/panel_linear.py).
    from moeray.kernels import panel_linear

    if panel_linear.enabled(device, dtype):
        panel_linear.use_panels(model, skip=tuple(expert_paths))
    return model, LoadedCheckpoint(checkpoint=checkpoint, spec=spec, index=index)
