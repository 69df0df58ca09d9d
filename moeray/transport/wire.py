"""The wire format every transport path shares: how a layer's token batch reaches a worker and its output comes back.

    router ── WorkerCall(epoch, layer, x_TH, pair_token_N, pair_slot_N, pair_weight_N) ──▶ ExpertWorker.forward
    router ◀── WireTensor y_TH: its experts' weighted outputs, one row per token sent ───────────────┘

Tensors travel as numpy arrays (object store and compiled graph alike): Ray pickles those zero-copy and fast, torch
tensors not. numpy has no bfloat16 or float8, so those travel as their raw bits (int16, uint8) with the dtype name
beside them. The same packing carries an expert's weights (and scales) from one worker to a peer.

Shape legend: T tokens sent to one worker, H hidden, N (token, slot) pairs of that worker.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch

# Arrays from the object store are read-only, zero-copy views; nothing here writes to the tensors made from them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# dtypes numpy lacks travel as raw bits of the same width, with their name beside them
_RAW = {"bfloat16": (torch.bfloat16, torch.int16), "float16": (torch.float16, torch.int16),
        "float8_e4m3fn": (torch.float8_e4m3fn, torch.uint8), "float8_e8m0fnu": (torch.float8_e8m0fnu, torch.uint8)}


class WireTensor(NamedTuple):
    array: np.ndarray  # the values, or their raw bits for a dtype numpy lacks
    dtype: str  # the torch dtype's name ("bfloat16", "float32", ...)


def pack(t: torch.Tensor) -> WireTensor:
    t = t.detach().contiguous().cpu()
    name = str(t.dtype).removeprefix("torch.")
    if name in _RAW:
        return WireTensor(t.view(_RAW[name][1]).numpy(), name)
    return WireTensor(t.numpy(), name)


def unpack(wire: WireTensor, device: torch.device | str = "cpu") -> torch.Tensor:
    array, name = wire
    t = torch.from_numpy(np.asarray(array))
    if name in _RAW:
        t = t.view(_RAW[name][0])
    return t.to(device, non_blocking=True)


class WorkerCall(NamedTuple):
    """One worker's share of one MoE layer: the arguments of ``ExpertWorker.forward``, in order.

    NOTE: the epoch travels in it, so a plan switch never rebuilds a transport (a compiled graph keeps its nodes).
    """

    epoch: int  # the plan epoch whose slots the pairs name
    layer: int  # the MoE layer's index among the model's MoE layers
    x_TH: WireTensor  # only the tokens routed to this worker, in increasing token order
    pair_token_N: np.ndarray  # int32: each pair's row of x_TH
    pair_slot_N: np.ndarray  # int32: each pair's local slot on this worker
    pair_weight_N: np.ndarray  # float32: each pair's routing weight

    @classmethod
    def of(cls, epoch: int, layer: int, x_TH: torch.Tensor, pair_token_N: torch.Tensor, pair_slot_N: torch.Tensor,
           pair_weight_N: torch.Tensor) -> WorkerCall:
        return cls(epoch, layer, pack(x_TH), pair_token_N.to(torch.int32).numpy(),
                   pair_slot_N.to(torch.int32).numpy(), pair_weight_N.to(torch.float32).numpy())


def pairs_on(device: torch.device, pair_token_N: np.ndarray, pair_slot_N: np.ndarray,
             pair_weight_N: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A call's pair arrays as the tensors grouped expert compute takes: token and slot indices as int64."""
    return (torch.from_numpy(pair_token_N).to(device, torch.long), torch.from_numpy(pair_slot_N).to(device, torch.long),
            torch.from_numpy(pair_weight_N).to(device))
