"""Where an engine's first layout comes from, so that a restart starts where the last run left off:

- a static layout (``contiguous``, ``round_robin``: the ``placement`` setting), the default;
- a plan file (``initial_plan``) a running server exported: ``moeray placement export --out FILE`` writes one,
  and the JSON ``moeray placement show --json`` prints reads as one too;
- a recorded load trace (``initial_load``, JSON Lines, moeray.placement.traces), placed by the configured policy
  as if every window of it had been one load window.

Whatever the source, a layout that does not fit the checkpoint (MoE layers, experts per layer) or the workers (their
number, their slots per layer, the redundant slots) is refused with a ValueError naming the value and the limit,
before any actor starts. The file's epoch is not kept: the engine numbers its first plan epoch 0.

Plan file format (JSON): ``{"num_workers": W, "num_experts": E, "phy2log": [[...] per layer], "slot_worker": [[...]
per layer], "epoch": ..., ...}`` (``Plan.describe()``; other keys are informational).
"""

from __future__ import annotations

import json
import os

import torch

from moeray.placement.algorithms.plan import Layout
from moeray.placement.algorithms.policies import check_layout, resolve_policy, static_layout
from moeray.placement.algorithms.topology import Budget, Topology
from moeray.placement.traces import read_trace


def plan_json(layout: Layout, **extra) -> dict:
    """A layout (or plan) as a plan file's object; ``extra`` keys (policy, slots_per_worker, ...) are added."""
    return {**layout.describe(), **extra}


def write_plan(path: str | os.PathLike, layout: Layout, **extra) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(plan_json(layout, **extra), f)
        f.write("\n")


def read_layout(path: str | os.PathLike) -> Layout:
    """The layout in a plan file (``export``'s format, or ``show --json``'s); ValueError naming the file and the
    problem otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"plan file {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"plan file {path}: expected a JSON object, got {type(obj).__name__}")
    try:
        if "phy2log" in obj and "slot_worker" in obj:
            phy2log_LP = torch.tensor(obj["phy2log"], dtype=torch.long)
            slot_worker_LP = torch.tensor(obj["slot_worker"], dtype=torch.long)
            if phy2log_LP.dim() != 2 or phy2log_LP.numel() == 0:
                raise ValueError("'phy2log' must be a non-empty list of per-layer lists of expert ids")
            num_experts = obj.get("num_experts", int(phy2log_LP.max()) + 1)
            num_workers = obj.get("num_workers", int(slot_worker_LP.max()) + 1)
            return Layout(num_workers=num_workers, num_experts=num_experts, phy2log_LP=phy2log_LP,
                          slot_worker_LP=slot_worker_LP)
        if "experts_per_worker" in obj:  # `moeray placement show --json`: [worker][layer] -> experts
            per_worker = obj["experts_per_worker"]
            num_layers = max((len(layers) for layers in per_worker), default=0)
            num_experts = 1 + max((e for layers in per_worker for experts in layers for e in experts), default=-1)
            if not num_layers or not num_experts:
                raise ValueError("'experts_per_worker' places no expert")
            replicas = [[[] for _ in range(num_experts)] for _ in range(num_layers)]
            for w, layers in enumerate(per_worker):
                for l, experts in enumerate(layers):
                    for e in experts:
                        replicas[l][e].append(w)
            return Layout.from_replicas(replicas, num_workers=len(per_worker))
    except (TypeError, ValueError, RuntimeError) as e:  # ragged lists, ids out of range, an expert with no replica
        raise ValueError(f"plan file {path}: {e}") from None
    raise ValueError(f"plan file {path}: expected 'phy2log' and 'slot_worker' (moeray placement export) or "
                     f"'experts_per_worker' (moeray placement show --json); got keys {sorted(obj)}")


def check_fits(layout: Layout, *, source: str, num_layers: int, num_experts: int, num_workers: int,
               slots_per_worker: int, redundant: int) -> Layout:
    """Refuse (ValueError naming the value and the limit) a layout the checkpoint or the workers cannot hold."""
    if layout.num_layers != num_layers:
        raise ValueError(f"{source} places {layout.num_layers} MoE layers; the checkpoint has {num_layers}")
    if layout.num_experts != num_experts:
        raise ValueError(f"{source} places {layout.num_experts} experts per layer; the checkpoint's MoE layers have "
                         f"{num_experts}")
    if layout.num_workers != num_workers:
        raise ValueError(f"{source} is for {layout.num_workers} expert workers; workers is {num_workers}")
    extra = layout.num_slots - num_experts
    if extra > redundant:
        raise ValueError(f"{source} holds {extra} redundant slots per layer ({layout.num_slots} slots for "
                         f"{num_experts} experts); replicas allows {redundant}")
    fill_LW = torch.zeros(layout.num_layers, num_workers, dtype=torch.long)
    fill_LW.scatter_add_(1, layout.slot_worker_LP, torch.ones_like(layout.slot_worker_LP))
    if int(fill_LW.max()) > slots_per_worker:
        l, w = divmod(int(fill_LW.argmax()), num_workers)
        raise ValueError(f"{source} puts {int(fill_LW[l, w])} slots of layer {l} on worker {w}; a worker holds "
                         f"{slots_per_worker} per layer (ceil((experts + replicas) / workers), or worker_memory)")
    return layout


def layout_from_trace(path: str | os.PathLike, policy: str, params: dict, *, topology: Topology, budget: Budget,
                      num_layers: int, num_experts: int) -> Layout:
    """``policy``'s layout for the whole trace's load (every window summed), with no current plan."""
    windows = read_trace(path)
    L, E = windows[0].shape
    if (L, E) != (num_layers, num_experts):
        raise ValueError(f"initial load {path} has {L} MoE layers x {E} experts; the checkpoint has {num_layers} x "
                         f"{num_experts}")
    load_LE = torch.stack(windows).sum(0).to(torch.float64)
    fn = resolve_policy(policy, params)
    return check_layout(fn(load_LE, topology, None, budget), policy, load_LE, topology, budget)


def initial_layout(*, plan_path: str | None, load_path: str | None, placement: str, policy: str, policy_params: dict,
                   num_layers: int, num_experts: int, num_workers: int, slots_per_worker: int,
                   budget: Budget) -> Layout:
    """The first layout from the source the settings name (see the module docstring), checked to fit."""
    if plan_path and load_path:
        raise ValueError(f"give an initial plan ({plan_path}) or an initial load ({load_path}), not both")
    if plan_path:
        layout, source = read_layout(plan_path), f"initial plan {plan_path}"
    elif load_path:
        # NOTE: one node: the workers' nodes are not known before they are placed; later rebalances see them.
        topology = Topology.uniform(num_workers=num_workers, slots_per_worker=slots_per_worker)
        budget.check_fits(num_experts, topology)
        layout = layout_from_trace(load_path, policy, policy_params, topology=topology, budget=budget,
                                   num_layers=num_layers, num_experts=num_experts)
        source = f"the layout {policy!r} made of initial load {load_path}"
    else:
        return static_layout(placement, num_layers=num_layers, num_experts=num_experts, num_workers=num_workers,
                             redundant=budget.redundant)
    return check_fits(layout, source=source, num_layers=num_layers, num_experts=num_experts,
                      num_workers=num_workers, slots_per_worker=slots_per_worker, redundant=budget.redundant)
