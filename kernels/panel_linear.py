"""The router's dense linears through the CPU panel kernel (kernels/rows_gemm.c), as expert workers run theirs.

torch's CPU GEMM is slow at the row counts of decode. On the 2-core development machine the medium checkpoint's LM
head ([32000, 1024] float32, 2 threads) takes 6.3 ms for 1 row and 14-15 ms for 2-8 rows on torch, against
2.7-4.7 ms through the panel kernel; 64 rows 27 against 18 ms, 256 rows 91 against 67 (BENCHMARKS.md). ``use_panels``
packs each plain ``nn.Linear`` of a CPU float32 model once and sends its forward through the kernel. The weight
stays where it is (transformers' code may read it, and an LM head may share it with the embedding), so the packed
copy costs the linears' bytes once more; ``MOERAY_DENSE_PANELS=0`` keeps them on torch instead.
"""

from __future__ import annotations

import os
import types

import torch

from moeray.kernels import cpu_rows

ENV = "MOERAY_DENSE_PANELS"


def enabled(device: str | torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on ``device`` in ``dtype`` runs its dense linears through the panel kernel here."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32 and os.environ.get(ENV, "1") != "0"
            and cpu_rows.available())


def use_panels(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Route every plain float32 CPU ``nn.Linear`` of ``model`` (but those under the module paths in ``skip``)
    through the panel kernel; returns how many."""
    count = 0
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or any(name == p or name.startswith(p + ".") for p in skip):
            continue
        weight_MK = module.weight
        if weight_MK.device.type != "cpu" or weight_MK.dtype != torch.float32:
            continue
        module.register_buffer("panels_PK16", cpu_rows.pack_panels(weight_MK.detach()[None])[0], persistent=False)
        module.forward = types.MethodType(_panel_forward, module)
        count += 1
    return count


def _panel_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return torch.nn.functional.linear(x, self.weight, self.bias)
    x_nK = x.reshape(-1, self.in_features)
    if x_nK.stride(-1) != 1:
        x_nK = x_nK.contiguous()
    out_nM = x_nK.new_empty(len(x_nK), self.out_features)
    if len(x_nK):
        cpu_rows.panels_matmul(x_nK, self.panels_PK16, self.out_features, out_nM)
    if self.bias is not None:
        out_nM += self.bias
    return out_nM.reshape(*x.shape[:-1], self.out_features)
