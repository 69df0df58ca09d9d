"""Tensors on the object-store path travel as numpy arrays: Ray pickles those zero-copy and fast, torch tensors not.

numpy has no bfloat16, so 16-bit floats travel as their raw int16 bits with the dtype name beside them.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

# Arrays from the object store are read-only, zero-copy views; nothing here writes to the tensors made from them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

WireTensor = tuple[np.ndarray, str]

_RAW_16BIT = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def pack(t: torch.Tensor) -> WireTensor:
    t = t.detach().contiguous().cpu()
    name = str(t.dtype).removeprefix("torch.")
    if name in _RAW_16BIT:
        return t.view(torch.int16).numpy(), name
    return t.numpy(), name


def unpack(wire: WireTensor, device: torch.device | str = "cpu") -> torch.Tensor:
    array, name = wire
    t = torch.from_numpy(np.asarray(array))
    if name in _RAW_16BIT:
        t = t.view(_RAW_16BIT[name])
    return t.to(device, non_blocking=True)
