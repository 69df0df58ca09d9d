"""``moeray bench layer | kernels | serve | kv | heal | placement | spread | structured``: the reproducible benchmarks (moeray/bench/)."""

from __future__ import annotations

import argparse
import sys

from moeray.cli.common import add_micro_batch_flag, add_thread_flags, init_ray, model_dir, parse_ids


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``bench`` group and its commands."""
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    layer = bench_sub.add_parser("layer", help="one MoE layer: moeray vs transformers in-process")
    layer.add_argument("--tokens", type=parse_ids, default=[16, 256, 2048])
    layer.add_argument("--workers", type=int, default=2)
    layer.add_argument("--repeats", type=int, default=10)
    layer.add_argument("--breakdown-tokens", type=parse_ids, default=[1],
                       help="token counts whose per-layer fixed costs are broken down (default 1; empty: none)")
    layer.set_defaults(func=cmd_bench_layer)
    kernels = bench_sub.add_parser("kernels", help="grouped expert compute: moeray kernels vs transformers'")
    kernels.add_argument("--tokens", type=parse_ids, default=[16, 256, 2048])
    kernels.add_argument("--repeats", type=int, default=10)
    kernels.set_defaults(func=cmd_bench_kernels)
    bserve = bench_sub.add_parser("serve", help="load over gRPC and HTTP vs transformers' generate in one process")
    bserve.add_argument("--model", help="checkpoint, or 'medium' (built on first use; default: the embedded demo)")
    bserve.add_argument("--concurrency", type=parse_ids, default=[1, 8, 32])
    bserve.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    bserve.add_argument("--max-new-tokens", type=int, default=32)
    bserve.add_argument("--api", default="grpc,http", help="the APIs to load, in order: grpc (Generate), http "
                        "(OpenAI-compatible streaming /v1/completions), or both, comma-separated (default)")
    bserve.add_argument("--workers", type=int, default=2)
    add_thread_flags(bserve)
    add_micro_batch_flag(bserve)  # overlap "on"; every load also runs with overlap off (1) on the same server
    bserve.add_argument("--transport", default="object_store",
                        help="the data paths to load, in order, one engine each: object_store, tcp, collective or a "
                        "comma-separated list (later ones compare with the first on the same prompts)")
    bserve.add_argument("--ingress", choices=("proxy", "direct"), default="proxy",
                        help="how the load reaches the ingress: through Serve's proxies, as `moeray serve` runs "
                        "(default), or straight to the ingress replica in Ray Serve's throughput-optimized mode "
                        "(RAY_SERVE_THROUGHPUT_OPTIMIZED: no proxy hop; a measurement only, `moeray serve` does "
                        "not run that way yet)")
    bserve.set_defaults(func=cmd_bench_serve)
    bkv = bench_sub.add_parser("kv", help="the KV cache through the endpoint: a long prompt beside running streams "
                               "(chunked vs whole-prompt prefill), a shared prefix, bytes per cached token")
    bkv.add_argument("--model", default="medium", help="checkpoint, or 'medium' (built on first use; the default)")
    bkv.add_argument("--chunks", type=parse_ids, default=[16, 64],
                     help="the chunked settings' --max-prefill-tokens, comma-separated (the first sizes the burst's)")
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
    bheal.add_argument("--victim", choices=("worker", "router"), default="worker",
                       help="what is killed: an expert worker, or one of two routers")
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
    bspread = bench_sub.add_parser("spread", help="replicas of a hot expert, live: the balance the load model "
                                   "predicts of the plan beside the one the workers realize (a skewed checkpoint)")
    bspread.add_argument("--model", help="a skewed checkpoint (default: built, gpt-oss with expert 0 hot)")
    bspread.add_argument("--requests", type=int, default=16)
    bspread.add_argument("--max-new-tokens", type=int, default=32)
    bspread.add_argument("--replicas", type=int, default=8, help="redundant slots per MoE layer")
    bspread.add_argument("--seed", type=int, default=0)
    bspread.set_defaults(func=cmd_bench_spread)
    bstruct = bench_sub.add_parser("structured", help="what a structured output costs: streaming HTTP load without "
                                   "one, with a regex and with a JSON schema (xgrammar)")
    bstruct.add_argument("--model", help="checkpoint with a tokenizer (default: the embedded demo)")
    bstruct.add_argument("--streams", type=int, default=32)
    bstruct.add_argument("--requests", type=int, default=64)
    bstruct.add_argument("--max-new-tokens", type=int, default=32)
    bstruct.add_argument("--workers", type=int, default=2)
    bstruct.set_defaults(func=cmd_bench_structured)


def cmd_bench_layer(args: argparse.Namespace) -> int:
    from moeray.bench.layer import run_layer_bench

    init_ray(None)
    run_layer_bench(tokens=args.tokens, workers=args.workers, repeats=args.repeats,
                    breakdown_tokens=tuple(args.breakdown_tokens))
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from moeray.bench.kernels import run_kernels_bench

    run_kernels_bench(tokens=args.tokens, repeats=args.repeats)
    return 0


def _bench_model(name: str | None) -> str:
    """A checkpoint directory for a bench: 'medium' is built on first use beside the demo model."""
    if name == "medium":
        from moeray.bench.serve import medium_checkpoint
        from moeray.model.demo import demo_checkpoint_dir

        return medium_checkpoint(str(demo_checkpoint_dir().parent / "bench-medium"))
    return model_dir(name)


def cmd_bench_kv(args: argparse.Namespace) -> int:
    from moeray.bench.kv import run_kv_bench

    init_ray(None)
    run_kv_bench(_bench_model(args.model), chunks=args.chunks, streams=args.streams, long_prompt=args.long_prompt,
                 prefix=args.prefix, router_threads=args.router_threads)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from moeray.bench.serve import direct_ingress_env, run_serve_bench
    from moeray.serving.serve_env import set_serving_env

    set_serving_env()  # before Ray starts: Serve's processes read it when they start, as under `moeray serve`
    if args.ingress == "direct":
        direct_ingress_env()
    model = _bench_model(args.model)
    init_ray(None)
    apis = tuple(dict.fromkeys(a.strip() for a in args.api.split(",") if a.strip()))
    if not apis or set(apis) - {"grpc", "http"}:
        print(f"error: --api {args.api!r} must be grpc, http or a comma-separated list of them", file=sys.stderr)
        return 2
    transports = tuple(dict.fromkeys(t.strip() for t in args.transport.split(",") if t.strip()))
    if not transports or set(transports) - {"object_store", "tcp", "collective"}:
        print(f"error: --transport {args.transport!r} must be object_store, tcp, collective or a comma-separated "
              "list of them", file=sys.stderr)
        return 2
    run_serve_bench(model, args.concurrency, args.requests, args.max_new_tokens, args.workers,
                    router_threads=args.router_threads, worker_threads=args.worker_threads, apis=apis,
                    micro_batches=args.micro_batches, transports=transports, direct_ingress=args.ingress == "direct")
    return 0


def cmd_bench_heal(args: argparse.Namespace) -> int:
    from moeray.bench.heal import run_heal_bench

    run_heal_bench(model_dir(args.model), workers=args.workers, kills=args.kills, requests=args.requests,
                   max_new_tokens=args.max_new_tokens, victim=args.victim)
    return 0


def cmd_bench_placement(args: argparse.Namespace) -> int:
    from moeray.bench.placement import run_placement_bench

    run_placement_bench(windows=args.windows, tokens=args.tokens, bound_windows=args.bound_windows,
                        bound_time_limit_s=args.bound_time_limit, bound_budget_s=args.bound_budget, seed=args.seed)
    return 0


def cmd_bench_spread(args: argparse.Namespace) -> int:
    from moeray.bench.spread import run_spread_bench

    run_spread_bench(checkpoint=args.model, requests=args.requests, max_new_tokens=args.max_new_tokens,
                     replicas=args.replicas, seed=args.seed)
    return 0


def cmd_bench_structured(args: argparse.Namespace) -> int:
    from moeray.bench.structured import run_structured_bench
    from moeray.serving.serve_env import set_serving_env

    set_serving_env()  # before Ray starts, as under `moeray serve`
    init_ray(None)
    run_structured_bench(model_dir(args.model), streams=args.streams, requests=args.requests,
                         max_new_tokens=args.max_new_tokens, workers=args.workers)
    return 0
