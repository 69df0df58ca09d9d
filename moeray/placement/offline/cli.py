"""``moeray placement simulate`` and ``moeray placement synth``: the offline simulator's command line.

    moeray placement synth --kind zipf|drifting|bursty [--experts 64] [--layers 32] [--windows 32] [--tokens 4096]
                           [--top-k 8] [--seed 0] [--s 1.0] --out FILE
    moeray placement simulate --trace FILE --policy NAME[,NAME...] --workers N [--nodes M] [--redundant R]
                              [--slots-per-worker S] [--policy-params JSON] [--config FILE] [--rebalance-every K]
                              [--decay D] [--warmup W] [--initial NAME | --initial-plan FILE] [--bound] [--plot DIR]
                              [--json]

``--config FILE`` takes either per-policy parameters (``{policies: {name: {params}}}``: policies are compared on a
fixed cadence, a rebalance every ``--rebalance-every`` windows) or the controller settings ``moeray serve
--placement-config`` takes (``policy``, ``imbalance_threshold``, ``consecutive_windows``, ``min_gain``,
``cooldown_windows``, ...): then the trace replays through the controller's own triggers (simulator.replay), window
by window, and ``--rebalance-every K`` adds a rebalance every K windows to them. A trace the controller wrote
(``trace_path``) replays to the decisions it made.

With ``--json``, simulate prints one JSON object per line: a ``"type": "window"`` line per (policy, window), then a
``"type": "summary"`` line per policy in ``--policy`` order, so the last line is the last policy's summary (with a
single policy: its summary, keys ``policy``, ``mean_imbalance``, ``p50_imbalance``, ``max_imbalance``,
``moved_slots``, ``moved_slots_per_rebalance``, ``moved_bytes``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

POLICY_PARAMS_HELP = ("JSON object of keyword parameters for every policy, or {policy name: {params}} for each one; "
                      "overrides --config")


def add_offline_commands(placement_sub: argparse._SubParsersAction) -> None:
    """Register ``simulate`` and ``synth`` under the ``moeray placement`` group's subparsers."""
    sim = placement_sub.add_parser("simulate", help="replay a load trace through placement policies, offline")
    sim.add_argument("--trace", required=True, help="JSON Lines trace: one {\"window\", \"load\": [L][E]} per line")
    sim.add_argument("--policy", help="comma-separated built-in names or import paths (package.module:function); "
                     "with controller settings in --config, overrides their policy")
    sim.add_argument("--workers", type=int, help="expert workers (default: the --initial-plan's)")
    sim.add_argument("--nodes", type=int, default=1)
    sim.add_argument("--redundant", type=int, default=0, help="redundant slots per MoE layer")
    sim.add_argument("--slots-per-worker", type=int, help="slot capacity per worker and layer "
                     "(default: ceil((experts + redundant) / workers))")
    sim.add_argument("--expert-bytes", default="1", help="bytes of one expert in one layer, for moved bytes "
                     "(e.g. 25MB; default 1: moved bytes = moved slots)")
    sim.add_argument("--max-moved-slots", type=int, help="budget: slots one rebalance may load (default: unlimited)")
    sim.add_argument("--policy-params", help=POLICY_PARAMS_HELP)
    sim.add_argument("--config", help="YAML or JSON file: {policies: {name: {params}}}, or the controller settings "
                     "of `moeray serve --placement-config` (replayed through the controller's triggers)")
    sim.add_argument("--rebalance-every", type=int, help="windows between rebalances (default 1; with controller "
                     "settings: also rebalance every K windows, besides their triggers)")
    sim.add_argument("--decay", type=float, default=0.0,
                     help="weight of the load history at each rebalance (0: windows since the last one; 1: all)")
    sim.add_argument("--warmup", type=int, default=0,
                     help="windows used only to build the first plan (0: start from --initial)")
    sim.add_argument("--initial", default="round_robin", choices=["round_robin", "contiguous"])
    sim.add_argument("--initial-plan", metavar="FILE", help="start from this plan file (`moeray placement export`) "
                     "instead of --initial")
    sim.add_argument("--bound", action="store_true", help="also solve optimal's lower bound per (window, layer)")
    sim.add_argument("--bound-time-limit", type=float, default=2.0, help="seconds per bound solve")
    sim.add_argument("--bound-budget", type=float, default=60.0, help="seconds for all bound solves")
    sim.add_argument("--plot", metavar="DIR", help="write PNG heatmaps and the imbalance chart to DIR")
    sim.add_argument("--json", action="store_true", help="JSON lines; the last one is a summary")
    sim.set_defaults(func=cmd_simulate)

    syn = placement_sub.add_parser("synth", help="write a synthetic load trace")
    syn.add_argument("--kind", required=True, choices=["zipf", "drifting", "bursty"])
    syn.add_argument("--experts", type=int, default=64)
    syn.add_argument("--layers", type=int, default=32)
    syn.add_argument("--windows", type=int, default=32)
    syn.add_argument("--tokens", type=int, default=4096, help="tokens per window")
    syn.add_argument("--top-k", type=int, default=8)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--s", type=float, default=1.0, help="Zipf exponent")
    syn.add_argument("--drift-every", type=int, default=4, help="drifting: windows between drifts")
    syn.add_argument("--drift-experts", type=int, default=2, help="drifting: hot experts that change rank per drift")
    syn.add_argument("--burst-prob", type=float, default=0.15, help="bursty: probability a window starts a burst")
    syn.add_argument("--burst-len", type=int, default=3, help="bursty: windows a burst lasts")
    syn.add_argument("--burst-experts", type=int, default=4, help="bursty: experts per layer in a burst")
    syn.add_argument("--burst-factor", type=float, default=8.0, help="bursty: load multiplier in a burst")
    syn.add_argument("--out", required=True)
    syn.set_defaults(func=cmd_synth)


def _read_config(path: str):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        return json.loads(text) or {}
    import yaml

    return yaml.safe_load(text) or {}


def _is_controller_config(path: str | None) -> bool:
    """Whether ``--config`` holds controller settings (any ControllerConfig field) rather than per-policy params."""
    if not path:
        return False
    from moeray.placement.config import ControllerConfig

    data = _read_config(path)
    return isinstance(data, dict) and bool(set(data) & {f.name for f in dataclasses.fields(ControllerConfig)})


def _load_config(path: str) -> dict:
    data = _read_config(path)
    policies = data.get("policies", data) if isinstance(data, dict) else None
    if not isinstance(policies, dict) or not all(isinstance(v, dict) for v in policies.values()):
        raise ValueError(f"config {path}: expected {{policies: {{name: {{params}}}}}}")
    return policies


def policy_params(names: list[str], cli_json: str | None, config_path: str | None) -> dict[str, dict]:
    """Per-policy keyword parameters: the config file's, overridden by ``--policy-params``."""
    out = {name: {} for name in names}
    if config_path:
        for name, params in _load_config(config_path).items():
            if name in out:
                out[name].update(params)
    if cli_json:
        try:
            given = json.loads(cli_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"--policy-params is not valid JSON: {e.msg}") from None
        if not isinstance(given, dict):
            raise ValueError(f"--policy-params must be a JSON object; got {cli_json!r}")
        per_policy = given and all(k in out and isinstance(v, dict) for k, v in given.items())
        for name in names:
            out[name].update(given.get(name, {}) if per_policy else given)
    return out


def _replay_configs(args: argparse.Namespace, names: list[str]) -> list:
    """One ControllerConfig per policy: the --config file's settings, --policy / --policy-params / --rebalance-every
    over them (as ``moeray serve``'s flags override its --placement-config)."""
    from moeray.placement.config import ControllerConfig

    if args.decay or args.warmup:
        raise ValueError("--decay and --warmup do not apply to controller settings: the controller's triggers decide "
                         "when to rebalance, from the window that triggered")
    base = ControllerConfig.from_file(args.config, rebalance_every_windows=args.rebalance_every)
    names = names or [base.policy]
    given = policy_params(names, args.policy_params, None) if args.policy_params else {}
    return [dataclasses.replace(base, policy=name, policy_params=given.get(name) or (
        base.policy_params if name == base.policy else {})) for name in names]


def cmd_simulate(args: argparse.Namespace) -> int:
    from moeray.placement.algorithms.topology import Budget, Topology, parse_bytes
    from moeray.placement.initial import read_layout
    from moeray.placement.offline.simulator import optimal_bounds, replay, simulate
    from moeray.placement.traces import read_trace_windows

    names = [n.strip() for n in (args.policy or "").split(",") if n.strip()]
    try:
        controller = _is_controller_config(args.config)
        configs = _replay_configs(args, names) if controller else None
        if not controller and not names:
            raise ValueError("--policy names no policy (or give controller settings in --config)")
        if args.rebalance_every is not None and args.rebalance_every < 1:
            raise ValueError(f"--rebalance-every must be >= 1; got {args.rebalance_every}")
        params = {} if controller else policy_params(names, args.policy_params, args.config)
        traced = read_trace_windows(args.trace)
        windows = [w.load_LE for w in traced]
        num_layers, num_experts = windows[0].shape
        initial = read_layout(args.initial_plan) if args.initial_plan else args.initial
        if args.workers is None and args.initial_plan:
            args.workers = initial.num_workers
        if args.workers is None or args.workers < 1:
            raise ValueError(f"--workers must be >= 1; got {args.workers}")
        slots = args.slots_per_worker or math.ceil((num_experts + args.redundant) / args.workers)
        topology = Topology.uniform(num_workers=args.workers, num_nodes=args.nodes, slots_per_worker=slots)
        moved_slots, moved_bytes = args.max_moved_slots, None
        if controller:  # the controller's move budget, as `moeray serve` builds it; --max-moved-slots over it
            moved_bytes = configs[0].max_moved_bytes
            moved_slots = configs[0].max_moved_slots if moved_slots is None else moved_slots
        budget = Budget(redundant=args.redundant, expert_bytes=parse_bytes(args.expert_bytes),
                        max_moved_slots=moved_slots, max_moved_bytes=moved_bytes)
        budget.check_fits(num_experts, topology)
        bounds = None
        if args.bound:
            bounds = optimal_bounds(windows, topology, budget, window_ids=range(args.warmup, len(windows)),
                                    time_limit_s=args.bound_time_limit, budget_s=args.bound_budget)
        if controller:
            times = [w.time_s for w in traced]
            results = [dataclasses.replace(replay(windows, config, topology, budget, initial=initial,
                                                  times=None if None in times else times), bounds=bounds)
                       for config in configs]
        else:
            results = [simulate(windows, name, topology, budget, params=params[name],
                                rebalance_every=args.rebalance_every or 1, decay=args.decay, warmup=args.warmup,
                                initial=initial, bounds=bounds) for name in names]
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    note = sys.stderr if args.json else sys.stdout
    print(f"trace {args.trace}: {len(windows)} windows x {num_layers} layers x {num_experts} experts; "
          f"{args.workers} workers on {args.nodes} nodes, {slots} slots each, {args.redundant} redundant",
          file=note)
    if bounds is not None:
        print(f"optimal bound: {len(bounds.cells)} of {bounds.attempted} (window, layer) cells solved "
              f"({sum(bounds.proven)} proven) in {bounds.seconds:.1f} s, {bounds.layers_solved()} layers", file=note)
    for result in results:
        for record in result.records:
            line = {"type": "window", "policy": result.policy, **record.to_json()}
            print(json.dumps(line) if args.json else
                  f"{result.policy:>24} window {line['window']:4d} epoch {line['epoch']:3d}  imbalance mean "
                  f"{line['mean_imbalance']:.3f} max {line['max_imbalance']:.3f}  moved {line['moved_slots']}"
                  + (f"  trigger: {line['trigger']}" + ("" if line["rebalanced"] else " (not applied)")
                     if line["trigger"] else ""))
    if args.plot:
        from moeray.placement.offline.plots import write_plots

        try:
            for path in write_plots(results, args.plot):
                print(f"wrote {path}", file=note)
        except (OSError, RuntimeError) as e:
            print(f"error: --plot: {e}", file=sys.stderr)
            return 2
    for result in results:
        summary = result.summary()
        if args.json:
            print(json.dumps({"type": "summary", **summary}))
        else:
            print(f"{summary['policy']}: imbalance mean {summary['mean_imbalance']:.3f} p50 "
                  f"{summary['p50_imbalance']:.3f} max {summary['max_imbalance']:.3f}; moved {summary['moved_slots']} "
                  f"slots ({summary['moved_slots_per_rebalance']:.1f} per rebalance, {summary['moved_bytes']} bytes)"
                  + (f"; optimal bound {summary['bound_imbalance']:.3f} (x{summary['vs_bound']:.3f} on its "
                     f"{summary['bound_cells']} cells)" if "bound_imbalance" in summary else ""))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from moeray.placement.traces import synthesize, top_share, write_trace

    try:
        windows = synthesize(args.kind, num_layers=args.layers, num_experts=args.experts, num_windows=args.windows,
                             tokens=args.tokens, top_k=args.top_k, seed=args.seed, s=args.s,
                             drift_every=args.drift_every, drift_experts=args.drift_experts,
                             burst_prob=args.burst_prob, burst_len=args.burst_len, burst_experts=args.burst_experts,
                             burst_factor=args.burst_factor)
        write_trace(args.out, windows)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {args.kind} trace, {args.windows} windows x {args.layers} layers x {args.experts} "
          f"experts, {args.tokens} tokens x top-{args.top_k} per window, seed {args.seed}; hottest expert's share "
          f"{top_share(windows[0]):.3f}")
    return 0
