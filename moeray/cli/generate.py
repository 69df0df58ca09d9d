"""``moeray generate`` (offline on a local Ray cluster, or against a running server) and ``moeray info``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from moeray.cli.common import (MODEL_HELP, add_initial_flags, add_kv_cache_flags, add_micro_batch_flag,
                               add_thread_flags, init_ray, kv_cache_config, model_dir, parse_ids)


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate offline on a local Ray cluster")
    gen.add_argument("--model", help=MODEL_HELP)
    gen.add_argument("--prompt-ids", type=parse_ids, action="append", help="comma-separated token ids; repeatable")
    gen.add_argument("--prompt", action="append", help="text prompt (needs a tokenizer); repeatable")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--workers", type=int, default=2)
    add_thread_flags(gen)
    add_micro_batch_flag(gen)
    add_kv_cache_flags(gen)
    gen.add_argument("--replicas", type=int, default=0, help="redundant expert slots per MoE layer")
    gen.add_argument("--placement", default="contiguous", choices=["contiguous", "round_robin"])
    add_initial_flags(gen)
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


def add_info_parser(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help="describe a checkpoint: architecture, experts, total vs active params")
    info.add_argument("--model", help=MODEL_HELP)
    info.add_argument("--workers", type=int, default=1, help="bytes resident per worker for this many workers")
    info.add_argument("--replicas", type=int, default=0)
    info.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="compute dtype: of dense weights, biases and unquantized experts")
    info.add_argument("--kv-cache-memory", help="a KV pool size in bytes (8GiB): print the blocks it holds")
    info.add_argument("--kv-block-size", type=int, default=16)
    info.set_defaults(func=cmd_info)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.target:
        return _generate_remote(args)
    from transformers import AutoTokenizer

    from moeray.config import EngineConfig, plan_placement
    from moeray.engine import Engine
    from moeray.model.backbone import inspect_checkpoint
    from moeray.model.checkpoint import CheckpointError
    from moeray.model.hub import local_model_dir
    from moeray.request import InvalidRequest, RequestLimits, SamplingParams

    model = model_dir(args.model)
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
                              router_threads=args.router_threads, kv_cache=kv_cache_config(args),
                              initial_plan=args.initial_plan, initial_load=args.initial_load,
                              micro_batches=args.micro_batches)
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
    init_ray(args.address)
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


def _human(line: dict) -> str:
    out = f"prompt {line['prompt_ids']} -> {line['output_ids']}"
    return out + (f"\n  {line['text']!r}" if "text" in line else "")


def cmd_info(args: argparse.Namespace) -> int:
    from moeray.config import DTYPES
    from moeray.model.backbone import inspect_checkpoint
    from moeray.model.checkpoint import CheckpointError

    try:
        loaded = inspect_checkpoint(model_dir(args.model))
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
