"""Quantized experts as workers hold them: the checkpoint's stored bytes plus their scales, never expanded.

Shape legend: S local slots, H hidden, I expert intermediate, M a projection's output rows, K its input columns.

Two formats, one rule: element ``w[m, k]`` of a projection is ``value(q[m, k]) * scale[m // BN, k // BK]``.

- ``fp8`` (fine-grained FP8, DeepSeek-V3 / Qwen3-FP8): ``q`` is float8_e4m3fn ``[M, K]``; ``scale`` is the
  checkpoint's ``weight_scale_inv`` in float32, one per ``(BN, BK)`` block, ``[ceil(M/BN), ceil(K/BK)]`` (the last
  block of a row or column may be partial). UE8M0 scales are powers of two, so float32 holds them exactly.
- ``mxfp4`` (OCP microscaling, gpt-oss): ``q`` packs two e2m1 values per byte, low nibble first, ``[M, K/2]``
  uint8; ``scale`` is an e8m0 exponent byte (``2 ** (byte - 127)``) per 32 columns, ``[M, K/32]``; BN = 1, BK = 32.

A slot's gate_up is ``[2I, K=H]`` (all gate rows, then all up rows, as in ``ExpertWeights``) and its down
``[H, K=I]``. When a checkpoint stores gate and up apart and I is not a multiple of BN, their block rows cannot be
stacked; the loader then repeats each scale row per weight row (BN = 1), which keeps the rule above.
"""

from __future__ import annotations

import dataclasses

import torch

FP8 = "fp8"
MXFP4 = "mxfp4"
FORMATS = (FP8, MXFP4)
MXFP4_BLOCK = 32

# e2m1: sign bit 3, two exponent bits, one mantissa bit (the OCP MX spec's table; transformers' FP4_VALUES).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertQuant:
    """How one MoE layer's experts are quantized where they are resident."""

    format: str
    block: tuple[int, int]  # (BN, BK): output rows and input columns one scale covers

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"expert quantization format {self.format!r} is not one of {FORMATS}")
        bn, bk = self.block
        if bn < 1 or bk < 1:
            raise ValueError(f"quantization block {self.block} must be positive")
        if self.format == MXFP4 and self.block != (1, MXFP4_BLOCK):
            raise ValueError(f"mxfp4 scales cover (1, {MXFP4_BLOCK}); got block {self.block}")

    def weight_shape(self, m: int, k: int) -> tuple[int, int]:
        return (m, k // 2) if self.format == MXFP4 else (m, k)

    def scale_shape(self, m: int, k: int) -> tuple[int, int]:
        bn, bk = self.block
        return _cdiv(m, bn), _cdiv(k, bk)

    def bytes_of(self, m: int, k: int) -> int:
        """Resident bytes of one [m, k] projection: the quantized weight plus its scales."""
        wm, wk = self.weight_shape(m, k)
        sm, sk = self.scale_shape(m, k)
        return wm * wk + sm * sk * (1 if self.format == MXFP4 else 4)


def dequantize(q_MK: torch.Tensor, scale: torch.Tensor, quant: ExpertQuant, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """One projection ``[M, K]`` in ``dtype`` (or written into ``out``); see the module docstring for the rule."""
    if quant.format == MXFP4:
        m, k = q_MK.shape[0], q_MK.shape[1] * 2
        lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=q_MK.device)
        bytes_ = q_MK.to(torch.int32)  # NOTE: uint8 has no bitwise ops on every backend; int32 does
        values_MK = torch.stack([lut[bytes_ & 0xF], lut[bytes_ >> 4]], dim=-1).view(m, k // MXFP4_BLOCK,
                                                                                     MXFP4_BLOCK)
        exponent = scale.to(torch.int32) - 127
        w = torch.ldexp(values_MK, exponent.unsqueeze(-1)).view(m, k)
    else:
        m, k = q_MK.shape
        bn, bk = quant.block
        w = q_MK.to(torch.float32)
        scale_MK = scale.to(torch.float32).repeat_interleave(bn, 0)[:m].repeat_interleave(bk, 1)[:, :k]
        w = w.mul_(scale_MK)
    if out is None:
        return w.to(dtype)
    return out.copy_(w)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedExpertWeights:
    """S resident slots of one MoE layer, quantized (the counterpart of ``ExpertWeights``). ``compute_dtype`` is
    the dtype of activations, biases and results."""

    quant: ExpertQuant
    q_gate_up: torch.Tensor  # fp8 [S, 2I, H] | mxfp4 [S, 2I, H/2] uint8
    s_gate_up: torch.Tensor  # [S, ceil(2I/BN), ceil(H/BK)] float32 | uint8
    q_down: torch.Tensor  # fp8 [S, H, I] | mxfp4 [S, H, I/2] uint8
    s_down: torch.Tensor  # [S, ceil(H/BN), ceil(I/BK)]
    hidden: int
    intermediate: int
    compute_dtype: torch.dtype
    b_gate_up_S2I: torch.Tensor | None = None
    b_down_SH: torch.Tensor | None = None
    interleaved: bool = False

    def __post_init__(self) -> None:
        s, h, i, quant = self.q_gate_up.shape[0], self.hidden, self.intermediate, self.quant
        expected = {
            "q_gate_up": (s, *quant.weight_shape(2 * i, h)), "s_gate_up": (s, *quant.scale_shape(2 * i, h)),
            "q_down": (s, *quant.weight_shape(h, i)), "s_down": (s, *quant.scale_shape(h, i)),
        }
        for name, shape in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; {quant.format} with block {quant.block} "
                                 f"for hidden {h}, intermediate {i} needs {shape}")
            if t.device != self.q_gate_up.device or not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous on {self.q_gate_up.device}")
        if (self.b_gate_up_S2I is None) != (self.b_down_SH is None):
            raise ValueError("expert biases must be given for both projections or for neither")

    @property
    def num_slots(self) -> int:
        return self.q_gate_up.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.q_gate_up.device

    @property
    def nbytes(self) -> int:
        tensors = (self.q_gate_up, self.s_gate_up, self.q_down, self.s_down, self.b_gate_up_S2I, self.b_down_SH)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def dequantize_slot(self, slot: int, gate_up_out: torch.Tensor | None = None,
                        down_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's (gate_up [2I, H], down [H, I]) in ``compute_dtype``, into the given buffers if any."""
        return (dequantize(self.q_gate_up[slot], self.s_gate_up[slot], self.quant, self.compute_dtype, gate_up_out),
                dequantize(self.q_down[slot], self.s_down[slot], self.quant, self.compute_dtype, down_out))

    def dequantized(self):
        """Every slot expanded into ``ExpertWeights`` (tests and references only: it is the memory we avoid)."""
        from moeray.kernels.grouped import ExpertWeights

        slots = [self.dequantize_slot(s) for s in range(self.num_slots)]
        return ExpertWeights(w_gate_up_S2IH=torch.stack([g for g, _ in slots]).contiguous(),
                             w_down_SHI=torch.stack([d for _, d in slots]).contiguous(),
                             b_gate_up_S2I=self.b_gate_up_S2I, b_down_SH=self.b_down_SH, interleaved=self.interleaved)


def quantize_fp8(w_MK: torch.Tensor, block: tuple[int, int],
                 ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 as DeepSeek's and transformers' quantizers write it (partial edge blocks included):
    ``(q float8_e4m3fn [M, K], weight_scale_inv float32 [ceil(M/BN), ceil(K/BK)])``, q * scale ~= w. ``ue8m0``:
    each scale rounded up to a power of two and returned as float8_e8m0fnu."""
    m, k = w_MK.shape
    bn, bk = block
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    padded = torch.zeros(_cdiv(m, bn) * bn, _cdiv(k, bk) * bk, dtype=torch.float32)
    padded[:m, :k] = w_MK.float()
    tiles = padded.view(_cdiv(m, bn), bn, _cdiv(k, bk), bk)
    amax = tiles.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / fp8_max, torch.ones_like(amax))
    if ue8m0:
        scale_inv = torch.exp2(torch.ceil(torch.log2(scale_inv)))
    q = (tiles / scale_inv[:, None, :, None]).clamp(-fp8_max, fp8_max).view_as(padded)[:m, :k]
    scale_inv = scale_inv.to(torch.float8_e8m0fnu) if ue8m0 else scale_inv
    return q.to(torch.float8_e4m3fn).contiguous(), scale_inv.contiguous()


def quantize_mxfp4(w_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 as the OCP spec and gpt-oss lay it out: ``(packed uint8 [M, K/2], e8m0 exponents uint8 [M, K/32])``.
    Each 32-column group shares the power of two that brings its largest magnitude within e2m1's range (<= 6);
    values round to the nearest e2m1 value."""
    m, k = w_MK.shape
    if k % MXFP4_BLOCK:
        raise ValueError(f"mxfp4 needs K to be a multiple of {MXFP4_BLOCK}; got {k}")
    groups = w_MK.float().reshape(m, k // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = groups.abs().amax(dim=-1).clamp(min=2.0 ** -126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    lut = torch.tensor(E2M1_VALUES[:8])
    magnitude = (scaled.abs().unsqueeze(-1) - lut).abs().argmin(dim=-1)
    codes = (magnitude | ((scaled < 0).to(torch.int64) << 3)).view(m, k)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return packed.contiguous(), (exponent + 127).to(torch.uint8).contiguous()


def quantize_experts(weights, quant: ExpertQuant, compute_dtype: torch.dtype | None = None) -> QuantizedExpertWeights:
    """Every slot of ``weights`` (``ExpertWeights``, on the CPU) quantized with ``quantize_fp8`` / ``quantize_mxfp4``;
    biases in ``compute_dtype`` (default: the weights' dtype). For tests, benchmarks and ``make gpu-check``."""
    def stacked(w_SMK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [quantize_fp8(m, quant.block) if quant.format == FP8 else quantize_mxfp4(m) for m in w_SMK]
        return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])

    dtype = compute_dtype or weights.dtype
    (q_gu, s_gu), (q_down, s_down) = stacked(weights.w_gate_up_S2IH), stacked(weights.w_down_SHI)
    bias = lambda b: None if b is None else b.to(dtype)
    return QuantizedExpertWeights(quant=quant, q_gate_up=q_gu, s_gate_up=s_gu, q_down=q_down, s_down=s_down,
                                  hidden=weights.hidden, intermediate=weights.w_down_SHI.shape[2],
                                  compute_dtype=dtype, b_gate_up_S2I=bias(weights.b_gate_up_S2I),
                                  b_down_SH=bias(weights.b_down_SH), interleaved=weights.interleaved)
