"""The expert worker: one Ray actor per device, holding slots (layer, logical expert) and running them grouped.

Per step and MoE layer a router makes one call per worker it needs, carrying only the tokens routed to this
worker and, per (token, slot) pair, the local slot and routing weight; the worker returns the weighted sum of its
experts' outputs per token. Each worker reads only its own experts' tensors from the checkpoint.

Shape legend: T tokens sent to this worker, H hidden, N (token, slot) pairs, S local slots of one layer.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import ray
import torch

from moeray.kernels import ExpertWeights, grouped_experts
from moeray.model.architecture import ModelSpec
from moeray.model.weights import ExpertSource, TensorReader, read_expert
from moeray.transport.object_store import WireTensor, pack, unpack

log = logging.getLogger(__name__)


def _stack(experts: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor | None:
    return torch.stack([e[key] for e in experts]) if experts and key in experts[0] else None


class ExpertWorker:
    def __init__(
        self,
        *,
        worker_index: int,
        checkpoint_path: str,
        spec: ModelSpec,
        sources: tuple[ExpertSource, ...],
        experts_per_layer: list[list[int]],
        dtype: torch.dtype,
        num_threads: int = 1,
    ) -> None:
        torch.set_num_threads(num_threads)
        self.worker_index = worker_index
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.experts_per_layer = [list(e) for e in experts_per_layer]
        reader = TensorReader()
        total = sum(len(e) for e in experts_per_layer)
        started, done = time.monotonic(), 0
        self.layers: list[ExpertWeights | None] = []
        for layer, experts in zip(spec.moe_layers, experts_per_layer):
            loaded = []
            for expert in experts:
                loaded.append(read_expert(reader, layer, sources[layer.index], expert, dtype))
                done += 1
                if done % 256 == 0 or done == total:
                    log.info("worker %d: loaded %d/%d expert slots in %.1fs",
                             worker_index, done, total, time.monotonic() - started)
            self.layers.append(None if not loaded else ExpertWeights(
                w_gate_up_S2IH=_stack(loaded, "gate_up").to(self.device),
                w_down_SHI=_stack(loaded, "down").to(self.device),
                b_gate_up_S2I=None if not layer.has_bias else _stack(loaded, "gate_up_bias").to(self.device),
                b_down_SH=None if not layer.has_bias else _stack(loaded, "down_bias").to(self.device),
            ))
        reader.close()

    def forward(
        self, layer: int, x: WireTensor, pair_token_N: np.ndarray, pair_slot_N: np.ndarray, pair_weight_N: np.ndarray
    ) -> WireTensor:
        weights = self.layers[layer]
        if weights is None:
            raise ValueError(f"worker {self.worker_index} holds no experts of MoE layer {layer}")
        x_TH = unpack(x, self.device)
        y_TH = grouped_experts(
            x_TH,
            torch.from_numpy(pair_token_N).to(self.device, torch.long),
            torch.from_numpy(pair_slot_N).to(self.device, torch.long),
            torch.from_numpy(pair_weight_N).to(self.device),
            weights,
            self.spec.activation,
        )
        return pack(y_TH)

    def echo(self, payload):
        """Return the payload untouched: ``moeray bench layer`` measures the bare transport floor with it."""
        return payload[0]

    def resident_bytes(self) -> int:
        return sum(w.nbytes for w in self.layers if w is not None)

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {
            "worker": self.worker_index,
            "node_id": ctx.get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "pid": os.getpid(),
            "device": str(self.device),
            "experts_per_layer": self.experts_per_layer,
            "resident_bytes": self.resident_bytes(),
        }

    def ping(self) -> bool:
        return True
