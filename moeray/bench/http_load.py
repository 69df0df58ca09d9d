"""Load against a running server's OpenAI-compatible HTTP API: ``run_load``'s twin for ``moeray bench serve --api http``.

A bounded asyncio client (aiohttp, which Ray Serve installs): a fixed number of streaming ``/v1/completions``
requests with token-id prompts (greedy, ``return_token_ids`` so that tokens are counted and compared exactly as over
gRPC), at most ``concurrency`` in flight. It reads the server-sent events as they arrive and reports the same
``LoadResult`` as the gRPC client: tokens/s, time to first token, inter-token latency, failures.
"""

from __future__ import annotations

import asyncio
import json
import time

from moeray.bench.serve import LoadResult


async def _load_http(base_url: str, prompts: list[list[int]], concurrency: int, max_new_tokens: int,
                     timeout_s: float, api_key: str | None, model: str | None, extra: dict | None) -> LoadResult:
    import aiohttp

    gate = asyncio.Semaphore(concurrency)
    ttft, itl, outputs, errors = [], [], [None] * len(prompts), []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/completions"
    connector = aiohttp.TCPConnector(limit=concurrency)

    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def one(i: int, prompt: list[int]) -> None:
            body = {"prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0, "stream": True,
                    "return_token_ids": True}
            if model:
                body["model"] = model
            body.update(extra or {})
            async with gate:
                start = last = time.perf_counter()
                tokens: list[int] = []
                try:
                    async with session.post(url, json=body) as response:
                        if response.status != 200:
                            errors.append(f"HTTP {response.status}: {(await response.text())[:200]}")
                            return
                        async for line in response.content:
                            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                                continue
                            event = json.loads(line[6:])
                            if "error" in event:
                                raise RuntimeError(event["error"]["message"])
                            new = [t for c in event["choices"] for t in c.get("token_ids", ())]
                            now = time.perf_counter()
                            if new:
                                if not tokens:
                                    ttft.append(now - start)
                                else:  # an event may carry several tokens: spread its gap over them
                                    itl.extend([(now - last) / len(new)] * len(new))
                                last = now
                            tokens.extend(new)
                    outputs[i] = tokens
                except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError, ValueError) as e:
                    errors.append(f"{type(e).__name__}: {e}")

        started = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        seconds = time.perf_counter() - started
    return LoadResult.of(concurrency, outputs, seconds, ttft, itl, errors)


def run_load_http(base_url: str, prompts: list[list[int]], concurrency: int, max_new_tokens: int = 16,
                  timeout_s: float = 300.0, api_key: str | None = None, model: str | None = None,
                  extra: dict | None = None) -> LoadResult:
    """Streaming /v1/completions requests against ``base_url`` (e.g. http://127.0.0.1:8000); ``extra``: more body
    fields (a structured output, say)."""
    return asyncio.run(_load_http(base_url, prompts, concurrency, max_new_tokens, timeout_s, api_key, model, extra))
