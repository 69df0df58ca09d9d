"""``moeray placement``: the command group, and the commands that call a running server's placement API (gRPC).

    moeray placement show     --target HOST:PORT [--json]
    moeray placement export   --target HOST:PORT --out FILE     (a plan file: serve / generate --initial-plan FILE)
    moeray placement rebalance --target HOST:PORT [--dry-run] [--policy NAME] [--params JSON] [--json]
    moeray placement policy   --target HOST:PORT NAME [--params JSON]
    moeray placement scale    --target HOST:PORT --workers N
    moeray placement record   --target HOST:PORT --windows N [--interval S] --out FILE
    moeray placement inspect  --target HOST:PORT [--top 10] [--layer L] [--json]

Mutations (rebalance, policy, scale) send ``authorization: Bearer <token>`` with the token from ``--token-file`` or
``$MOERAY_ADMIN_TOKEN`` (never from a flag's value, which would show in the process list).

The offline commands (``simulate``, ``synth``) live with the simulator (moeray.placement.offline.cli); ``add_parser``
registers both sets in the group.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

from moeray.placement.offline.cli import add_offline_commands


def add_parser(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The ``moeray placement`` group: the commands for a live server (here) and the offline simulator's."""
    placement = sub.add_parser("placement", help="expert placement: a live server's plan and load, the offline "
                                                 "simulator, synthetic traces")
    placement_sub = placement.add_subparsers(dest="placement", required=True)
    add_online_commands(placement_sub)
    add_offline_commands(placement_sub)
    return placement_sub


def add_online_commands(placement_sub: argparse._SubParsersAction) -> None:
    def command(name: str, help: str, func, mutates: bool = False) -> argparse.ArgumentParser:
        p = placement_sub.add_parser(name, help=help)
        p.add_argument("--target", default="127.0.0.1:9000", help="HOST:PORT of a running moeray serve")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
        if mutates:
            p.add_argument("--token-file", help="file holding the admin token (default: $MOERAY_ADMIN_TOKEN)")
        p.set_defaults(func=func)
        return p

    show = command("show", "the plan in force: experts per worker and layer, bytes resident", cmd_show)
    show.add_argument("--json", action="store_true")
    exp = command("export", "write the plan in force to a file that `moeray serve --initial-plan` starts from",
                  cmd_export)
    exp.add_argument("--out", required=True)
    reb = command("rebalance", "compute a new plan from the load window and switch to it", cmd_rebalance, True)
    reb.add_argument("--dry-run", action="store_true", help="show the moves without making them")
    reb.add_argument("--policy", default="", help="use this policy for this rebalance only")
    reb.add_argument("--params", default="", help="its parameters as a JSON object")
    reb.add_argument("--json", action="store_true")
    pol = command("policy", "choose the policy later rebalances use", cmd_policy, True)
    pol.add_argument("name", help="a built-in name or an import path package.module:function")
    pol.add_argument("--params", default="", help="its parameters as a JSON object")
    sc = command("scale", "add or remove expert workers while requests flow", cmd_scale, True)
    sc.add_argument("--workers", type=int, required=True)
    sc.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to this long for the workers to be running and loaded")
    rec = command("record", "write a load trace (JSON Lines) from a live server", cmd_record)
    rec.add_argument("--windows", type=int, required=True, help="windows to record, then stop")
    rec.add_argument("--interval", type=float, default=1.0, help="seconds per window")
    rec.add_argument("--out", required=True)
    ins = command("inspect", "the token ids each expert receives most (needs serve --track-tokens)", cmd_inspect)
    ins.add_argument("--top", type=int, default=10)
    ins.add_argument("--layer", type=int, help="only this MoE layer")
    ins.add_argument("--json", action="store_true")


def _rpc(args, method: str, mutates: bool = False, **fields):
    """One PlacementService call (``method``, its request built from ``fields``) on a channel of its own."""
    import grpc

    from moeray.serving.gen import placement_pb2, placement_pb2_grpc

    request = getattr(placement_pb2, f"{method}Request")(**fields)
    with grpc.insecure_channel(args.target) as channel:
        call = getattr(placement_pb2_grpc.PlacementServiceStub(channel), method)
        return call(request, metadata=_admin_metadata(args) if mutates else None, timeout=args.timeout)


def _admin_metadata(args) -> list[tuple[str, str]]:
    token = None
    if getattr(args, "token_file", None):
        with open(args.token_file) as f:
            token = f.read().strip()
    token = token or os.environ.get("MOERAY_ADMIN_TOKEN")
    return [("authorization", f"Bearer {token}")] if token else []


def _reports_rpc_errors(command):
    """A gRPC error becomes one line on stderr and exit code 2."""
    @functools.wraps(command)
    def run(args) -> int:
        import grpc

        try:
            return command(args)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2

    return run


def _window_load(args) -> dict:
    """GetLoad's window per layer: what each worker received beside what the plan expected, and the gap."""
    r = _rpc(args, "GetLoad")
    return {"window_steps": r.window_steps, "layers": [
        {"worker_tokens": list(x.worker_tokens), "expected_worker_tokens": list(x.expected_worker_tokens),
         "routing_gap": x.routing_gap, "imbalance": x.imbalance, "expected_imbalance": x.expected_imbalance}
        for x in r.layers]}


@_reports_rpc_errors
def cmd_show(args) -> int:
    r = _rpc(args, "GetPlacement")
    load = _window_load(args)
    workers = [{"index": w.index, "node": w.node, "node_id": w.node_id, "device": w.device,
                "resident_bytes": w.resident_bytes} for w in r.workers]
    experts = [[[e for e, sw in zip(layer.phy2log, layer.slot_worker) if sw == w["index"]] for layer in r.layers]
               for w in workers]
    routers = [{"index": x.index, "node_id": x.node_id, "gpu_ids": list(x.gpu_ids), "device": x.device,
                "state": x.state, "running": x.running, "waiting": x.waiting} for x in r.routers]
    out = {"epoch": r.epoch, "policy": r.policy, "slots_per_worker": r.slots_per_worker,
           "redundant_slots": r.redundant_slots, "rebalances": r.rebalances, "workers": workers,
           "experts_per_worker": experts, "target_workers": r.target_workers, "live_workers": r.live_workers,
           "experts_available": r.experts_available, "healing_state": r.healing_state,
           "healing_error": r.healing_error, "topology": r.topology, "routers": routers, "load": load}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"epoch {r.epoch}, policy {r.policy}, {r.rebalances} rebalances, {r.slots_per_worker} slots per worker "
          f"and layer, {r.redundant_slots} redundant per layer")
    print(f"{r.live_workers} of {r.target_workers} workers live, experts "
          f"{'available' if r.experts_available else 'UNAVAILABLE'}, healing: {r.healing_state}"
          + (f" (last failure: {r.healing_error})" if r.healing_error else ""))
    print(f"topology {r.topology or 'colocated'}, {len(routers)} routers")
    for x in routers:
        where = (f"node {x['node_id'][:12]}, {x['device']}"
                 + (f" (GPU {','.join(x['gpu_ids'])})" if x["gpu_ids"] else "")
                 + f", {x['running']} running, {x['waiting']} waiting") if x["state"] == "alive" else x["state"]
        print(f"router {x['index']}: {where}")
    for w, per_layer in zip(workers, experts):
        print(f"worker {w['index']} (node {w['node']}, {w['device']}, {w['resident_bytes'] / 2**20:.1f} MiB): "
              + "; ".join(f"L{l}: {e}" for l, e in enumerate(per_layer)))
    _print_load(load)
    return 0


def _print_load(load: dict) -> None:
    """Per worker, the window's tokens over all layers: received, what the plan expected, and the gap."""
    layers = load["layers"]
    if not layers or not any(sum(x["worker_tokens"]) for x in layers):
        print(f"load window: {load['window_steps']} steps, no tokens yet")
        return
    worst = max(range(len(layers)), key=lambda l: layers[l]["routing_gap"])
    mean = lambda key: sum(x[key] for x in layers) / len(layers)  # noqa: E731
    print(f"load window: {load['window_steps']} steps; imbalance {mean('imbalance'):.3f} realized, "
          f"{mean('expected_imbalance'):.3f} expected by the plan; routing gap {layers[worst]['routing_gap']:.1%} "
          f"at most (layer {worst})")
    for w in range(len(layers[0]["worker_tokens"])):
        got = sum(x["worker_tokens"][w] for x in layers if w < len(x["worker_tokens"]))
        if not all(x["expected_worker_tokens"] for x in layers):  # counted under another worker count
            print(f"  worker {w}: {got} tokens received")
            continue
        want = sum(x["expected_worker_tokens"][w] for x in layers)
        gap = f" ({(got - want) / want:+.1%})" if want else ""
        print(f"  worker {w}: {got} tokens received, {want:.0f} expected{gap}")


@_reports_rpc_errors
def cmd_export(args) -> int:
    import torch

    from moeray.placement.algorithms.plan import Layout
    from moeray.placement.initial import write_plan

    r = _rpc(args, "GetPlacement")
    phy2log_LP = torch.tensor([list(layer.phy2log) for layer in r.layers], dtype=torch.long)
    slot_worker_LP = torch.tensor([list(layer.slot_worker) for layer in r.layers], dtype=torch.long)
    layout = Layout(num_workers=max(len(r.workers), int(slot_worker_LP.max()) + 1),
                    num_experts=int(phy2log_LP.max()) + 1, phy2log_LP=phy2log_LP, slot_worker_LP=slot_worker_LP)
    write_plan(args.out, layout, epoch=r.epoch, policy=r.policy, slots_per_worker=r.slots_per_worker)
    print(f"wrote the plan of epoch {r.epoch} ({layout.num_layers} MoE layers, {layout.num_workers} workers, "
          f"{layout.num_slots} slots per layer) to {args.out}; start from it with --initial-plan {args.out}")
    return 0


@_reports_rpc_errors
def cmd_rebalance(args) -> int:
    r = _rpc(args, "Rebalance", mutates=True, dry_run=args.dry_run, policy=args.policy, params_json=args.params)
    moves = [{"layer": m.layer, "expert": m.expert, "from_worker": m.from_worker, "to_worker": m.to_worker}
             for m in r.moves]
    out = {"epoch": r.epoch, "applied": r.applied, "policy": r.policy, "moved_slots": r.moved_slots,
           "moved_bytes": r.moved_bytes, "imbalance_before": r.imbalance_before,
           "imbalance_after": r.imbalance_after, "moves": moves}
    if args.json:
        print(json.dumps(out))
        return 0
    verb = "applied" if r.applied else "dry run" if args.dry_run else "not applied"
    print(f"{verb}: epoch {r.epoch} ({r.policy}), {r.moved_slots} slots moved ({r.moved_bytes / 2**20:.1f} MiB), "
          f"expected imbalance {r.imbalance_before:.3f} -> {r.imbalance_after:.3f}")
    for m in moves:
        where = f"load on worker {m['to_worker']}" if m["from_worker"] < 0 else f"drop from worker {m['from_worker']}"
        print(f"  layer {m['layer']} expert {m['expert']}: {where}")
    return 0


@_reports_rpc_errors
def cmd_policy(args) -> int:
    r = _rpc(args, "SetPolicy", mutates=True, policy=args.name, params_json=args.params)
    print(f"policy {r.policy}")
    return 0


@_reports_rpc_errors
def cmd_scale(args) -> int:
    r = _rpc(args, "ScaleWorkers", mutates=True, workers=args.workers)
    print(f"scaling to {r.workers} workers (accepted at epoch {r.epoch}); `moeray placement show` shows progress",
          flush=True)
    deadline = time.monotonic() + args.wait
    while args.wait:
        p = _rpc(args, "GetPlacement")
        if p.live_workers == r.workers and p.healing_state == "idle" and p.experts_available:
            print(f"{p.live_workers} workers, epoch {p.epoch}")
            return 0
        if time.monotonic() > deadline:
            print(f"error: {p.live_workers} of {r.workers} workers after {args.wait:.0f}s ({p.healing_state}"
                  + (f": {p.healing_error}" if p.healing_error else "") + ")", file=sys.stderr)
            return 1
        time.sleep(0.5)
    return 0


@_reports_rpc_errors
def cmd_record(args) -> int:
    """Each window is the difference of the server's per-expert token counters over ``--interval`` seconds."""
    from moeray.placement.traces import write_trace

    if args.windows < 1 or args.interval <= 0:
        print(f"error: --windows ({args.windows}) must be >= 1 and --interval ({args.interval}) > 0", file=sys.stderr)
        return 2

    def totals() -> list[list[int]]:
        return [list(layer.expert_tokens_total) for layer in _rpc(args, "GetLoad").layers]

    previous, windows = totals(), []
    for _ in range(args.windows):
        time.sleep(args.interval)
        current = totals()
        windows.append([[c - p for c, p in zip(cl, pl)] for cl, pl in zip(current, previous)])
        previous = current
    write_trace(args.out, windows)
    print(f"wrote {len(windows)} windows of {len(windows[0])} layers to {args.out}")
    return 0


@_reports_rpc_errors
def cmd_inspect(args) -> int:
    r = _rpc(args, "GetLoad", top_tokens=args.top)
    out = []
    for l, layer in enumerate(r.layers):
        if args.layer is not None and l != args.layer:
            continue
        for e, top in enumerate(layer.top_tokens):
            out.append({"layer": l, "expert": e, "tokens_in_window": layer.expert_tokens[e],
                        "top": [{"token_id": t, "count": c, **({"text": x} if top.texts else {})}
                                for t, c, x in zip(top.token_ids, top.counts, list(top.texts) or top.token_ids)]})
    if not any(o["top"] for o in out):
        print("no token counts: start the server with --track-tokens and send it traffic", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
        return 0
    for o in out:
        shown = ", ".join(f"{t.get('text', t['token_id'])!r}x{t['count']}" for t in o["top"])
        print(f"layer {o['layer']} expert {o['expert']}: {shown}")
    return 0
