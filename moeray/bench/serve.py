"""Load against a running gRPC endpoint, and ``moeray bench serve``.

``run_load`` is a bounded asyncio client: a fixed number of streaming Generate requests, at most ``concurrency``
in flight, stopping by itself. It reports tokens/s, time to first token and inter-token latency (p50/p99) and the
failed requests. ``moeray bench serve`` starts a server on 127.0.0.1, runs the load at each concurrency over each
API asked for (``--api grpc,http``: gRPC Generate, and the OpenAI-compatible HTTP API's streaming /v1/completions
through moeray/bench/http_load.py, the same prompts), and in the same run measures transformers' own ``generate``
on the same checkpoint in one process with the same batch.

Each load runs twice on the same server, with micro-batch overlap off (one micro-batch per step) and on (the
``micro_batches`` setting, automatic by default; ``Router.set_micro_batches`` switches between them), on the same
prompts, so the rows compare overlap on and off within one run and check that the tokens are the same. Beside
each row: the step's breakdown from the routers' counters, and the sum of the step's bare round-trip floors (one
per MoE layer: every worker sent ``concurrency`` tokens and back, no compute; ``Router.round_trip_floor``). At
the end it prints the issue's targets (throughput vs transformers at 32 and at 1 stream, step vs floors at 32)
with, for each one missed, the breakdown that says where the step's time went.

``--ingress direct`` measures the same load in Ray Serve's throughput-optimized mode (``direct_ingress_env``): the
ingress replica serves gRPC and HTTP on ports of its own, and the load goes there, without the proxy's hop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import sys
import time

import numpy as np


@dataclasses.dataclass(kw_only=True)
class LoadResult:
    concurrency: int
    requests: int
    failed: int
    tokens: int
    seconds: float
    ttft_s: list[float]
    itl_s: list[float]
    outputs: list[list[int]]
    errors: list[str]

    @classmethod
    def of(cls, concurrency: int, outputs: list, seconds: float, ttft_s: list[float], itl_s: list[float],
           errors: list[str]) -> LoadResult:
        """One load run's result; ``outputs[i]`` is None for a request that failed."""
        done = [o for o in outputs if o is not None]
        return cls(concurrency=concurrency, requests=len(outputs), failed=len(outputs) - len(done),
                   tokens=sum(len(o) for o in done), seconds=seconds, ttft_s=ttft_s, itl_s=itl_s, outputs=outputs,
                   errors=errors)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def summary(self) -> dict:
        pct = lambda xs, q: float(np.percentile(xs, q) * 1e3) if xs else float("nan")
        return {"concurrency": self.concurrency, "requests": self.requests, "failed": self.failed,
                "tokens_per_s": round(self.tokens_per_s, 1),
                "ttft_ms_p50": round(pct(self.ttft_s, 50), 2), "ttft_ms_p99": round(pct(self.ttft_s, 99), 2),
                "itl_ms_p50": round(pct(self.itl_s, 50), 2), "itl_ms_p99": round(pct(self.itl_s, 99), 2)}


async def _load(address: str, prompts: list[list[int]], concurrency: int, max_new_tokens: int,
                timeout_s: float) -> LoadResult:
    import grpc

    from moeray.serving.gen import generate_pb2, generate_pb2_grpc

    gate = asyncio.Semaphore(concurrency)
    ttft, itl, outputs, errors = [], [], [None] * len(prompts), []

    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)

        async def one(i: int, prompt: list[int]) -> None:
            request = generate_pb2.GenerateRequest(
                prompt_ids=generate_pb2.TokenIds(ids=prompt),
                sampling=generate_pb2.SamplingParams(max_new_tokens=max_new_tokens))
            async with gate:
                start = last = time.perf_counter()
                tokens: list[int] = []
                try:
                    async for chunk in stub.Generate(request, timeout=timeout_s):
                        now = time.perf_counter()
                        if chunk.token_ids:
                            if not tokens:
                                ttft.append(now - start)
                            else:  # a chunk may carry several tokens: spread its gap over them
                                itl.extend([(now - last) / len(chunk.token_ids)] * len(chunk.token_ids))
                            last = now
                        tokens.extend(chunk.token_ids)
                    outputs[i] = tokens
                except grpc.aio.AioRpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")

        started = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        seconds = time.perf_counter() - started
    return LoadResult.of(concurrency, outputs, seconds, ttft, itl, errors)


def run_load(address: str, prompts: list[list[int]], concurrency: int, max_new_tokens: int = 16,
             timeout_s: float = 300.0) -> LoadResult:
    return asyncio.run(_load(address, prompts, concurrency, max_new_tokens, timeout_s))


def medium_checkpoint(path: str) -> str:
    """The serving issue's medium model: Mixtral-style, H=1024, 4 layers, 16 experts, I=2048, top-2 (1.7 GB fp32)."""
    import os

    import transformers

    from moeray.model.tiny import save_random_checkpoint

    if not os.path.exists(os.path.join(path, "config.json")):
        config = transformers.MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2048,
                                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                                            num_local_experts=16, num_experts_per_tok=2, max_position_embeddings=4096,
                                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        save_random_checkpoint(config, path, seed=0)
    return path


def _prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(4, 24))).tolist() for _ in range(count)]


def transformers_tokens_per_s(path: str, prompts: list[list[int]], max_new_tokens: int) -> float:
    """transformers' own generate in one process, the same prompts as one left-padded batch, greedy: the faster of
    two runs (so a busy moment can only favour the baseline)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    length = max(map(len, prompts))
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        model.generate(ids[:1, -4:], attention_mask=mask[:1, -4:], max_new_tokens=2, do_sample=False)  # warm-up
        seconds = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
            seconds = min(seconds, time.perf_counter() - start)
    return (out.shape[1] - length) * len(prompts) / seconds


# Issue 18's targets: moeray / transformers' generate at these stream counts (medium checkpoint, overlap on), and a
# step at 32 streams against the sum of its bare round-trip floors (demo checkpoint).
THROUGHPUT_TARGETS = {32: 1.5, 1: 1.0}
FLOOR_TARGET = (32, 3.0)


# Ports per protocol for the ingress replicas of direct ingress: Serve holds a stopped replica's port in quarantine
# for a while, so each engine of a run (one per transport) needs one of its own.
DIRECT_INGRESS_PORTS = 8
_DIRECT_RANGES = {"GRPC": "RAY_SERVE_DIRECT_INGRESS_{}_GRPC_PORT", "HTTP": "RAY_SERVE_DIRECT_INGRESS_{}_HTTP_PORT"}


def direct_ingress_env() -> None:
    """Ray Serve's throughput-optimized mode for this process's local cluster (its documented high-throughput
    setting): the ingress replica serves gRPC and HTTP itself, on ports from a free range per protocol, and the
    requests skip the proxy. Call before Ray starts here: Serve's processes read these variables when they start."""
    if "ray.serve._private.constants" in sys.modules:
        raise RuntimeError("direct ingress must be set before Ray Serve is imported in this process")
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"  # a bench's stop need not wait 30 s
    low = 20000
    for name in _DIRECT_RANGES.values():
        low = _free_range(DIRECT_INGRESS_PORTS, low)
        os.environ[name.format("MIN")], os.environ[name.format("MAX")] = str(low), str(low + DIRECT_INGRESS_PORTS)
        low += DIRECT_INGRESS_PORTS


def _free_range(count: int, start: int) -> int:
    """The first of ``count`` consecutive ports from ``start`` on that nothing on 127.0.0.1 listens on now."""
    for low in range(start, 30000, count):
        if all(_bindable(port) for port in range(low, low + count)):
            return low
    raise RuntimeError(f"no {count} consecutive free ports in 20000-30000")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _direct_port(protocol: str, timeout_s: float = 60.0) -> int:
    """The port of this protocol's range the ingress replica listens on (the range's only listener)."""
    name = _DIRECT_RANGES[protocol]
    low, high = int(os.environ[name.format("MIN")]), int(os.environ[name.format("MAX")])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for port in range(low, high):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return port
            except OSError:
                pass
        time.sleep(0.2)
    raise RuntimeError(f"no ingress replica listens on {protocol} ports {low}-{high - 1}")


def run_serve_bench(model: str, concurrencies: list[int], requests_per_level: int, max_new_tokens: int,
                    workers: int = 2, router_threads: int = 2, worker_threads: int = 1,
                    apis: tuple[str, ...] = ("grpc",), micro_batches: int | None = None,
                    transports: tuple[str, ...] = ("object_store",), direct_ingress: bool = False) -> list[dict]:
    rows, hf, first = [], {}, {}
    for transport in transports:
        rows += _serve_one(model, concurrencies, requests_per_level, max_new_tokens, workers, router_threads,
                           worker_threads, apis, micro_batches, transport, hf, first, direct_ingress)
    overlap = "1" if micro_batches == 1 else "auto" if micro_batches is None else str(micro_batches)
    for transport in transports:
        print_targets([r for r in rows if r["transport"] == transport], overlap, transport)
    return rows


def _serve_one(model: str, concurrencies: list[int], requests_per_level: int, max_new_tokens: int, workers: int,
               router_threads: int, worker_threads: int, apis: tuple[str, ...], micro_batches: int | None,
               transport: str, hf: dict[int, float], first: dict, direct_ingress: bool = False) -> list[dict]:
    """One engine on ``transport``: every load, overlap off and on. transformers' figure per concurrency is measured
    once per run (``hf``); the first transport's loads are kept in ``first`` (by api, overlap, concurrency), and a
    later transport's rows compare with them, on the same prompts."""
    import ray
    from ray import serve

    from moeray.bench.http_load import run_load_http
    from moeray.config import EngineConfig
    from moeray.engine import Engine
    from moeray.router.kv_config import KVCacheConfig
    from moeray.serving.app import start_serving
    from moeray.serving.ports import free_port

    rows = []
    # NOTE: no prefix caching: each load runs twice on the same prompts (overlap off, then on), and the second would
    # otherwise find the first's prompts cached
    config = EngineConfig(model=model, workers=workers, max_batch_size=max(concurrencies), transport=transport,
                          router_threads=router_threads, threads_per_actor=worker_threads, micro_batches=micro_batches,
                          kv_cache=KVCacheConfig(prefix_caching=False))
    overlap = ["1"] if micro_batches == 1 else ["1", "auto" if micro_batches is None else str(micro_batches)]
    with Engine(config) as engine:
        port, http_port = free_port(), free_port()
        start_serving(engine, grpc_port=port, http_port=http_port)
        if direct_ingress:  # the proxies are up too, unused: the load goes to the ingress replica's own ports
            port, http_port = _direct_port("GRPC"), _direct_port("HTTP")
        address, base_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"
        loads = {"grpc": lambda p, c, n: run_load(address, p, c, n),
                 "http": lambda p, c, n: run_load_http(base_url, p, c, n)}
        vocab = engine.spec.vocab_size
        for api in apis:
            loads[api](_prompts(2, vocab, seed=99), 2, 4)  # warm-up
        print(f"moeray bench serve: {model}, transport {transport}, ingress "
              f"{'direct (Serve throughput-optimized)' if direct_ingress else 'through the proxy'}, "
              f"{workers} workers x {worker_threads} threads, "
              f"1 router x {router_threads} threads, greedy, {max_new_tokens} new tokens per request, APIs "
              f"{','.join(apis)}, micro-batches {' vs '.join(overlap)}")
        moe_layers = len(engine.spec.moe_layers)
        first.setdefault("transport", transport)
        for c in concurrencies:
            prompts = _prompts(max(requests_per_level, c), vocab, seed=c)
            if c not in hf:
                hf[c] = transformers_tokens_per_s(engine.checkpoint.checkpoint.path, prompts[:c], max_new_tokens)
            floor_ms = 1e3 * moe_layers * ray.get(engine.routers[0].round_trip_floor.remote(c))
            store_floor_ms = floor_ms if transport == "object_store" else \
                1e3 * moe_layers * ray.get(engine.routers[0].round_trip_floor.remote(c, transport="object_store"))
            outputs = {}
            for api in apis:
                for setting in overlap:
                    ray.get([r.set_micro_batches.remote(None if setting == "auto" else int(setting))
                             for r in engine.routers])
                    before = ray.get([r.stats.remote() for r in engine.routers])
                    result = loads[api](prompts, c, max_new_tokens)
                    after = ray.get([r.stats.remote() for r in engine.routers])
                    row = {"transport": transport, "ingress": "direct" if direct_ingress else "proxy", "api": api,
                           "micro_batches": setting, **result.summary(),
                           "hf_generate_tokens_per_s": round(hf[c], 1),
                           "ratio_vs_hf": round(result.tokens_per_s / hf[c], 3),
                           **_step_breakdown(before, after), "step_floor_ms": round(floor_ms, 2),
                           "store_floor_ms": round(store_floor_ms, 2)}
                    row["step_x_floor"] = round(row["step_ms"] / floor_ms, 2)
                    row["step_x_store_floor"] = round(row["step_ms"] / store_floor_ms, 2)
                    if setting != overlap[0]:  # against overlap off, on the same prompts
                        off = outputs[(api, overlap[0])]
                        row["ratio_vs_off"] = round(result.tokens_per_s / off.tokens_per_s, 3)
                        row["same_outputs"] = result.outputs == off.outputs
                    elif api != apis[0]:  # against the first API, on the same prompts
                        base = outputs[(apis[0], setting)]
                        row[f"ratio_vs_{apis[0]}"] = round(result.tokens_per_s / base.tokens_per_s, 3)
                        row["same_outputs"] = result.outputs == base.outputs
                    if transport == first["transport"]:
                        first[(api, setting, c)] = result
                    else:  # against the first transport's load, on the same prompts
                        base, name = first[(api, setting, c)], first["transport"]
                        row[f"ratio_vs_{name}"] = round(result.tokens_per_s / base.tokens_per_s, 3)
                        row[f"same_outputs_as_{name}"] = result.outputs == base.outputs
                    outputs[(api, setting)] = result
                    if result.errors:
                        row["first_error"] = result.errors[0]
                    rows.append(row)
                    print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        ray.get([r.set_micro_batches.remote(micro_batches) for r in engine.routers])
        serve.shutdown()
    return rows


def print_targets(rows: list[dict], on: str, transport: str = "object_store") -> None:
    """The issue's targets, each met or not; for one missed, the step breakdown of its row says why."""
    why = ("step {step_ms} ms = outside the forward {outside_forward_ms} + router dense {dense_ms} + dispatch "
           "bookkeeping {dispatch_router_ms} + router idle waiting on experts {expert_wait_ms} (round trips "
           "{dispatch_send_ms} in all; steps split {split_steps}); sum of bare round-trip floors {step_floor_ms}")
    first_api = rows[0]["api"] if rows else None
    for streams, target in sorted(THROUGHPUT_TARGETS.items(), reverse=True):
        row = next((r for r in rows if r["concurrency"] == streams and r["micro_batches"] == on
                    and r["api"] == first_api), None)
        if row is None:
            continue
        met = row["ratio_vs_hf"] >= target
        print(f"target (medium checkpoint): {transport}, {streams} streams, overlap {on}: moeray / transformers "
              f"{row['ratio_vs_hf']:.2f}x >= {target}x: {'met' if met else 'NOT met'}")
        if not met:
            print("  why: " + why.format(**row))
    streams, target = FLOOR_TARGET
    row = next((r for r in rows if r["concurrency"] == streams and r["micro_batches"] == on
                and r["api"] == first_api), None)
    if row is not None:
        met = row["step_x_floor"] <= target
        print(f"target (demo checkpoint): {transport}, {streams} streams, overlap {on}: step {row['step_ms']} ms / "
              f"sum of its bare round-trip floors {row['step_floor_ms']} ms = {row['step_x_floor']:.2f}x <= {target}x: "
              f"{'met' if met else 'NOT met'} (against the object store's floors {row['store_floor_ms']} ms: "
              f"{row['step_x_store_floor']:.2f}x)")
        if not met:
            print("  why: " + why.format(**row))


def _step_breakdown(before: list[dict], after: list[dict]) -> dict:
    """Per engine step, from the routers' counters: wall time = outside the forward (scheduling, sampling, streaming
    tokens) + the forwards; the forwards = the router computing (its turns held: dense layers, and the dispatcher's
    bookkeeping around each layer) + the router idle, waiting on expert workers with nothing to compute. Beside it,
    the time in the transport's sends summed over micro-batches (what overlapped is that minus the idle wait), the
    share of steps split in micro-batches, and the KV cache's preemptions and prefix-cache hit rate."""
    delta = {k: sum(a[k] - b[k] for a, b in zip(after, before))
             for k in ("steps", "step_s", "forward_s", "router_busy_s", "micro_batch_steps")}
    sends = {k: sum(a["dispatch"][k] - b["dispatch"][k] for a, b in zip(after, before))
             for k in ("prepare_s", "send_s", "combine_s")}
    steps = max(delta["steps"], 1)
    ms = lambda seconds: round(1e3 * seconds / steps, 2)
    bookkeeping = sends["prepare_s"] + sends["combine_s"]
    kv = {k: sum(a["kv"][k] - b["kv"][k] for a, b in zip(after, before)) for k in ("preemptions", "prefix_queries",
                                                                                   "prefix_hits")}
    return {"step_ms": ms(delta["step_s"]), "outside_forward_ms": ms(delta["step_s"] - delta["forward_s"]),
            "dense_ms": ms(delta["router_busy_s"] - bookkeeping), "dispatch_router_ms": ms(bookkeeping),
            "expert_wait_ms": ms(delta["forward_s"] - delta["router_busy_s"]),
            "dispatch_send_ms": ms(sends["send_s"]), "split_steps": round(delta["micro_batch_steps"] / steps, 2),
            "kv_preemptions": kv["preemptions"],
            "prefix_hit_rate": round(kv["prefix_hits"] / max(kv["prefix_queries"], 1), 3)}
