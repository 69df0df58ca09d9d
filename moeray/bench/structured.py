"""``moeray bench structured``: what a structured output costs. The same streaming /v1/completions load through a
served engine (the demo checkpoint: it has a tokenizer), without a structured output and with two: a regex that
allows any run of letters and spaces (the grammar is active on every token; with min_tokens at max_tokens both it and
the unconstrained run produce every token, so tokens/s compare one to one) and a JSON schema (a realistic one; its
outputs end when the object is complete, so only the per-token figures compare).
"""

from __future__ import annotations

import json

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "enum": ["fox", "dog", "cat"]},
          "age": {"type": "integer", "minimum": 0, "maximum": 99}, "tags": {"type": "array", "items": {
              "type": "string", "enum": ["quick", "lazy", "brown"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
# (name, body fields): the first two bar end-of-sequence until max_tokens (min_tokens), so both produce exactly as
# many tokens and their tokens/s compare one to one
SETTINGS = [("none", {"min_tokens": -1}), ("regex [a-z ]+", {"guided_regex": "[a-z ]+", "min_tokens": -1}),
            ("json schema", {"guided_json": SCHEMA})]


def run_structured_bench(model: str, *, streams: int = 32, requests: int = 64, max_new_tokens: int = 32,
                         workers: int = 2) -> list[dict]:
    from ray import serve

    from moeray.bench.http_load import run_load_http
    from moeray.bench.serve import _prompts
    from moeray.config import EngineConfig
    from moeray.engine import Engine
    from moeray.router.kv_config import KVCacheConfig
    from moeray.serving.app import start_serving
    from moeray.serving.ports import free_port

    rows = []
    # NOTE: no prefix caching: every setting runs the same prompts, and later ones would find them cached
    config = EngineConfig(model=model, workers=workers, max_batch_size=streams,
                          kv_cache=KVCacheConfig(prefix_caching=False))
    with Engine(config) as engine:
        http_port = free_port()
        start_serving(engine, grpc_port=free_port(), http_port=http_port)
        base_url = f"http://127.0.0.1:{http_port}"
        prompts = _prompts(requests, engine.spec.vocab_size, seed=7)
        settings = [(name, {k: max_new_tokens if v == -1 else v for k, v in extra.items()}) for name, extra in SETTINGS]
        for _, extra in settings:  # warm-up: the grammar compiler and its tokenizer load on first use
            run_load_http(base_url, prompts[:2], 2, max_new_tokens, extra=extra)
        print(f"moeray bench structured: {model}, {workers} workers, {requests} streaming /v1/completions requests "
              f"of up to {max_new_tokens} greedy tokens, {streams} at a time")
        print("| structured output | tokens/s | ratio vs none | tokens per request | TTFT p50 ms | ITL p50 ms "
              "| ITL p99 ms | failed |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        base = None
        for name, extra in settings:
            result = run_load_http(base_url, prompts, streams, max_new_tokens, extra=extra)
            s = result.summary()
            base = base or result.tokens_per_s
            row = {"structured": name, **s, "ratio_vs_none": round(result.tokens_per_s / base, 3),
                   "tokens_per_request": round(sum(map(len, filter(None, result.outputs))) / len(prompts), 1)}
            rows.append(row)
            print(f"| {name} | {result.tokens_per_s:.1f} | {row['ratio_vs_none']:.3f} | {row['tokens_per_request']} "
                  f"| {s['ttft_ms_p50']} | {s['itl_ms_p50']} | {s['itl_ms_p99']} | {s['failed']} |",
                  flush=True)
        serve.shutdown()
    print(json.dumps(rows))
    return rows
