"""Which quantized checkpoint formats moeray serves, read off ``config.json``'s ``quantization_config``.

Served exactly (outputs equal transformers' own CPU load of the same directory, which dequantizes):
- ``fp8``: fine-grained FP8 as DeepSeek-V3/R1, Kimi-K2 and the Qwen3-*-FP8 releases ship it: float8_e4m3fn
  weights with one ``weight_scale_inv`` per ``weight_block_size`` block (fp32, or UE8M0 powers of two);
- ``mxfp4``: gpt-oss's experts, ``*_blocks`` (e2m1 nibbles) and ``*_scales`` (e8m0 exponents).
Everything else (awq, gptq, bitsandbytes, compressed-tensors, ...) is refused at load: serving its packed weights
as if they were plain ones would give silent garbage. Routed experts stay quantized on their workers
(``moeray.kernels.quantized``); the router dequantizes its dense weights to the compute dtype.
"""

from __future__ import annotations

import dataclasses

import torch

from moeray.kernels.quantized import FP8, MXFP4, MXFP4_BLOCK, ExpertQuant, dequantize
from moeray.model.checkpoint import CheckpointError

SUPPORTED = ("fp8 (fine-grained, block-scaled)", "mxfp4 (gpt-oss)", "unquantized bf16/fp16/fp32")
# safetensors dtype codes of FP8 weights
FP8_DTYPES = ("F8_E4M3",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointQuant:
    """A checkpoint's quantization: ``method`` None (plain weights), "fp8" or "mxfp4"."""

    method: str | None = None
    block: tuple[int, int] | None = None  # the (rows, columns) one scale covers: fp8's weight_block_size, mxfp4 1x32

    @property
    def label(self) -> str:
        if self.method == FP8:
            return f"fp8 e4m3, {self.block[0]}x{self.block[1]} blocks"
        return "mxfp4 (e2m1, 1x32 e8m0 blocks)" if self.method == MXFP4 else "unquantized"

    def expert_quant(self, intermediate: int, stored_split: bool) -> ExpertQuant | None:
        """How a layer's experts are held resident. Gate and up stored apart stack into one [2I, H] only when I
        is a multiple of the block's rows; otherwise each scale row is repeated per weight row (BN = 1)."""
        if self.method == MXFP4:
            return ExpertQuant(format=MXFP4, block=(1, MXFP4_BLOCK))
        if self.method == FP8:
            bn, bk = self.block
            return ExpertQuant(format=FP8, block=(1 if stored_split and intermediate % bn else bn, bk))
        return None


def quant_of(config) -> CheckpointQuant:
    """Parse ``config.quantization_config``; refuse what cannot be served exactly."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return CheckpointQuant()
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method == "fp8":
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise CheckpointError(f"fp8 checkpoint with activation_scheme {qc.get('activation_scheme')!r}: moeray "
                                  f"serves fine-grained FP8 with dynamic activations only")
        block = qc.get("weight_block_size")
        if block is None or len(block) != 2 or min(int(b) for b in block) < 1:
            raise CheckpointError(f"fp8 checkpoint: weight_block_size {block!r} is not two positive integers "
                                  f"(moeray serves block-scaled FP8; per-tensor FP8 is not supported)")
        if qc.get("expert_dtype", "fp8") != "fp8":
            raise CheckpointError(f"fp8 checkpoint with expert_dtype {qc.get('expert_dtype')!r} is not supported; "
                                  f"moeray serves {', '.join(SUPPORTED)}")
        return CheckpointQuant(method=FP8, block=(int(block[0]), int(block[1])))
    if method == "mxfp4":
        return CheckpointQuant(method=MXFP4, block=(1, MXFP4_BLOCK))
    raise CheckpointError(f"quantization method {method!r} is not supported; moeray serves {', '.join(SUPPORTED)}")


def check_scale(name: str, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], quant: ExpertQuant) -> None:
    """A scale grid must match its weight exactly; a wrong one would scale the wrong blocks."""
    if quant.format == MXFP4:  # blocks [..., M, K/32, 16], scales [..., M, K/32]
        expected = tuple(weight_shape[:-1])
    else:
        *lead, m, k = weight_shape
        expected = (*lead, *quant.scale_shape(m, k))
    if tuple(scale_shape) != expected:
        raise CheckpointError(f"scale tensor of {name!r} has shape {tuple(scale_shape)}; weight {tuple(weight_shape)} "
                              f"with {quant.block[0]}x{quant.block[1]} blocks needs {expected}")


def dequantize_dense(name: str, q: torch.Tensor, scale: torch.Tensor | None, checkpoint_quant: CheckpointQuant,
                     dtype: torch.dtype) -> torch.Tensor:
    """A router's dense FP8 weight in the compute dtype (``scale`` None: it is stored unquantized)."""
    if q.dtype != torch.float8_e4m3fn:
        if scale is not None:
            raise CheckpointError(f"{name!r} has a weight_scale_inv but is stored as {q.dtype}, not FP8")
        return q.to(dtype)
    if checkpoint_quant.method != FP8:
        raise CheckpointError(f"{name!r} is stored as FP8 but config.json declares "
                              f"{checkpoint_quant.method or 'no quantization'}")
    if scale is None:
        raise CheckpointError(f"FP8 tensor {name!r} has no weight_scale_inv beside it")
    quant = ExpertQuant(format=FP8, block=checkpoint_quant.block)
    check_scale(name, tuple(q.shape), tuple(scale.shape), quant)
    return dequantize(q, scale_to_float(scale), quant, dtype)


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """FP8 block scales as float32: UE8M0 (float8_e8m0fnu, or raw bytes) are exact powers of two."""
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.to(torch.float32) - 127.0)
    return scale.to(torch.float32)


def reference_load_kwargs(path: str) -> dict:
    """What ``AutoModelForCausalLM.from_pretrained`` needs beside ``path`` to run a checkpoint as moeray's reference:
    transformers' own dequantization for MXFP4. NOTE: with Hugging Face's ``kernels`` installed (transformers 5.25
    requires it) transformers otherwise fetches gpt-oss's Triton kernels from the hub, which an offline machine
    cannot, and its own MXFP4 compute is not the dequantized reference moeray is held to."""
    from transformers import AutoConfig, Mxfp4Config

    if quant_of(AutoConfig.from_pretrained(path, local_files_only=True)).method == MXFP4:
        return {"quantization_config": Mxfp4Config(dequantize=True)}
    return {}
