"""What a policy may place experts on: workers, their nodes, their slot capacity, and the per-round budget.

- ``Topology``: the node of each worker and how many slots a worker holds per MoE layer (from a memory budget).
- ``Budget``: redundant slots per layer beyond one per logical expert, and how much one rebalance may move.
"""

from __future__ import annotations

import dataclasses
import re

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str | int) -> int:
    """'20GiB' -> 21474836480; '512MB', '1.5G' and plain integers work too."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"memory size {text!r} is not a number with an optional unit (e.g. 20GiB, 512MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def slots_per_worker(worker_memory_bytes: int, expert_bytes_per_layer: int, num_layers: int) -> int:
    """Slots per MoE layer that fit in one worker's memory budget: every layer holds the same number of slots."""
    if expert_bytes_per_layer <= 0 or num_layers <= 0:
        raise ValueError(f"expert bytes ({expert_bytes_per_layer}) and layers ({num_layers}) must be positive")
    slots = worker_memory_bytes // (expert_bytes_per_layer * num_layers)
    if slots < 1:
        raise ValueError(f"a worker memory budget of {worker_memory_bytes} bytes holds no slot: one slot in each of "
                         f"{num_layers} layers needs {expert_bytes_per_layer * num_layers} bytes")
    return int(slots)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Topology:
    worker_node: tuple[int, ...]  # node index of each worker, 0..num_nodes-1
    slots_per_worker: int  # slot capacity of one worker in each MoE layer

    def __post_init__(self) -> None:
        if not self.worker_node:
            raise ValueError("a topology needs at least 1 worker")
        if self.slots_per_worker < 1:
            raise ValueError(f"slots_per_worker must be >= 1; got {self.slots_per_worker}")
        if min(self.worker_node) < 0:
            raise ValueError(f"node indices must be >= 0; got {min(self.worker_node)}")

    @classmethod
    def uniform(cls, *, num_workers: int, num_nodes: int = 1, slots_per_worker: int) -> Topology:
        """Workers spread over nodes in contiguous blocks (worker w on node w * nodes // workers)."""
        if num_nodes < 1 or num_nodes > num_workers:
            raise ValueError(f"nodes must lie in [1, {num_workers}] for {num_workers} workers; got {num_nodes}")
        return cls(worker_node=tuple(w * num_nodes // num_workers for w in range(num_workers)),
                   slots_per_worker=slots_per_worker)

    @property
    def num_workers(self) -> int:
        return len(self.worker_node)

    @property
    def num_nodes(self) -> int:
        return max(self.worker_node) + 1

    def workers_on(self, node: int) -> list[int]:
        return [w for w, n in enumerate(self.worker_node) if n == node]

    @property
    def capacity(self) -> int:
        """Slots per MoE layer over all workers."""
        return self.num_workers * self.slots_per_worker


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    redundant: int = 0  # slots per layer beyond one per logical expert
    max_moved_slots: int | None = None  # slots one rebalance may load, summed over layers (None: unlimited)
    max_moved_bytes: int | None = None  # bytes one rebalance may load (None: unlimited)
    expert_bytes: int = 1  # bytes of one expert's weights in one layer

    def __post_init__(self) -> None:
        if self.redundant < 0:
            raise ValueError(f"redundant must be >= 0; got {self.redundant}")
        for name in ("max_moved_slots", "max_moved_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None; got {value}")
        if self.expert_bytes < 1:
            raise ValueError(f"expert_bytes must be >= 1; got {self.expert_bytes}")

    def slots_per_layer(self, num_experts: int) -> int:
        return num_experts + self.redundant

    def check_fits(self, num_experts: int, topology: Topology) -> None:
        """Raise if one copy of every expert plus the redundant slots cannot fit in the workers' capacity, or if
        a replica would have to share a worker with another copy of its expert."""
        needed = self.slots_per_layer(num_experts)
        if needed > topology.capacity:
            raise ValueError(f"{num_experts} experts + {self.redundant} redundant = {needed} slots per layer exceed "
                             f"the capacity of {topology.num_workers} workers x {topology.slots_per_worker} slots "
                             f"= {topology.capacity}")
        if self.redundant > num_experts * (topology.num_workers - 1):
            raise ValueError(f"redundant slots must lie in [0, {num_experts * (topology.num_workers - 1)}] with "
                             f"{topology.num_workers} workers (two copies of an expert never share a worker); "
                             f"got {self.redundant}")
