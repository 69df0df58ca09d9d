"""What the command groups share: flag types and groups, the checkpoint default, starting Ray."""

from __future__ import annotations

import argparse
import logging

from moeray.request import DEFAULT_MAX_FORWARD_TOKENS


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r} must be comma-separated integers") from None


MODEL_HELP = "HF-format checkpoint directory, or hub id org/name[@revision] (default: the embedded demo)"


def model_dir(arg: str | None) -> str:
    if arg:
        return arg
    from moeray.model.demo import ensure_demo_checkpoint

    return str(ensure_demo_checkpoint())


def init_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address or "local", log_to_driver=False, include_dashboard=False,
                 logging_level=logging.WARNING)


def add_thread_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads per expert worker")
    parser.add_argument("--router-threads", type=int, default=2,
                        help="torch threads per router: its dense compute runs while its workers wait, so on a CPU "
                        "node it can use their cores (default 2)")


def micro_batches_arg(text: str) -> int | None:
    """``--micro-batches``: a count, or 'auto' (None)."""
    from moeray.router.overlap import MAX_MICRO_BATCHES

    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--micro-batches {text!r} must be 'auto' or an integer") from None
    if not 1 <= value <= MAX_MICRO_BATCHES:
        raise argparse.ArgumentTypeError(f"--micro-batches {value} must lie in [1, {MAX_MICRO_BATCHES}] or be 'auto'")
    return value


def add_micro_batch_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--micro-batches", type=micro_batches_arg, default=None, metavar="N|auto",
                        help="split each step into N micro-batches that take turns: while one's tokens are with the "
                        "expert workers, the router computes another's dense layers (default auto: 2 when each half "
                        "gives the routed experts >= 32 rows each on average, as in prefill-heavy steps, else 1)")


def add_kv_cache_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("KV cache (per router)")
    group.add_argument("--kv-cache-memory", help="the KV pool's size: bytes (8GiB, 512MB) or a fraction such as 0.9 "
                       "of the device's free memory after the weights (default: 2048 tokens per batch slot)")
    group.add_argument("--kv-block-size", type=int, default=16, help="token positions per KV block (default 16)")
    group.add_argument("--max-prefill-tokens", type=int, default=None,
                       help="prompt tokens a step prefills beside the running streams' next tokens; longer prompts "
                       "are prefilled in chunks (default: chosen each step from measured step costs, so that no "
                       "running stream waits more than twice a decode step)")
    group.add_argument("--max-forward-tokens", type=int, default=DEFAULT_MAX_FORWARD_TOKENS,
                       help="the most tokens one forward sends the expert workers (a step, a scored batch's rows); "
                       "it bounds what a worker's data port accepts (default %(default)s)")
    group.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                       help="do not share KV blocks between requests with the same prompt prefix")


def kv_cache_config(args: argparse.Namespace):
    from moeray.router.kv_config import KVCacheConfig

    return KVCacheConfig(memory=args.kv_cache_memory, block_size=args.kv_block_size,
                         max_prefill_tokens=args.max_prefill_tokens, prefix_caching=args.prefix_caching)


def add_initial_flags(parser: argparse.ArgumentParser) -> None:
    first = parser.add_mutually_exclusive_group()
    first.add_argument("--initial-plan", metavar="FILE", help="start on this plan (`moeray placement export --out "
                       "FILE` or `moeray placement show --json` of an earlier run) instead of --placement")
    first.add_argument("--initial-load", metavar="TRACE", help="start on the policy's layout for this recorded load "
                       "trace (JSON Lines: `moeray placement record`, or the controller's trace_path)")
