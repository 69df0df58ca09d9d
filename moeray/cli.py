"""The ``moeray`` command line.

    moeray generate [--model DIR|ORG/NAME[@REV]] --prompt-ids 1,2,3 [--prompt-ids 4,5 ...] [--prompt TEXT ...]
                    --max-new-tokens N --workers W [--replicas R] [--dtype float32|bfloat16] [--json]
                    [--initial-plan FILE | --initial-load TRACE]
    moeray generate --target HOST:PORT --prompt-ids 1,2,3 ...     (calls a running server)
    moeray serve [--model DIR] [--port 9000] [--http-port 8000] [--workers N] [--routers N] [--address ADDR]
                 [--served-model-name NAME] [--api-key KEY] [--chat-template FILE] [--drain-timeout 30]
                 [--placement-config FILE] [--initial-plan FILE | --initial-load TRACE]
    moeray info [--model DIR]
    moeray bench layer [--tokens 16,256,2048] [--workers 2]
    moeray bench kernels [--tokens 16,256,2048]
    moeray bench serve [--model DIR] [--concurrency 1,8,32] [--api grpc,http]
    moeray bench kv [--model medium] [--chunk 64]
    moeray bench placement [--windows 12]
    moeray bench heal [--model DIR] [--kills 5]
    moeray placement show | export --out FILE | rebalance [--dry-run] | policy NAME | record --out FILE | inspect
                                                                                              (a running server)
    moeray placement synth --kind zipf|drifting|bursty ... --out FILE
    moeray placement simulate --trace FILE --policy NAME[,NAME...] --workers N [--nodes M] [--redundant R] [--json]
    moeray placement simulate --trace FILE --config FILE --workers N ...   (the controller's own triggers)

With no --model, commands use the embedded demo checkpoint (created on first use). --model also takes a Hugging Face
hub id, org/name[@revision], resolved through huggingface_hub's cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r} must be comma-separated integers") from None


_MODEL_HELP = "HF-format checkpoint directory, or hub id org/name[@revision] (default: the embedded demo)"


def _model_dir(arg: str | None) -> str:
    if arg:
        return arg
    from moeray.model.demo import ensure_demo_checkpoint

    return str(ensure_demo_checkpoint())


def _init_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address or "local", log_to_driver=False, include_dashboard=False,
                 logging_level=logging.WARNING)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.target:
        return _generate_remote(args)
    from transformers import AutoTokenizer

    from moeray.engine import Engine, EngineConfig, plan_placement
    from moeray.model.backbone import inspect_checkpoint
    from moeray.model.checkpoint import CheckpointError
    from moeray.model.hub import local_model_dir
    from moeray.request import InvalidRequest, RequestLimits, SamplingParams

    model = _model_dir(args.model)
    prompts: list[list[int]] = list(args.prompt_ids or [])
    texts: list[str | None] = [None] * len(prompts)
    tokenizer = None
    if args.prompt:
        try:
            tokenizer = AutoTokenizer.from_pretrained(local_model_dir(model), local_files_only=True)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (OSError, ValueError):
            print(f"error: --prompt needs a tokenizer, and {model} has none; use --prompt-ids", file=sys.stderr)
            return 2
        for text in args.prompt:
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            texts.append(text)
    if not prompts:
        print("error: give at least one --prompt-ids or --prompt", file=sys.stderr)
        return 2
    try:
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
        config = EngineConfig(model=model, workers=args.workers, replicas=args.replicas, dtype=args.dtype,
                              placement=args.placement, threads_per_actor=args.worker_threads,
                              router_threads=args.router_threads, kv_cache=_kv_cache_config(args),
                              initial_plan=args.initial_plan, initial_load=args.initial_load)
        # Reject bad input before any cluster starts: the checks need only the checkpoint's headers.
        spec = inspect_checkpoint(model, config.torch_dtype).spec
        plan_placement(config, spec)
        limits = RequestLimits.of(spec, config.max_new_tokens_cap)
        for i, prompt in enumerate(prompts):
            try:
                limits.check(prompt, sampling)
            except InvalidRequest as e:
                raise InvalidRequest(f"prompt {i}: {e}") from None
    except (ValueError, OSError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _init_ray(args.address)
    with Engine(config) as engine:
        logging.getLogger("moeray").info("memory: %s", json.dumps(engine.memory_report()))
        results = engine.generate(prompts, sampling)
    for result, text in zip(results, texts):
        line = result.to_json()
        if text is not None and tokenizer is not None:
            line["text"] = tokenizer.decode(result.output_ids)
        print(json.dumps(line) if args.json else _human(line), flush=True)
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    """Call a running server's GenerateService (the offline mode needs no server)."""
    import grpc

    from moeray.serving.gen import generate_pb2, generate_pb2_grpc

    requests = [generate_pb2.GenerateRequest(prompt_ids=generate_pb2.TokenIds(ids=p)) for p in args.prompt_ids or []]
    requests += [generate_pb2.GenerateRequest(prompt_text=t) for t in args.prompt or []]
    if not requests:
        print("error: give at least one --prompt-ids or --prompt", file=sys.stderr)
        return 2
    with grpc.insecure_channel(args.target) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        for request in requests:
            request.sampling.CopyFrom(generate_pb2.SamplingParams(
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, ignore_eos=args.ignore_eos))
            try:
                chunks = list(stub.Generate(request, timeout=args.timeout))
            except grpc.RpcError as e:
                print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
                return 2
            line = {"prompt_ids": list(request.prompt_ids.ids), "output_ids": [t for c in chunks for t in c.token_ids]}
            if request.HasField("prompt_text"):
                line["text"] = "".join(c.text for c in chunks)
            print(json.dumps(line) if args.json else _human(line), flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import signal
    import threading

    from ray import serve

    from moeray.engine import Engine, EngineConfig, plan_placement
    from moeray.model.backbone import inspect_checkpoint
    from moeray.serving.app import start_serving

    from moeray import telemetry
    from moeray.placement.config import ControllerConfig
    from moeray.serving import lifecycle
    from moeray.serving.auth import API_KEY_ENV

    try:
        controller = ControllerConfig.from_file(
            args.placement_config, policy=args.policy, policy_params=args.policy_params,
            imbalance_threshold=args.imbalance_threshold, consecutive_windows=args.consecutive_windows,
            rebalance_interval_s=args.rebalance_interval_s, window_steps=args.window_steps,
            restore_timeout_s=args.restore_timeout, max_workers=args.max_workers)
        if args.allow_policy_module:  # added to the config file's list
            controller = dataclasses.replace(controller, allowed_policy_modules=(
                *controller.allowed_policy_modules, *args.allow_policy_module))
        if controller.max_workers is not None and controller.max_workers < args.workers:
            raise ValueError(f"--max-workers {controller.max_workers} is below --workers {args.workers}")
        config = EngineConfig(model=_model_dir(args.model), workers=args.workers, replicas=args.replicas,
                              routers=args.routers, dtype=args.dtype, placement=args.placement,
                              threads_per_actor=args.worker_threads, router_threads=args.router_threads,
                              max_new_tokens_cap=args.max_new_tokens_cap, worker_memory=args.worker_memory,
                              track_tokens=args.track_tokens, controller=controller, transport=args.transport,
                              kv_cache=_kv_cache_config(args),
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
    if args.api_key:  # the ingress reads it from its environment (moeray/serving/openai_api.py)
        os.environ[API_KEY_ENV] = args.api_key
    # NOTE: Serve's gRPC proxy reads its message size limit from this variable when it starts; a local cluster's
    # processes inherit it from here (on an existing cluster, set it in the cluster's environment instead).
    os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(args.max_message_bytes)
    _init_ray(args.address)
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
                                 max_ongoing_requests=args.max_ongoing, max_queued_requests=args.max_queued)
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


def _human(line: dict) -> str:
    out = f"prompt {line['prompt_ids']} -> {line['output_ids']}"
    return out + (f"\n  {line['text']!r}" if "text" in line else "")


def cmd_info(args: argparse.Namespace) -> int:
    from moeray.engine import DTYPES
    from moeray.model.backbone import inspect_checkpoint
    from moeray.model.checkpoint import CheckpointError

    try:
        loaded = inspect_checkpoint(_model_dir(args.model))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec, quant = loaded.spec, loaded.index.quant
    itemsize = DTYPES[args.dtype].itemsize
    from moeray.router.kv_config import KVCacheConfig

    kv_bytes = KVCacheConfig(memory=args.kv_cache_memory, block_size=args.kv_block_size).fixed_bytes()
    # a pool given in bytes: the blocks it holds (a fraction depends on the device's memory at start)
    kv_blocks = None if kv_bytes is None else kv_bytes // (spec.kv_bytes_per_token(itemsize) * args.kv_block_size)
    # NOTE: a worker holds ceil((experts + replicas) / workers) slots of every MoE layer (static plans)
    slots = -(-(spec.num_experts + args.replicas) // args.workers)
    print(json.dumps({
        "architecture": spec.architecture, "model_type": spec.model_type, "layers": spec.num_hidden_layers,
        "moe_layers": len(spec.moe_layers), "experts": spec.num_experts, "top_k": spec.top_k,
        "vocab_size": spec.vocab_size, "max_positions": spec.max_positions,
        "total_params": spec.total_params, "active_params": spec.active_params, "dense_params": spec.dense_params,
        "format": quant.label, "block_size": list(quant.block) if quant.block else None,
        "bytes_on_disk": sum(loc.nbytes for loc in loaded.checkpoint.tensors.values()),
        "dtype": args.dtype, "workers": args.workers, "replicas": args.replicas, "slots_per_worker": slots,
        "expert_bytes_per_worker": sum(slots * layer.bytes_per_expert(itemsize) for layer in spec.moe_layers),
        "dense_bytes_per_router": spec.dense_params * itemsize,
        "kv_bytes_per_token": spec.kv_bytes_per_token(itemsize), "kv_block_size": args.kv_block_size,
        "kv_blocks": kv_blocks,
    }))
    return 0


def cmd_bench_layer(args: argparse.Namespace) -> int:
    from moeray.bench.layer import run_layer_bench

    _init_ray(None)
    run_layer_bench(tokens=args.tokens, workers=args.workers, repeats=args.repeats)
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from moeray.bench.kernels import run_kernels_bench

    run_kernels_bench(tokens=args.tokens, repeats=args.repeats)
    return 0


def _add_thread_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads per expert worker")
    parser.add_argument("--router-threads", type=int, default=2,
                        help="torch threads per router: its dense compute runs while its workers wait, so on a CPU "
                        "node it can use their cores (default 2)")


def _add_kv_cache_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("KV cache (per router)")
    group.add_argument("--kv-cache-memory", help="the KV pool's size: bytes (8GiB, 512MB) or a fraction such as 0.9 "
                       "of the device's free memory after the weights (default: 2048 tokens per batch slot)")
    group.add_argument("--kv-block-size", type=int, default=16, help="token positions per KV block (default 16)")
    group.add_argument("--max-prefill-tokens", type=int, default=512,
                       help="prompt tokens a step prefills beside the running streams' next tokens; longer prompts "
                       "are prefilled in chunks (default 512)")
    group.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                       help="do not share KV blocks between requests with the same prompt prefix")


def _kv_cache_config(args: argparse.Namespace):
    from moeray.router.kv_config import KVCacheConfig

    return KVCacheConfig(memory=args.kv_cache_memory, block_size=args.kv_block_size,
                         max_prefill_tokens=args.max_prefill_tokens, prefix_caching=args.prefix_caching)


def _add_initial_flags(parser: argparse.ArgumentParser) -> None:
    first = parser.add_mutually_exclusive_group()
    first.add_argument("--initial-plan", metavar="FILE", help="start on this plan (`moeray placement export --out "
                       "FILE` or `moeray placement show --json` of an earlier run) instead of --placement")
    first.add_argument("--initial-load", metavar="TRACE", help="start on the policy's layout for this recorded load "
                       "trace (JSON Lines: `moeray placement record`, or the controller's trace_path)")


def cmd_bench_kv(args: argparse.Namespace) -> int:
    from moeray.bench.kv import run_kv_bench
    from moeray.bench.serve import medium_checkpoint

    model = args.model
    if model == "medium":
        from moeray.model.demo import demo_checkpoint_dir

        model = medium_checkpoint(str(demo_checkpoint_dir().parent / "bench-medium"))
    _init_ray(None)
    run_kv_bench(_model_dir(model), chunk=args.chunk, streams=args.streams, long_prompt=args.long_prompt,
                 prefix=args.prefix, router_threads=args.router_threads)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from moeray.bench.serve import medium_checkpoint, run_serve_bench

    model = args.model
    if model == "medium":
        from moeray.model.demo import demo_checkpoint_dir

        model = medium_checkpoint(str(demo_checkpoint_dir().parent / "bench-medium"))
    _init_ray(None)
    apis = tuple(dict.fromkeys(a.strip() for a in args.api.split(",") if a.strip()))
    if not apis or set(apis) - {"grpc", "http"}:
        print(f"error: --api {args.api!r} must be grpc, http or a comma-separated list of them", file=sys.stderr)
        return 2
    run_serve_bench(_model_dir(model), args.concurrency, args.requests, args.max_new_tokens, args.workers,
                    router_threads=args.router_threads, worker_threads=args.worker_threads, apis=apis)
    return 0


def cmd_bench_heal(args: argparse.Namespace) -> int:
    from moeray.bench.heal import run_heal_bench

    run_heal_bench(_model_dir(args.model), workers=args.workers, kills=args.kills, requests=args.requests,
                   max_new_tokens=args.max_new_tokens)
    return 0


def cmd_bench_placement(args: argparse.Namespace) -> int:
    from moeray.bench.placement import run_placement_bench

    run_placement_bench(windows=args.windows, tokens=args.tokens, bound_windows=args.bound_windows,
                        bound_time_limit_s=args.bound_time_limit, bound_budget_s=args.bound_budget, seed=args.seed)
    return 0


def _add_placement(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The ``moeray placement`` group; each placement module registers its own commands in it."""
    from moeray.placement.offline_cli import add_offline_commands
    from moeray.placement.online_cli import add_online_commands

    placement = sub.add_parser("placement", help="expert placement: a live server's plan and load, the offline "
                                                 "simulator, synthetic traces")
    placement_sub = placement.add_subparsers(dest="placement", required=True)
    add_online_commands(placement_sub)
    add_offline_commands(placement_sub)
    return placement_sub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate offline on a local Ray cluster")
    gen.add_argument("--model", help=_MODEL_HELP)
    gen.add_argument("--prompt-ids", type=_ids, action="append", help="comma-separated token ids; repeatable")
    gen.add_argument("--prompt", action="append", help="text prompt (needs a tokenizer); repeatable")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--workers", type=int, default=2)
    _add_thread_flags(gen)
    _add_kv_cache_flags(gen)
    gen.add_argument("--replicas", type=int, default=0, help="redundant expert slots per MoE layer")
    gen.add_argument("--placement", default="contiguous", choices=["contiguous", "round_robin"])
    _add_initial_flags(gen)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt, in order")
    gen.add_argument("--target", help="HOST:PORT of a running `moeray serve` (default: run offline)")
    gen.add_argument("--timeout", type=float, default=300.0, help="per-request deadline with --target, seconds")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve over gRPC (moeray.v1, KServe v2, health) and HTTP (OpenAI-compatible "
                         "API) until Ctrl-C / SIGTERM (which drains first)")
    srv.add_argument("--model", help=_MODEL_HELP)
    srv.add_argument("--port", type=int, default=9000, help="gRPC port")
    srv.add_argument("--http-port", type=int, default=8000, help="HTTP port: the OpenAI-compatible API and /health")
    srv.add_argument("--host", default="127.0.0.1", help="address of the HTTP proxy (see README on the gRPC bind)")
    srv.add_argument("--workers", type=int, default=2)
    _add_thread_flags(srv)
    _add_kv_cache_flags(srv)
    srv.add_argument("--replicas", type=int, default=0)
    srv.add_argument("--routers", type=int, default=1)
    srv.add_argument("--transport", default="object_store", choices=["object_store", "compiled_graph"],
                     help="the per-layer data path (compiled_graph: one router only; see README: Data path)")
    srv.add_argument("--placement", default="contiguous", choices=["contiguous", "round_robin"])
    _add_initial_flags(srv)
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
                     "$MOERAY_API_KEY; none: open)")
    srv.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template for /v1/chat/completions, "
                     "replacing the checkpoint's (tokenizer_config.json / chat_template.jinja)")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM / Ctrl-C, seconds to let "
                     "requests in flight finish while refusing new ones (default 30)")
    ctl = srv.add_argument_group("live placement (see README: Placement)")
    ctl.add_argument("--placement-config", help="YAML/JSON file of controller settings (policy, policy_params, "
                     "window_steps, imbalance_threshold, ...); the flags below override it")
    ctl.add_argument("--policy", help="rebalancing policy: a built-in name or package.module:function "
                     "(default: replicated)")
    ctl.add_argument("--policy-params", type=json.loads, help="the policy's parameters as a JSON object")
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

    info = sub.add_parser("info", help="describe a checkpoint: architecture, experts, total vs active params")
    info.add_argument("--model", help=_MODEL_HELP)
    info.add_argument("--workers", type=int, default=1, help="bytes resident per worker for this many workers")
    info.add_argument("--replicas", type=int, default=0)
    info.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="compute dtype: of dense weights, biases and unquantized experts")
    info.add_argument("--kv-cache-memory", help="a KV pool size in bytes (8GiB): print the blocks it holds")
    info.add_argument("--kv-block-size", type=int, default=16)
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    layer = bench_sub.add_parser("layer", help="one MoE layer: moeray vs transformers in-process")
    layer.add_argument("--tokens", type=_ids, default=[16, 256, 2048])
    layer.add_argument("--workers", type=int, default=2)
    layer.add_argument("--repeats", type=int, default=10)
    layer.set_defaults(func=cmd_bench_layer)
    kernels = bench_sub.add_parser("kernels", help="grouped expert compute: moeray kernels vs transformers'")
    kernels.add_argument("--tokens", type=_ids, default=[16, 256, 2048])
    kernels.add_argument("--repeats", type=int, default=10)
    kernels.set_defaults(func=cmd_bench_kernels)
    bserve = bench_sub.add_parser("serve", help="load over gRPC and HTTP vs transformers' generate in one process")
    bserve.add_argument("--model", help="checkpoint, or 'medium' (built on first use; default: the embedded demo)")
    bserve.add_argument("--concurrency", type=_ids, default=[1, 8, 32])
    bserve.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    bserve.add_argument("--max-new-tokens", type=int, default=32)
    bserve.add_argument("--api", default="grpc,http", help="the APIs to load, in order: grpc (Generate), http "
                        "(OpenAI-compatible streaming /v1/completions), or both, comma-separated (default)")
    bserve.add_argument("--workers", type=int, default=2)
    _add_thread_flags(bserve)
    bserve.set_defaults(func=cmd_bench_serve)
    bkv = bench_sub.add_parser("kv", help="the KV cache through the endpoint: a long prompt beside running streams "
                               "(chunked vs whole-prompt prefill), a shared prefix, bytes per cached token")
    bkv.add_argument("--model", default="medium", help="checkpoint, or 'medium' (built on first use; the default)")
    bkv.add_argument("--chunk", type=int, default=64, help="the chunked setting's --max-prefill-tokens")
    bkv.add_argument("--streams", type=int, default=16)
    bkv.add_argument("--long-prompt", type=int, default=768)
    bkv.add_argument("--prefix", type=int, default=512)
    bkv.add_argument("--router-threads", type=int, default=2)
    bkv.set_defaults(func=cmd_bench_kv)
    bheal = bench_sub.add_parser("heal", help="time from a worker's death to full service, and the extra latency "
                                 "of requests in flight, without and with replicas")
    bheal.add_argument("--model", help="checkpoint (default: the embedded demo)")
    bheal.add_argument("--workers", type=int, default=3)
    bheal.add_argument("--kills", type=int, default=5)
    bheal.add_argument("--requests", type=int, default=8)
    bheal.add_argument("--max-new-tokens", type=int, default=48)
    bheal.set_defaults(func=cmd_bench_heal)
    bplace = bench_sub.add_parser("placement", help="placement policies on synthetic traces vs round_robin and "
                                  "optimal's bound")
    bplace.add_argument("--windows", type=int, default=12, help="windows per trace")
    bplace.add_argument("--tokens", type=int, default=16384, help="tokens per window")
    bplace.add_argument("--bound-windows", type=int, default=1, help="last windows of each trace to bound")
    bplace.add_argument("--bound-time-limit", type=float, default=5.0, help="seconds per bound solve")
    bplace.add_argument("--bound-budget", type=float, default=30.0, help="seconds of bound solves per trace")
    bplace.add_argument("--seed", type=int, default=0)
    bplace.set_defaults(func=cmd_bench_placement)

    _add_placement(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
