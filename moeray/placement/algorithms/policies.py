"""Placement policies: pure functions ``(load_LE, topology, current plan, budget, **params) -> layout``, and the
registry that finds one by name or import path.

A policy returns a ``Layout`` (slots, experts, workers; no epoch): the controller alone numbers it as the next
``Plan`` (a policy that returns a ``Plan`` has its epoch ignored). ``check_layout`` is the contract both the
controller and the simulator hold a policy's result to.

Built in (see each module): ``contiguous`` and ``round_robin`` (static baselines, here), ``greedy``,
``replicated`` and ``replicated_hierarchical`` (moeray.placement.algorithms.balanced), ``migration_aware``
(moeray.placement.algorithms.migration), ``optimal`` (moeray.placement.algorithms.optimal). A user's own policy
plugs in by import path, ``package.module:function``, with the same signature; its parameters come from the config
as keyword arguments.
Over the API (SetPolicy, Rebalance) only the built-ins, the startup policy and functions in the modules allowed at
startup may be named (``check_policy_allowed``: nothing else is imported), and parameters are checked against the
function's signature before anything changes (``check_policy_params``).

Static baselines, used before any load is known:

- ``contiguous``: worker w holds experts [w*E/W, (w+1)*E/W) of every layer (DeepSeek's and vLLM's default).
- ``round_robin``: expert e goes to worker e % W, so neighbouring (often co-activated) experts spread out.

``redundant`` extra slots per layer hold second copies; with no load known yet they go to experts 0, 1, ...,
each on the worker with the fewest slots that does not already hold that expert (an expert that would fill a worker
beyond ceil((E + R) / W) slots gives its turn to the next).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Iterable

import torch

from moeray.placement.algorithms.plan import Layout, Plan
from moeray.placement.algorithms.topology import Budget, Topology

Policy = Callable[[torch.Tensor, Topology, "Plan | None", Budget], Layout]

BUILTIN_POLICIES = {
    "contiguous": "moeray.placement.algorithms.policies:contiguous",
    "round_robin": "moeray.placement.algorithms.policies:round_robin",
    "greedy": "moeray.placement.algorithms.balanced:greedy",
    "replicated": "moeray.placement.algorithms.balanced:replicated",
    "replicated_hierarchical": "moeray.placement.algorithms.balanced:replicated_hierarchical",
    "migration_aware": "moeray.placement.algorithms.migration:migration_aware",
    "optimal": "moeray.placement.algorithms.optimal:optimal",
}

STATIC_POLICIES = ("contiguous", "round_robin")


def _primary_workers(policy: str, num_experts: int, num_workers: int) -> list[int]:
    if policy == "contiguous":
        return [e * num_workers // num_experts for e in range(num_experts)]
    if policy == "round_robin":
        return [e % num_workers for e in range(num_experts)]
    raise ValueError(f"placement policy {policy!r} is not one of {STATIC_POLICIES}")


def static_layout(policy: str, *, num_layers: int, num_experts: int, num_workers: int, redundant: int = 0) -> Layout:
    if num_workers < 1:
        raise ValueError(f"workers must be >= 1; got {num_workers}")
    if num_workers > num_experts + redundant:
        raise ValueError(f"{num_workers} workers but only {num_experts + redundant} slots per layer "
                         f"({num_experts} experts + {redundant} redundant): some workers would hold nothing")
    if redundant < 0 or redundant > num_experts * (num_workers - 1):
        limit = num_experts * (num_workers - 1)
        raise ValueError(f"redundant slots must lie in [0, {limit}] with {num_workers} workers "
                         f"(two copies of an expert never share a worker); got {redundant}")
    # 1. One primary copy of every expert.
    logical = list(range(num_experts))
    workers = _primary_workers(policy, num_experts, num_workers)
    # 2. Redundant copies of experts r % E, r + 1 % E, ..., each on the least-filled worker that lacks that expert.
    #    An expert whose every such worker already holds ceil((E + R) / W) slots (the slots an engine gives each
    #    worker) gives its turn to the next one, so the layout fits the workers the controller holds it to.
    cap = -(-(num_experts + redundant) // num_workers)
    for r in range(redundant):
        fill = [workers.count(w) for w in range(num_workers)]
        choices = []
        for expert in [(r + i) % num_experts for i in range(num_experts)]:
            holders = {w for e, w in zip(logical, workers) if e == expert}
            free = [w for w in range(num_workers) if w not in holders]
            if free:
                choices.append((expert, min(free, key=lambda w: (fill[w], w))))
        expert, worker = next(((e, w) for e, w in choices if fill[w] < cap), choices[0])
        logical.append(expert)
        workers.append(worker)
    phy2log_LP = torch.tensor([logical] * num_layers, dtype=torch.long).reshape(num_layers, -1)
    slot_worker_LP = torch.tensor([workers] * num_layers, dtype=torch.long).reshape(num_layers, -1)
    return Layout(num_workers=num_workers, num_experts=num_experts, phy2log_LP=phy2log_LP,
                  slot_worker_LP=slot_worker_LP)


def static_plan(policy: str, *, num_layers: int, num_experts: int, num_workers: int, redundant: int = 0,
                epoch: int = 0) -> Plan:
    """``static_layout`` as the plan of ``epoch``: the first plan, before any controller runs (engine, benches)."""
    return static_layout(policy, num_layers=num_layers, num_experts=num_experts, num_workers=num_workers,
                         redundant=redundant).at_epoch(epoch)


def _static(policy: str, load_LE: torch.Tensor, topology: Topology, current: Plan | None, budget: Budget) -> Layout:
    budget.check_fits(load_LE.shape[1], topology)
    return static_layout(policy, num_layers=load_LE.shape[0], num_experts=load_LE.shape[1],
                         num_workers=topology.num_workers, redundant=budget.redundant)


contiguous = functools.partial(_static, "contiguous")
round_robin = functools.partial(_static, "round_robin")


POLICY_INPUTS = ("load_LE", "topology", "current", "budget")  # what every policy is called with, positionally


def check_layout(layout, name: str, load_LE: torch.Tensor, topology: Topology, budget: Budget) -> Layout:
    """Refuse (ValueError naming the policy, the value and the limit) what a policy returned unless it is a layout of
    ``load_LE``'s layers and experts on ``topology``'s workers, within the budget's slots and each worker's
    capacity. Returns it as a ``Layout`` (a ``Plan``'s epoch dropped: the controller numbers plans)."""
    if not isinstance(layout, Layout):
        raise ValueError(f"policy {name!r} returned {type(layout).__name__}; a policy returns a Layout "
                         "(moeray.placement.algorithms.plan)")
    L, E = load_LE.shape
    if (layout.num_layers, layout.num_experts, layout.num_workers) != (L, E, topology.num_workers):
        raise ValueError(f"policy {name!r} returned a layout of {layout.num_layers} layers x {layout.num_experts} "
                         f"experts on {layout.num_workers} workers; expected {L} x {E} on {topology.num_workers}")
    if layout.num_slots > budget.slots_per_layer(E):
        raise ValueError(f"policy {name!r} used {layout.num_slots} slots per layer; the budget allows "
                         f"{budget.slots_per_layer(E)} ({E} experts + {budget.redundant} redundant)")
    fill_LW = torch.zeros(L, topology.num_workers, dtype=torch.long)
    fill_LW.scatter_add_(1, layout.slot_worker_LP, torch.ones_like(layout.slot_worker_LP))
    if int(fill_LW.max()) > topology.slots_per_worker:
        l, w = divmod(int(fill_LW.argmax()), topology.num_workers)
        raise ValueError(f"policy {name!r} put {int(fill_LW[l, w])} slots of layer {l} on worker {w}, which holds "
                         f"{topology.slots_per_worker}")
    return Layout(num_workers=layout.num_workers, num_experts=layout.num_experts, phy2log_LP=layout.phy2log_LP,
                  slot_worker_LP=layout.slot_worker_LP) if isinstance(layout, Plan) else layout


def _import_path(name: str) -> tuple[str, str]:
    """(module, attribute) of a built-in name or an import path (``pkg.module:function`` or ``pkg.module.function``),
    without importing anything."""
    path = BUILTIN_POLICIES.get(name, name)
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr.isidentifier() or not all(p.isidentifier() for p in module_name.split(".")):
        raise ValueError(f"placement policy {name!r} is neither a built-in ({', '.join(BUILTIN_POLICIES)}) nor an "
                         "import path like 'package.module:function'")
    return module_name, attr


def check_policy_allowed(name: str, allowed_modules: Iterable[str], also: Iterable[str] = ()) -> None:
    """Refuse (ValueError naming the policy and what is allowed) a policy that is neither a built-in, nor a function
    in one of ``allowed_modules``, nor one of ``also`` (the policy the operator configured at startup). Nothing is
    imported: importing a module runs its code."""
    allowed_modules, also = tuple(allowed_modules), tuple(also)
    builtin = {_import_path(n) for n in BUILTIN_POLICIES}
    chosen = set()
    for other in also:
        try:
            chosen.add(_import_path(other))
        except ValueError:
            pass
    path = _import_path(name)  # raises for what is not even an import path
    if path in builtin or path in chosen or path[0] in allowed_modules:
        return
    modules = ", ".join(allowed_modules) or "none"
    startup = f", the startup policy {', '.join(map(repr, also))}" if also else ""
    raise ValueError(f"placement policy {name!r} is not allowed; allowed: the built-ins "
                     f"({', '.join(BUILTIN_POLICIES)}){startup}, and functions in the modules allowed at startup "
                     f"({modules}; `moeray serve --allow-policy-module MODULE` adds one)")


def check_policy_params(name: str, fn: Callable, params: dict) -> None:
    """Refuse (ValueError naming the parameter) ``params`` that ``fn`` cannot take as keyword arguments after the
    four inputs ``(load_LE, topology, current, budget)``: unknown names (listing the accepted ones), missing required
    ones, and values of the wrong type where the signature annotates one. The policy is not called."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise ValueError(f"placement policy {name!r} has no signature to check: it must be a Python function "
                         "(load_LE, topology, current, budget, **params) -> Layout") from None
    kinds = inspect.Parameter
    listed = list(sig.parameters.values())
    positional = [p for p in listed if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    var_kw = any(p.kind == kinds.VAR_KEYWORD for p in listed)
    inputs = {p.name for p in positional[:len(POLICY_INPUTS)]}
    accepted = [p.name for p in listed if p.name not in inputs
                and p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)]
    unknown = [k for k in params if k not in accepted and (not var_kw or k in inputs)]
    if unknown:
        takes = f"it accepts: {', '.join(accepted)}" if accepted else "it takes no parameters"
        raise ValueError(f"placement policy {name!r} has no parameter {', '.join(map(repr, unknown))}; {takes}")
    missing = [p.name for p in listed if p.name not in inputs and p.name not in params
               and p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY) and p.default is p.empty]
    if missing:
        raise ValueError(f"placement policy {name!r} needs parameter {', '.join(map(repr, missing))}")
    try:
        sig.bind(*([None] * len(POLICY_INPUTS)), **params)
    except TypeError as e:
        raise ValueError(f"placement policy {name!r} cannot be called as policy({', '.join(POLICY_INPUTS)}, "
                         f"**params): {e}") from None
    hints = _type_hints(fn)
    for key, value in params.items():
        expected = hints.get(key)
        if expected is not None and not _matches(value, expected):
            raise ValueError(f"placement policy {name!r} parameter {key!r} must be {_type_name(expected)}; got "
                             f"{value!r} ({type(value).__name__})")


def _type_hints(fn: Callable) -> dict:
    target = fn.func if isinstance(fn, functools.partial) else fn
    try:
        return typing.get_type_hints(inspect.unwrap(target))
    except Exception:  # unresolvable annotations: types are then not checked
        return {}


def _matches(value, tp) -> bool:
    """Whether a JSON/YAML value fits annotation ``tp`` (containers by their kind only; unknown forms pass)."""
    if tp is typing.Any or tp is object:
        return True
    if tp is None or tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    base = origin or tp
    if not isinstance(base, type):
        return True
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is tuple:  # JSON has arrays only
        return isinstance(value, (list, tuple))
    try:
        return isinstance(value, base)
    except TypeError:
        return True


def _type_name(tp) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def resolve_policy(name: str, params: dict | None = None, *, allowed_modules: Iterable[str] | None = None,
                   also: Iterable[str] = ()) -> Policy:
    """A policy by built-in name or by import path (``pkg.module:function`` or ``pkg.module.function``), with
    ``params`` bound as keyword arguments once checked against its signature (``check_policy_params``). With
    ``allowed_modules`` (not None), a policy outside them, the built-ins and ``also`` is refused before any import
    (``check_policy_allowed``)."""
    module_name, attr = _import_path(name)
    if allowed_modules is not None:
        check_policy_allowed(name, allowed_modules, also)
    path = f"{module_name}:{attr}"
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"placement policy {name!r} could not be loaded from {path!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"placement policy {name!r} ({path}) is not callable")
    check_policy_params(name, fn, params or {})
    return functools.partial(fn, **params) if params else fn
