"""The object-store transport: one ``worker.forward.remote(...)`` per touched worker per MoE layer.

Tensors travel as numpy arrays (on every path): Ray pickles those zero-copy and fast, torch tensors not. numpy has
no bfloat16, so 16-bit floats travel as their raw int16 bits with the dtype name beside them.
"""

from __future__ import annotations

import warnings

import numpy as np
import ray
import torch

from moeray.transport.base import Sent, WireTensor, WorkerCall

# Arrays from the object store are read-only, zero-copy views; nothing here writes to the tensors made from them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

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
