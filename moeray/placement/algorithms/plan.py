"""The layout and the plan: which worker holds which copy of which expert, per MoE layer.

A ``Layout`` is what a policy returns: slots, their experts and their workers, and no epoch. A ``Plan`` is a layout
the controller has numbered with an epoch (``Layout.at_epoch``): what workers and routers switch to. Only the
controller (and the engine, for the first plan, epoch 0) numbers plans, so a policy can never skip or reuse one.

Shape legend: L MoE layers, P physical slots per layer, E logical experts, R max replicas of one expert.

- ``phy2log_LP[l, p]``: the logical expert slot ``p`` of layer ``l`` holds.
- ``slot_worker_LP[l, p]``: the worker that holds slot ``p``.
- ``log2phy_LER[l, e, r]``: the r-th slot of logical expert ``e`` (-1 past ``replica_count_LE[l, e]``).

A worker stores its slots of a layer in increasing slot order; ``local_slot_LP`` is a slot's index there.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Layout:
    num_workers: int
    num_experts: int
    phy2log_LP: torch.Tensor
    slot_worker_LP: torch.Tensor

    def __post_init__(self) -> None:
        if self.phy2log_LP.shape != self.slot_worker_LP.shape or self.phy2log_LP.dim() != 2:
            raise ValueError(f"phy2log {tuple(self.phy2log_LP.shape)} and slot_worker "
                             f"{tuple(self.slot_worker_LP.shape)} must both be [layers, slots]")
        if self.num_workers < 1:
            raise ValueError(f"a plan needs at least 1 worker; got {self.num_workers}")
        for l in range(self.num_layers):
            logical, workers = self.phy2log_LP[l], self.slot_worker_LP[l]
            if logical.min() < 0 or logical.max() >= self.num_experts:
                raise ValueError(f"layer {l}: logical expert ids must lie in [0, {self.num_experts})")
            if workers.min() < 0 or workers.max() >= self.num_workers:
                raise ValueError(f"layer {l}: worker ids must lie in [0, {self.num_workers})")
            missing = set(range(self.num_experts)) - set(logical.tolist())
            if missing:
                raise ValueError(f"layer {l}: experts {sorted(missing)} have no replica")
            pairs = set(zip(logical.tolist(), workers.tolist()))
            if len(pairs) != logical.numel():
                raise ValueError(f"layer {l}: two replicas of one expert on the same worker")

    @property
    def num_layers(self) -> int:
        return self.phy2log_LP.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log_LP.shape[1]

    @property
    def replica_count_LE(self) -> torch.Tensor:
        counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.long)
        return counts.scatter_add_(1, self.phy2log_LP, torch.ones_like(self.phy2log_LP))

    @property
    def log2phy_LER(self) -> torch.Tensor:
        counts_LE = self.replica_count_LE
        out = torch.full((self.num_layers, self.num_experts, int(counts_LE.max())), -1, dtype=torch.long)
        for l in range(self.num_layers):
            seen = [0] * self.num_experts
            for p, e in enumerate(self.phy2log_LP[l].tolist()):
                out[l, e, seen[e]] = p
                seen[e] += 1
        return out

    @property
    def local_slot_LP(self) -> torch.Tensor:
        out = torch.empty_like(self.slot_worker_LP)
        for l in range(self.num_layers):
            seen = [0] * self.num_workers
            for p, w in enumerate(self.slot_worker_LP[l].tolist()):
                out[l, p] = seen[w]
                seen[w] += 1
        return out

    def experts_of(self, worker: int) -> list[list[int]]:
        """Per layer, the logical experts a worker holds, in its local slot order."""
        return [self.phy2log_LP[l][self.slot_worker_LP[l] == worker].tolist() for l in range(self.num_layers)]

    def holders(self, layer: int) -> set[tuple[int, int]]:
        """The (logical expert, worker) pairs resident in one layer: what a plan change loads or drops."""
        return set(zip(self.phy2log_LP[layer].tolist(), self.slot_worker_LP[layer].tolist()))

    def moved_slots(self, new: Layout) -> int:
        """Slots ``new`` loads that this plan does not hold (a replica that only changes slot index moves nothing)."""
        if new.num_layers != self.num_layers:
            raise ValueError(f"plans differ in layers: {self.num_layers} vs {new.num_layers}")
        return sum(len(new.holders(l) - self.holders(l)) for l in range(self.num_layers))

    def at_epoch(self, epoch: int) -> Plan:
        """This layout as the plan of ``epoch`` (a plan's own epoch is replaced)."""
        return Plan(epoch=epoch, num_workers=self.num_workers, num_experts=self.num_experts,
                    phy2log_LP=self.phy2log_LP, slot_worker_LP=self.slot_worker_LP)

    def same_holders(self, other: Layout) -> bool:
        """Every layer holds the same (expert, worker) pairs: the same layout up to slot numbering."""
        return self.num_layers == other.num_layers and self.num_workers == other.num_workers and \
            all(self.holders(l) == other.holders(l) for l in range(self.num_layers))

    @classmethod
    def from_replicas(cls, replica_workers: list[list[list[int]]], *, num_workers: int) -> Layout:
        """Build a layout from ``replica_workers[layer][expert]`` = the workers holding that expert. Slots are
        numbered worker by worker, each worker's in increasing expert order."""
        num_experts = len(replica_workers[0]) if replica_workers else 0
        phy2log, slot_worker = [], []
        for layer, experts in enumerate(replica_workers):
            if len(experts) != num_experts:
                raise ValueError(f"layer {layer} has {len(experts)} experts; layer 0 has {num_experts}")
            pairs = sorted((w, e) for e, workers in enumerate(experts) for w in workers)
            slot_worker.append([w for w, _ in pairs])
            phy2log.append([e for _, e in pairs])
        if len({len(p) for p in phy2log}) > 1:
            raise ValueError(f"layers hold different slot counts {sorted({len(p) for p in phy2log})}; "
                             "every layer must hold the same number")
        return Layout(num_workers=num_workers, num_experts=num_experts,
                      phy2log_LP=torch.tensor(phy2log, dtype=torch.long),
                      slot_worker_LP=torch.tensor(slot_worker, dtype=torch.long))

    def replica_workers(self) -> list[list[list[int]]]:
        """``[layer][expert]`` -> the workers holding that expert (the inverse of ``from_replicas``)."""
        out = [[[] for _ in range(self.num_experts)] for _ in range(self.num_layers)]
        for l in range(self.num_layers):
            for e, w in zip(self.phy2log_LP[l].tolist(), self.slot_worker_LP[l].tolist()):
                out[l][e].append(w)
        return out

    def describe(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "num_experts": self.num_experts,
            "phy2log": self.phy2log_LP.tolist(),
            "slot_worker": self.slot_worker_LP.tolist(),
        }


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Plan(Layout):
    epoch: int

    @classmethod
    def from_replicas(cls, replica_workers: list[list[list[int]]], *, epoch: int, num_workers: int) -> Plan:
        """``Layout.from_replicas`` numbered with ``epoch``."""
        return Layout.from_replicas(replica_workers, num_workers=num_workers).at_epoch(epoch)

    def describe(self) -> dict:
        return {"epoch": self.epoch, **super().describe()}
