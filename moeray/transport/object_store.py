"""The object-store transport: one ``worker.forward.remote(...)`` per touched worker per MoE layer.

Tensors travel as numpy arrays (on every path): Ray pickles those zero-copy and fast, torch tensors not. numpy has
no bfloat16 or float8, so those travel as their raw bits (int16, uint8) with the dtype name beside them.
"""

from __future__ import annotations

import warnings

import numpy as np
import ray
import torch

from moeray.transport.base import Sent, WireTensor, WorkerCall

# Arrays from the object store are read-only, zero-copy views; nothing here writes to the tensors made from them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# dtypes numpy lacks travel as raw bits of the same width, with their name beside them
_RAW = {"bfloat16": (torch.bfloat16, torch.int16), "float16": (torch.float16, torch.int16),
        "float8_e4m3fn": (torch.float8_e4m3fn, torch.uint8), "float8_e8m0fnu": (torch.float8_e8m0fnu, torch.uint8)}


def pack(t: torch.Tensor) -> WireTensor:
    t = t.detach().contiguous().cpu()
    name = str(t.dtype).removeprefix("torch.")
    if name in _RAW:
        return t.view(_RAW[name][1]).numpy(), name
    return t.numpy(), name


def unpack(wire: WireTensor, device: torch.device | str = "cpu") -> torch.Tensor:
    array, name = wire
    t = torch.from_numpy(np.asarray(array))
    if name in _RAW:
        t = t.view(_RAW[name][0])
    return t.to(device, non_blocking=True)


class ObjectStoreTransport:
    """Calls go out together, results are gathered in worker order; a dead worker is reported, not raised."""

    def __init__(self, workers: list) -> None:
        self.workers = list(workers)

    def set_workers(self, workers: list) -> None:
        self.workers = list(workers)

    def send(self, calls: dict[int, WorkerCall]) -> Sent:
        refs = {w: self.workers[w].forward.remote(*call) for w, call in calls.items()}
        results, lost = {}, set()
        for w, ref in refs.items():
            try:
                results[w] = ray.get(ref)
            except ray.exceptions.RayActorError:
                lost.add(w)
        return Sent(results, frozenset(lost))

    def release_if_idle(self) -> bool:
        return False

    def close(self) -> None:
        pass
