"""``moeray bench kv``: what the paged KV cache buys, measured through the gRPC endpoint.

For each KV setting (the chunk sizes asked for, and the baseline that prefills a whole prompt in one step, as
moeray did before chunked prefill), one server on 127.0.0.1 and three measurements:

- **long prompt**: ``streams`` streams decode; once each has produced ``warmup`` tokens, one ``long_prompt``-token
  prompt arrives. Reported: the streams' median inter-token gap before it arrived, and their worst gap from its
  arrival until its first token (how long it stalled them), and their median gap in that window.
- **shared prefix**: two requests with the same ``prefix``-token prefix, one after the other; each one's time to
  first token (the second finds the prefix's blocks cached).
- **KV bytes per cached token**: the router's blocks in use x block size x bytes per token, over the tokens its
  sequences hold, sampled while the long prompt runs; against the model's own bytes per token.

Then a burst of requests needing three times a small pool: failures, preemptions, outputs against the same burst
on the first server (whose pool held it all), and the router's resident memory idle and at its peak.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np


async def _stream(stub, prompt: list[int], max_new_tokens: int, arrivals: list[float]) -> list[int]:
    from moeray.serving.gen import generate_pb2

    request = generate_pb2.GenerateRequest(prompt_ids=generate_pb2.TokenIds(ids=prompt),
                                           sampling=generate_pb2.SamplingParams(max_new_tokens=max_new_tokens,
                                                                                ignore_eos=True))
    tokens = []
    async for chunk in stub.Generate(request, timeout=600):
        now = time.perf_counter()
        arrivals.extend([now] * len(chunk.token_ids))  # tokens of one chunk arrived together: a gap of 0 between
        tokens.extend(chunk.token_ids)
    return tokens


async def _long_prompt(address: str, vocab: int, streams: int, warmup: int, long_prompt: int, sample) -> dict:
    import grpc

    from moeray.serving.gen import generate_pb2_grpc

    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, vocab, size=16).tolist() for _ in range(streams)]
    long = rng.integers(3, vocab, size=long_prompt).tolist()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        arrivals = [[] for _ in range(streams)]
        tasks = [asyncio.create_task(_stream(stub, p, 4 * warmup, a)) for p, a in zip(prompts, arrivals)]
        while min(len(a) for a in arrivals) < warmup:
            await asyncio.sleep(0.005)
        arrived = time.perf_counter()
        long_arrivals: list[float] = []
        long_task = asyncio.create_task(_stream(stub, long, 4, long_arrivals))
        kv = None
        while not long_arrivals:  # sampled off the event loop (it must not delay the streams' arrivals), sparingly
            await asyncio.sleep(0.1)
            kv = await asyncio.to_thread(sample)
        first_token = long_arrivals[0]
        await asyncio.gather(long_task, *tasks)
    before = [b - a for s in arrivals for a, b in zip(s, s[1:]) if b < arrived and b > a]
    # a stream's gap that spans the long prompt's arrival..first token, and every gap inside that window
    during = [b - a for s in arrivals for a, b in zip(s, s[1:]) if b >= arrived and a <= first_token]
    median, worst = statistics.median(before), max(during)
    return {"median_gap_ms": round(1e3 * median, 1), "worst_gap_ms": round(1e3 * worst, 1),
            "worst_over_median": round(worst / median, 2), "median_gap_during_ms": round(1e3 * statistics.median(
                during), 1),
            "long_prompt_ttft_ms": round(1e3 * (first_token - arrived), 1), "kv": kv}


async def _prefix(address: str, vocab: int, prefix: int) -> dict:
    import grpc

    from moeray.serving.gen import generate_pb2_grpc

    rng = np.random.default_rng(2)
    shared = rng.integers(3, vocab, size=prefix).tolist()
    ttft = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        for _ in range(2):
            arrivals: list[float] = []
            started = time.perf_counter()
            await _stream(stub, shared + rng.integers(3, vocab, size=8).tolist(), 1, arrivals)
            ttft.append(arrivals[0] - started)
    return {"first_ttft_ms": round(1e3 * ttft[0], 1), "second_ttft_ms": round(1e3 * ttft[1], 1),
            "first_over_second": round(ttft[0] / ttft[1], 2)}


def _burst_prompts(vocab: int, count: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(3, vocab, size=length).tolist() for _ in range(count)]


def _burst(engine, prompts: list[list[int]], max_new_tokens: int) -> tuple[list, dict]:
    """The burst through the engine's router at once; its outputs (None: failed), and the router's stats after."""
    import ray

    from moeray.request import SamplingParams

    sampling = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    refs = [engine.submit(p, sampling) for p in prompts]
    outputs = []
    for ref in refs:
        try:
            outputs.append(ray.get(ref).output_ids)
        except Exception:
            outputs.append(None)
    return outputs, ray.get(engine.routers[0].stats.remote())


def run_kv_bench(model: str, chunks: list[int], streams: int = 16, warmup: int = 16, long_prompt: int = 768,
                 prefix: int = 512, workers: int = 2, router_threads: int = 2) -> list[dict]:
    
    import ray
    from ray import serve

    from moeray.config import EngineConfig
    from moeray.engine import Engine
    from moeray.router.kv_config import KVCacheConfig
    from moeray.serving.app import start_serving
    from moeray.serving.ports import free_port

    rows, reference = [], None
    settings = [("automatic prefill budget (the default)", None)]
    settings += [(f"chunked ({chunk}-token prefill budget)", chunk) for chunk in chunks]
    settings.append((f"baseline: whole prompt in one step ({long_prompt + 256}-token budget)", long_prompt + 256))
    print(f"moeray bench kv: {model}, {workers} workers, 1 router x {router_threads} threads; {streams} streams, "
          f"a {long_prompt}-token prompt, a {prefix}-token shared prefix")
    for name, budget in settings:
        config = EngineConfig(model=model, workers=workers, max_batch_size=2 * streams, router_threads=router_threads,
                              kv_cache=KVCacheConfig(max_prefill_tokens=budget))
        with Engine(config) as engine:
            port = free_port()
            start_serving(engine, grpc_port=port, http_port=free_port())
            address, vocab = f"127.0.0.1:{port}", engine.spec.vocab_size
            router = engine.routers[0]
            sample = lambda: ray.get(router.stats.remote())["kv"]
            asyncio.run(_prefix(address, vocab, 16))  # warm-up
            long = asyncio.run(_long_prompt(address, vocab, streams, warmup, long_prompt, sample))
            kv = long.pop("kv")
            held = kv["blocks_used"] * kv["block_size"] * kv["bytes_per_token"]
            row = {"setting": name, **long, **asyncio.run(_prefix(address, vocab, prefix)),
                   "kv_bytes_per_cached_token": round(held / max(kv["tokens_held"], 1)),
                   "model_kv_bytes_per_token": kv["bytes_per_token"],
                   "kv_overhead": round(held / max(kv["tokens_held"], 1) / kv["bytes_per_token"], 3)}
            rows.append(row)
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            if reference is None:  # the burst, unconstrained: its outputs are the reference below
                burst = _burst_prompts(vocab, 2 * streams, 64)
                reference, _ = _burst(engine, burst, 64)
                per_token = kv["bytes_per_token"]
            serve.shutdown()
    # A burst needing three times the pool: every request completes, with the outputs of the unconstrained run.
    need = sum(len(p) + 64 for p in burst) * per_token
    config = EngineConfig(model=model, workers=workers, max_batch_size=2 * streams, router_threads=router_threads,
                          kv_cache=KVCacheConfig(memory=need // 3, max_prefill_tokens=chunks[0]))
    with Engine(config) as engine:
        idle = ray.get(engine.routers[0].stats.remote())
        outputs, after = _burst(engine, burst, 64)
        weights = ray.get(engine.routers[0].resident_bytes.remote())
    row = {"setting": f"burst of {len(burst)} x (64 + 64) tokens into a pool of a third of it",
           "failed": sum(o is None for o in outputs), "same_outputs_as_unconstrained": outputs == reference,
           "preemptions": after["kv"]["preemptions"], "pool_mb": round(after["kv"]["pool_bytes"] / 2**20, 1),
           "weights_mb": round(weights / 2**20, 1), "idle_rss_mb": round(idle.get("rss_bytes", 0) / 2**20, 1),
           "peak_rss_mb": round(after.get("peak_rss_bytes", 0) / 2**20, 1)}
    rows.append(row)
    print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows
