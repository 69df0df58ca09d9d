"""The expert worker: one Ray actor per device, holding slots (layer, logical expert) and running them grouped.

Per step and MoE layer a router makes one call per worker it needs, carrying only the tokens routed to this
worker and, per (token, slot) pair, the local slot and routing weight; the worker returns the weighted sum of its
experts' outputs per token. Each worker reads only its own experts' tensors from the checkpoint.

Slots belong to a plan epoch. A plan switch is two-phase (the placement controller drives it): ``prepare`` makes
the new epoch's slots resident beside the current ones (reusing resident experts, fetching the others from a peer
worker that holds them or reading them from the checkpoint; quantized experts move as stored, with their scales),
routers switch epoch between steps, then ``commit``
drops every other epoch. A router call names its epoch, so a step in flight finishes on the slots it started with.

The in-process engine (``moeray.local_engine``) runs the same class as plain objects, so Ray is imported only where
an actor is started or called.

Shape legend: T tokens sent to this worker, H hidden, N (token, slot) pairs, S local slots of one layer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping

import numpy as np
import torch

from moeray import telemetry
from moeray.kernels import cpu_rows
from moeray.kernels.api import ExpertWeights, PackedExpertWeights, QuantizedExpertWeights, grouped_experts
from moeray.request import DEFAULT_MAX_FORWARD_TOKENS
from moeray.model.architecture import ModelSpec
from moeray.model.weights import ExpertSource, TensorReader, read_expert
from moeray.transport import frames
from moeray.transport.wire import WireTensor, pack, pairs_on, unpack

log = logging.getLogger(__name__)

ExpertTensors = dict[str, torch.Tensor]  # one expert in the canonical layout (see moeray.model.weights.read_expert)


class StaleEpoch(RuntimeError):
    """A call named a plan epoch this worker does not hold (never prepared, or already dropped)."""


def _export_from(peer, pairs: list[tuple[int, int]]) -> list[dict[str, WireTensor]]:
    """A peer's ``export_experts(pairs)``: a direct call to an in-process worker (``moeray.local_engine``), else a
    Ray actor call."""
    if isinstance(peer, ExpertWorker):
        return peer.export_experts(pairs)
    import ray

    return ray.get(peer.export_experts.remote(pairs))


def _ray_placement() -> tuple[str, list[str]]:
    """This process's Ray node id and GPU ids; ('local', []) for an in-process worker, where Ray may be absent."""
    ray = sys.modules.get("ray")  # NOTE: a process that never imported Ray is no Ray worker (nor needs to import it)
    if ray is None or not ray.is_initialized():
        return "local", []
    return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]


def _stack(experts: list[ExpertTensors], key: str) -> torch.Tensor | None:
    return torch.stack([e[key] for e in experts]) if experts and key in experts[0] else None


def _unstack(weights: ExpertWeights | PackedExpertWeights | QuantizedExpertWeights, slot: int) -> ExpertTensors:
    """One slot in the canonical layout: views of ExpertWeights, copies out of PackedExpertWeights, and quantized
    weights as stored, with their scales (a peer that fetches them must get both)."""
    if isinstance(weights, QuantizedExpertWeights):
        out = {"gate_up": weights.q_gate_up[slot], "down": weights.q_down[slot],
               "gate_up_scale": weights.s_gate_up[slot], "down_scale": weights.s_down[slot]}
    elif isinstance(weights, PackedExpertWeights):
        gate_up, down = weights.unpack_slot(slot)
        out = {"gate_up": gate_up, "down": down}
    else:
        out = {"gate_up": weights.w_gate_up_S2IH[slot], "down": weights.w_down_SHI[slot]}
    if weights.b_gate_up_S2I is not None:
        out["gate_up_bias"], out["down_bias"] = weights.b_gate_up_S2I[slot], weights.b_down_SH[slot]
    return out


class _Resident(Mapping):
    """An epoch's experts by (layer, expert), each unstacked only when read: a packed expert is unpacked into a
    copy, so a plan switch must not unpack every resident expert at once."""

    def __init__(self, experts_per_layer: list[list[int]], layers: list) -> None:
        self._where = {(l, e): (layers[l], s) for l, experts in enumerate(experts_per_layer)
                       for s, e in enumerate(experts)}

    def __getitem__(self, key: tuple[int, int]) -> ExpertTensors:
        return _unstack(*self._where[key])

    def __contains__(self, key) -> bool:  # Mapping's own would unstack the expert to answer
        return key in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


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
        epoch: int = 0,
        telemetry_config: telemetry.TelemetryConfig | None = None,
        max_forward_tokens: int = DEFAULT_MAX_FORWARD_TOKENS,
    ) -> None:
        torch.set_num_threads(num_threads)
        telemetry.setup(telemetry_config)
        self.worker_index = worker_index
        self.spec = spec
        # the largest call a data path accepts: the engine's largest forward of this model's rows and pairs
        self.max_call_bytes = frames.call_limit(max(layer.hidden_size for layer in spec.moe_layers), spec.top_k,
                                               max_forward_tokens)
        self.sources = sources
        self.dtype = dtype
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # On a CPU with the C kernels, experts are held in their panel layout (kernels/grouped.py).
        self.pack_for_cpu = self.device.type == "cpu" and dtype == torch.float32 and cpu_rows.available()
        self._lock = threading.Lock()  # guards the epoch table; forward reads a snapshot of one entry
        # epoch -> (experts per layer in local slot order, stacked weights per layer)
        self._epochs: dict[int, tuple[list[list[int]], list[ExpertWeights | PackedExpertWeights | None]]] = {}
        self.epoch = epoch  # the newest committed epoch
        self.read_slots = self.fetched_slots = 0  # slots read from the checkpoint / fetched from peers, ever
        self._compiled_tasks = None  # this worker's share of the compiled graph it runs (hold_compiled)
        self._epochs[epoch] = (self._copy(experts_per_layer), self._build(experts_per_layer, {}, {}))

    @staticmethod
    def _copy(experts_per_layer: list[list[int]]) -> list[list[int]]:
        return [list(map(int, e)) for e in experts_per_layer]

    def _build(self, experts_per_layer: list[list[int]], resident: Mapping[tuple[int, int], ExpertTensors],
               fetched: dict[tuple[int, int], ExpertTensors]) -> list[ExpertWeights | PackedExpertWeights | None]:
        """Stack each layer's slots: resident experts are copied, fetched ones used, the rest read from disk."""
        if len(experts_per_layer) != len(self.spec.moe_layers):
            raise ValueError(f"worker {self.worker_index}: {len(experts_per_layer)} layers of slots given; the model "
                             f"has {len(self.spec.moe_layers)} MoE layers")
        reader, started, total = TensorReader(), time.monotonic(), sum(map(len, experts_per_layer))
        layers: list[ExpertWeights | None] = []
        try:
            for layer, experts in zip(self.spec.moe_layers, experts_per_layer):
                loaded = []
                for expert in experts:
                    key = (layer.index, expert)
                    if key in resident:
                        tensors = resident[key]
                    elif key in fetched:
                        tensors, self.fetched_slots = fetched[key], self.fetched_slots + 1
                    else:
                        tensors = read_expert(reader, layer, self.sources[layer.index], expert, self.dtype)
                        self.read_slots += 1
                    loaded.append(tensors)
                weights = None if not loaded else self._stacked(layer, loaded)
                del loaded
                if isinstance(weights, ExpertWeights) and self.pack_for_cpu:
                    weights = PackedExpertWeights.pack(weights)  # the canonical stack is dropped once packed
                layers.append(weights)
        finally:
            reader.close()
        log.info("worker %d: %d slots resident in %.1fs", self.worker_index, total, time.monotonic() - started)
        return layers

    def _stacked(self, layer, loaded: list[ExpertTensors]) -> ExpertWeights | QuantizedExpertWeights:
        on_device = lambda key: None if key not in loaded[0] else _stack(loaded, key).to(self.device)
        if layer.quant is not None:
            return QuantizedExpertWeights(
                quant=layer.quant, q_gate_up=on_device("gate_up"), s_gate_up=on_device("gate_up_scale"),
                q_down=on_device("down"), s_down=on_device("down_scale"), hidden=layer.hidden_size,
                intermediate=layer.intermediate_size, compute_dtype=self.dtype,
                b_gate_up_S2I=on_device("gate_up_bias"), b_down_SH=on_device("down_bias"))
        return ExpertWeights(w_gate_up_S2IH=on_device("gate_up"), w_down_SHI=on_device("down"),
                             b_gate_up_S2I=on_device("gate_up_bias"), b_down_SH=on_device("down_bias"))

    def _resident(self) -> _Resident:
        return _Resident(*self._epochs[self.epoch])

    # -- the hot path ------------------------------------------------------------------------------------
    def forward(self, epoch: int, layer: int, x_TH: WireTensor, pair_token_N: np.ndarray, pair_slot_N: np.ndarray,
                pair_weight_N: np.ndarray) -> WireTensor:
        """One ``WorkerCall``, its fields as arguments: the weighted sum of this worker's experts' outputs per token
        sent (``x_TH``'s rows, in order)."""
        with self._lock:  # NOTE: forward also runs on a compiled graph's thread, beside prepare and commit
            entry = self._epochs.get(epoch)
        if entry is None:
            raise StaleEpoch(f"worker {self.worker_index} holds plan epochs {sorted(self._epochs)}; a call named "
                             f"epoch {epoch}")
        weights = entry[1][layer]
        if weights is None:
            raise ValueError(f"worker {self.worker_index} holds no experts of MoE layer {layer} in epoch {epoch}")
        started = time.perf_counter()
        pairs = pairs_on(self.device, pair_token_N, pair_slot_N, pair_weight_N)
        y_TH = grouped_experts(unpack(x_TH, self.device), *pairs, weights, self.spec.activation)
        out = pack(y_TH)  # NOTE: a copy to host, so on a GPU the time below includes the compute
        if telemetry.STATE.metrics:
            telemetry.M.expert_compute.record(time.perf_counter() - started,
                                              telemetry.attrs(worker=self.worker_index, layer=layer))
        return out

    def forward_compiled(self, call: tuple | None) -> WireTensor | None:
        """The compiled-graph path (moeray.transport.compiled_graph): a WorkerCall's fields as a plain tuple, or
        None when this layer sends this worker nothing, answered at once."""
        return None if call is None else self.forward(*call)

    def hold_compiled(self, tasks: list) -> None:
        """Keep this worker's share of the compiled graph it runs now, so a router that restarted can cancel it."""
        with self._lock:
            self._compiled_tasks = tasks

    def release_compiled(self) -> bool:
        """Cancel the compiled graph held here, if any (its loop exits); True if there was one. A router calls it
        before compiling, since an actor can be in one compiled graph at a time."""
        with self._lock:
            tasks, self._compiled_tasks = self._compiled_tasks, None
        if tasks is None:
            return False
        from ray.dag.compiled_dag_node import do_cancel_executable_tasks
        do_cancel_executable_tasks(self, tasks)  # harmless on a graph already torn down
        return True

    # -- plan switches -----------------------------------------------------------------------------------
    def prepare(self, epoch: int, experts_per_layer: list[list[int]], peers: list | None = None) -> dict:
        """Phase 1: make ``epoch``'s slots resident beside the current epoch's. ``peers`` lists (worker handle,
        (layer, expert) pairs to fetch from it); anything else not resident here is read from the checkpoint.
        Returns what was loaded: slots kept, fetched, read, and bytes."""
        experts_per_layer = self._copy(experts_per_layer)
        with self._lock:
            if epoch in self._epochs:
                raise ValueError(f"worker {self.worker_index} already holds epoch {epoch}")
            resident = self._resident()
        wanted = {(l, e) for l, experts in enumerate(experts_per_layer) for e in experts}
        fetched: dict[tuple[int, int], ExpertTensors] = {}
        for peer, pairs in peers or ():
            pairs = [p for p in map(tuple, pairs) if p in wanted and p not in resident]
            if pairs:
                for key, wire in zip(pairs, _export_from(peer, pairs)):
                    fetched[key] = {name: unpack(t) for name, t in wire.items()}
        before = (self.read_slots, self.fetched_slots)
        layers = self._build(experts_per_layer, resident, fetched)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        with self._lock:
            self._epochs[epoch] = (experts_per_layer, layers)
        read, from_peers = self.read_slots - before[0], self.fetched_slots - before[1]
        loaded_bytes = sum(self.spec.moe_layers[l].bytes_per_expert(itemsize) for l, e in wanted - set(resident))
        return {"worker": self.worker_index, "epoch": epoch, "kept_slots": len(wanted & set(resident)),
                "fetched_slots": from_peers, "read_slots": read, "loaded_bytes": loaded_bytes}

    def commit(self, epoch: int, worker_index: int | None = None) -> None:
        """Phase 3: ``epoch`` is the plan every router uses now; drop the slots of every other epoch. A plan that
        changed the worker list may renumber this worker."""
        with self._lock:
            if worker_index is not None:
                self.worker_index = worker_index
            if epoch not in self._epochs:
                raise StaleEpoch(f"worker {self.worker_index} cannot commit epoch {epoch}; it holds "
                                 f"{sorted(self._epochs)}")
            self._epochs = {epoch: self._epochs[epoch]}
            self.epoch = epoch

    def abort(self, epoch: int) -> None:
        """Undo a ``prepare`` whose switch did not happen (the current epoch stays)."""
        with self._lock:
            if epoch != self.epoch:
                self._epochs.pop(epoch, None)

    def export_experts(self, pairs: list[tuple[int, int]]) -> list[dict[str, WireTensor]]:
        """The current epoch's weights of ``(layer, expert)`` pairs, for a peer that is loading them."""
        with self._lock:
            resident = self._resident()
        missing = [p for p in map(tuple, pairs) if p not in resident]
        if missing:
            raise ValueError(f"worker {self.worker_index} does not hold {missing} in epoch {self.epoch}")
        return [{name: pack(t) for name, t in resident[tuple(p)].items()} for p in pairs]

    # -- introspection -----------------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(w.nbytes for _, layers in self._epochs.values() for w in layers if w is not None)

    def info(self) -> dict:
        node_id, gpu_ids = _ray_placement()
        with self._lock:
            experts_per_layer = self._epochs[self.epoch][0]
        return {
            "worker": self.worker_index,
            "node_id": node_id,
            "gpu_ids": gpu_ids,
            "pid": os.getpid(),
            "device": str(self.device),
            "epoch": self.epoch,
            "epochs": sorted(self._epochs),
            "experts_per_layer": experts_per_layer,
            "resident_bytes": self.resident_bytes(),
            "read_slots": self.read_slots,
            "fetched_slots": self.fetched_slots,
        }

    def ping(self) -> bool:
        return True

    def round_trip(self, x_TH: WireTensor) -> WireTensor:
        """``x_TH`` back untouched: a bare round trip carrying a layer's payload both ways, no compute (the floor
        ``moeray bench serve`` compares a step with)."""
        return x_TH

    def round_trip_call(self, epoch: int, layer: int, x_TH: WireTensor, *pairs) -> WireTensor:
        """``round_trip`` taking a ``WorkerCall``'s fields, as the TCP and collective serving loops call methods."""
        return x_TH

    # -- the TCP transport (moeray.transport.tcp) -----------------------------------------------------------
    def tcp_address(self) -> tuple[str, int, bytes]:
        """Where this worker takes TCP transport connections (listening from the first ask on), and the key a
        connection proves it holds (never sent on the socket): a router asks through Ray, so only Ray's peers
        learn it."""
        from moeray.transport.tcp import listen

        listener = listen(self)
        return (*listener.address, listener.key)

    def tcp_connections(self) -> int:
        """TCP transport connections this worker serves now (any number of routers, one per concurrent send)."""
        listener = vars(self).get("_tcp_listener")
        return 0 if listener is None else listener.connections

    # -- the collective transport (moeray.transport.collective) --------------------------------------------
    # NOTE: kept apart: the group's serving thread calls ``forward`` (or the spec's method) as it stands.
    def join_collective(self, spec) -> str:
        """Join one router's process group (a ``collective.GroupSpec``) and serve it on a thread of its own until
        the group is stopped or its router goes away; returns the group's name once the rendezvous is done."""
        from moeray.transport.collective import join_group

        return join_group(self, spec)

    def collective_groups(self) -> list[str]:
        """The process groups this worker serves now, by name (one per router, several routers at once)."""
        from moeray.transport.collective import served_groups

        return served_groups(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerSpawner:
    """Starts expert workers the same way for the engine's first ones and for the controller's later ones."""

    options: dict  # Ray actor options: a GPU each, or a CPU share
    checkpoint_path: str
    spec: ModelSpec
    sources: tuple[ExpertSource, ...]
    dtype: torch.dtype
    num_threads: int = 1
    telemetry_config: telemetry.TelemetryConfig | None = None
    routers: int = 1
    max_forward_tokens: int = DEFAULT_MAX_FORWARD_TOKENS

    def __call__(self, index: int, experts_per_layer: list[list[int]] | None = None, epoch: int = 0):
        config = None if self.telemetry_config is None else \
            self.telemetry_config.for_process("worker", index, routers=self.routers)
        import ray

        return ray.remote(ExpertWorker).options(**self.options, max_concurrency=4).remote(
            worker_index=index, checkpoint_path=self.checkpoint_path, spec=self.spec, sources=self.sources,
            experts_per_layer=experts_per_layer or [[] for _ in self.spec.moe_layers], dtype=self.dtype,
            num_threads=self.num_threads, epoch=epoch, telemetry_config=config,
            max_forward_tokens=self.max_forward_tokens)
