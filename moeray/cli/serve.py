"""``moeray serve``: gRPC and the OpenAI-compatible HTTP API until Ctrl-C / SIGTERM, which drains first."""

from __future__ import annotations

import argparse
import json
import os
import sys

from moeray.cli.common import (MODEL_HELP, add_initial_flags, add_kv_cache_flags, add_micro_batch_flag,
                               add_thread_flags, init_ray, kv_cache_config, model_dir)
from moeray.serving.tool_calls import SYNTAXES


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``serve``."""
    srv = sub.add_parser("serve", help="serve over gRPC (moeray.v1, KServe v2, health) and HTTP (OpenAI-compatible "
                         "API) until Ctrl-C / SIGTERM (which drains first)")
    srv.add_argument("--model", help=MODEL_HELP)
    srv.add_argument("--port", type=int, default=9000, help="gRPC port")
    srv.add_argument("--http-port", type=int, default=8000, help="HTTP port: the OpenAI-compatible API and /health")
    srv.add_argument("--host", default="127.0.0.1", help="address of the HTTP proxy (see README on the gRPC bind)")
    srv.add_argument("--workers", type=int, default=2)
    add_thread_flags(srv)
    add_micro_batch_flag(srv)
    add_kv_cache_flags(srv)
    srv.add_argument("--replicas", type=int, default=0)
    srv.add_argument("--routers", type=int, default=1)
    srv.add_argument("--topology", default="colocated", choices=["colocated", "disaggregated"],
                     help="colocated: any node runs routers and workers; disaggregated: routers on nodes labelled "
                     "moeray.io/role=attention, workers on moeray.io/role=experts (docs/deploy.md)")
    srv.add_argument("--router-gpus", type=float, default=None,
                     help="GPUs per router for the dense parts and the KV cache (default: 1 where the cluster has a "
                     "GPU for every router beside the workers'; 0 keeps routers on CPU)")
    srv.add_argument("--transport", default="tcp", choices=["tcp", "object_store", "compiled_graph", "collective"],
                     help="the per-layer data path (compiled_graph: one router only; collective: a torch.distributed "
                     "group per router, gloo on CPU, NCCL on GPU; tcp: a socket per worker, one message each way; "
                     "see README: Data path)")
    srv.add_argument("--placement", default="contiguous", choices=["contiguous", "round_robin"])
    add_initial_flags(srv)
    srv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    srv.add_argument("--max-new-tokens-cap", type=int, default=4096)
    srv.add_argument("--max-ongoing", type=int, default=256, help="requests in flight before queueing")
    srv.add_argument("--max-queued", type=int, default=256, help="queued requests before RESOURCE_EXHAUSTED")
    srv.add_argument("--max-message-bytes", type=int, default=4 * 2**20,
                     help="largest gRPC request or response; larger ones get RESOURCE_EXHAUSTED (default 4 MiB)")
    srv.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    srv.add_argument("--served-model-name", help="the model name clients use (gRPC, KServe, /v1/models; default: "
                     "the checkpoint directory's name)")
    srv.add_argument("--api-key", default=os.environ.get("MOERAY_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on the HTTP API's /v1 routes (default: "
                     "$MOERAY_API_KEY, which keeps the key out of the process list; none: open)")
    srv.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template for /v1/chat/completions, "
                     "replacing the checkpoint's (tokenizer_config.json / chat_template.jinja)")
    srv.add_argument("--tool-call-parser", choices=sorted(SYNTAXES), help="the tool-call syntax chat answers are "
                     "read for (default: the checkpoint family's: deepseek_v3 for DeepSeek-V3, openai (harmony) for "
                     "gpt-oss, hermes otherwise)")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM / Ctrl-C, seconds to let "
                     "requests in flight finish while refusing new ones (default 30)")
    ctl = srv.add_argument_group("live placement (see README: Placement)")
    ctl.add_argument("--placement-config", help="YAML/JSON file of controller settings (policy, policy_params, "
                     "window_steps, imbalance_threshold, ...); the flags below override it")
    ctl.add_argument("--policy", help="rebalancing policy: a built-in name or package.module:function "
                     "(default: replicated)")
    ctl.add_argument("--policy-params", type=json.loads, help="the policy's parameters as a JSON object")
    ctl.add_argument("--replica-rule", choices=("even", "least_loaded"),
                     help="how a replicated expert's tokens split over its replicas in each step: even (default) or "
                     "least_loaded (toward the step's least loaded workers; more router time per layer)")
    ctl.add_argument("--allow-policy-module", action="append", metavar="MODULE",
                     help="let SetPolicy / Rebalance name functions in this module (repeatable); besides the "
                     "built-ins and --policy, no other policy is accepted over the API")
    ctl.add_argument("--max-workers", type=int, help="most expert workers ScaleWorkers and the autoscaler may reach "
                     "(default: what the cluster's resources hold)")
    ctl.add_argument("--worker-memory", help="memory budget for one worker's expert slots, e.g. 20GiB "
                     "(default: just enough for the experts and --replicas)")
    ctl.add_argument("--rebalance-threshold", type=float, dest="imbalance_threshold",
                     help="rebalance when the plan's expected imbalance stays above this for --rebalance-windows "
                     "windows")
    ctl.add_argument("--rebalance-windows", type=int, dest="consecutive_windows")
    ctl.add_argument("--rebalance-interval", type=float, dest="rebalance_interval_s", help="also every N seconds")
    ctl.add_argument("--window-steps", type=int, help="load window, in steps (default 64)")
    ctl.add_argument("--track-tokens", action="store_true", help="count token ids per expert (placement inspect)")
    ctl.add_argument("--restore-timeout", type=float, help="seconds a step that needs a lost expert waits for its "
                     "restore (replacement workers placed and loaded) before its requests fail (default 120)")
    from moeray.telemetry import add_cli_flags

    add_cli_flags(srv)
    srv.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import signal
    import threading

    from ray import serve

    from moeray.config import EngineConfig, plan_placement
    from moeray.engine import Engine
    from moeray.model.backbone import inspect_checkpoint
    from moeray.serving.app import start_serving
    from moeray.serving.serve_env import set_serving_env

    from moeray import telemetry
    from moeray.placement.config import ControllerConfig
    from moeray.serving import lifecycle
    from moeray.serving.auth import Credentials

    try:
        controller = ControllerConfig.from_file(
            args.placement_config, policy=args.policy, policy_params=args.policy_params,
            imbalance_threshold=args.imbalance_threshold, consecutive_windows=args.consecutive_windows,
            rebalance_interval_s=args.rebalance_interval_s, window_steps=args.window_steps,
            restore_timeout_s=args.restore_timeout, max_workers=args.max_workers, replica_rule=args.replica_rule)
        if args.allow_policy_module:  # added to the config file's list
            controller = dataclasses.replace(controller, allowed_policy_modules=(
                *controller.allowed_policy_modules, *args.allow_policy_module))
        if controller.max_workers is not None and controller.max_workers < args.workers:
            raise ValueError(f"--max-workers {controller.max_workers} is below --workers {args.workers}")
        config = EngineConfig(model=model_dir(args.model), workers=args.workers, replicas=args.replicas,
                              routers=args.routers, topology=args.topology, router_gpus=args.router_gpus,
                              dtype=args.dtype, placement=args.placement,
                              threads_per_actor=args.worker_threads, router_threads=args.router_threads,
                              max_new_tokens_cap=args.max_new_tokens_cap,
                              max_forward_tokens=args.max_forward_tokens, worker_memory=args.worker_memory,
                              track_tokens=args.track_tokens, controller=controller, transport=args.transport,
                              kv_cache=kv_cache_config(args), micro_batches=args.micro_batches,
                              telemetry=telemetry.config_from_args(args), initial_plan=args.initial_plan,
                              initial_load=args.initial_load)
        if config.initial_plan or config.initial_load:  # refused before any cluster starts
            plan_placement(config, inspect_checkpoint(config.model, config.torch_dtype).spec)
        chat_template = None
        if args.chat_template:
            with open(args.chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        if args.drain_timeout < 0:
            raise ValueError(f"--drain-timeout must be >= 0 seconds; got {args.drain_timeout}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    credentials = Credentials.from_env(api_key=args.api_key)  # handed to the ingress, never put in an environment
    # NOTE: Serve's processes read these when they start; a local cluster's processes inherit them from here (on an
    # existing cluster, set them in the cluster's environment instead: deploy/Dockerfile does).
    set_serving_env(args.max_message_bytes)
    init_ray(args.address)
    stop, force = threading.Event(), threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # the first drains, a second stops at once
        signal.signal(sig, lambda *_: force.set() if stop.is_set() else stop.set())
    try:
        # 503 / NOT_SERVING on both ports while the engine loads; start_serving replaces it with the ingress
        lifecycle.serve_loading(grpc_port=args.port, http_port=args.http_port, host=args.host)
        engine = Engine(config)
    except BaseException:
        serve.shutdown()
        raise
    with engine:
        try:
            name = start_serving(engine, grpc_port=args.port, http_port=args.http_port, host=args.host,
                                 model_name=args.served_model_name, chat_template=chat_template,
                                 tool_call_parser=args.tool_call_parser,
                                 max_ongoing_requests=args.max_ongoing, max_queued_requests=args.max_queued,
                                 credentials=credentials)
            print(f"moeray: serving model {name!r} over gRPC on {args.host}:{args.port} and HTTP (OpenAI-compatible) "
                  f"on http://{args.host}:{args.http_port}/v1 ({len(engine.routers)} routers, "
                  f"{len(engine.workers)} expert workers); Ctrl-C stops", flush=True)
            targets = telemetry.prometheus_targets(config.telemetry, routers=config.routers, workers=config.workers)
            if targets:
                print(f"moeray: Prometheus metrics at {', '.join(targets)} (/metrics)", flush=True)
            stop.wait()
            _drain(args.drain_timeout, force)
        finally:
            serve.shutdown()
    return 0


def _drain(timeout_s: float, force) -> None:
    """SIGTERM / Ctrl-C: admit nothing new, let the requests in flight finish (at most ``timeout_s``)."""
    from moeray.serving import lifecycle

    print(f"moeray: draining: no new requests; waiting up to {timeout_s:g} s for those in flight (a second "
          "Ctrl-C / SIGTERM stops at once)", flush=True)
    import threading
    import time

    result: dict = {}

    def run() -> None:
        try:
            result["stats"] = lifecycle.drain(timeout_s=timeout_s, interrupted=force)
        except Exception as e:  # noqa: BLE001 - Serve already going away: shut down anyway
            result["error"] = e

    # NOTE: in a thread, so that a second signal (or a wedged cluster) never leaves the process hanging here
    thread = threading.Thread(target=run, name="moeray-drain", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s + 60
    while thread.is_alive() and not force.is_set() and time.monotonic() < deadline:
        thread.join(0.2)
    if "stats" not in result:
        reason = result.get("error") or ("interrupted" if force.is_set() else "no answer from Serve")
        print(f"moeray: drain cut short ({reason}); shutting down", file=sys.stderr, flush=True)
        return
    left = result["stats"]["admitted"]
    print("moeray: drained; shutting down" if not left else
          f"moeray: {left} requests still in flight after the drain; shutting down", flush=True)
