"""The ingress's one handle on the engine: which router a request goes to, aborts fanned out to every router, the
experts' health, and the placement controller's calls. The gRPC servicers (moeray/serving/app.py) and the OpenAI
routes (moeray/serving/openai_api.py) both go through it, so they route, abort and refuse alike.

``EngineHandle.of(engine)`` is built where the engine lives (the driver, or ``EngineHost``) and travels to the
ingress replica as a deployment argument: actor handles and the checkpoint's facts, all serialisable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np

from moeray.request import InvalidRequest, RequestLimits, SamplingParams, StreamChunk
from moeray.serving.errors import reason

if TYPE_CHECKING:
    from moeray.model.architecture import ModelSpec
    from moeray.router.scheduler import KVStats
    from moeray.telemetry import TelemetryConfig

HEALTH_TTL_S = 0.5  # how long a health answer is reused (load balancers probe often)
HEALTH_TIMEOUT_S = 2.0


@dataclasses.dataclass(kw_only=True, eq=False)
class EngineHandle:
    routers: list  # router actor handles; requests spread round-robin over them
    controller: Any  # the placement controller's actor handle
    spec: ModelSpec | None = None
    limits: RequestLimits | None = None
    model_name: str = ""
    checkpoint_path: str | None = None  # a directory or a pinned hub id: where the ingress finds the tokenizer
    has_tokenizer: bool = False
    kv_pool: KVStats | None = None  # the first router's KV pool, as it started (GetModelInfo)
    telemetry: TelemetryConfig | None = None  # the ingress process's
    # Per ingress replica, not configuration.
    _next: int = dataclasses.field(default=0, init=False, repr=False)
    _healthy: bool = dataclasses.field(default=True, init=False, repr=False)
    _health_at: float = dataclasses.field(default=-math.inf, init=False, repr=False)

    @classmethod
    def of(cls, engine) -> EngineHandle:
        """What the ingress needs of a ``moeray.Engine``."""
        checkpoint = engine.checkpoint.checkpoint
        return cls(routers=list(engine.routers), controller=engine.controller, spec=engine.spec,
                   limits=engine.limits, model_name=checkpoint.name, checkpoint_path=checkpoint.ref,
                   has_tokenizer=checkpoint.has_tokenizer, kv_pool=engine.kv_pool, telemetry=engine.config.telemetry.for_process("ingress"))

    def _router(self):
        router = self.routers[self._next % len(self.routers)]
        self._next += 1
        return router

    # -- requests ----------------------------------------------------------------------------------------
    async def stream(self, prompt_ids: list[int], sampling: SamplingParams, request_id: str,
                     traceparent: str | None = None) -> AsyncIterator[StreamChunk]:
        """The chunks of one request at the next router. A consumer that stops before the last chunk (a stop
        string, a client gone) aborts it there, freeing its batch slot: close this generator promptly
        (``contextlib.aclosing``)."""
        router = self._router()
        chunks = router.stream.options(num_returns="streaming").remote(prompt_ids, sampling, request_id, traceparent)
        finished = False
        try:
            async for ref in chunks:
                chunk = await ref
                finished = chunk.finish_reason is not None
                yield chunk
        except Exception:
            # NOTE: the router ended the request (or died): nothing to abort, and never another request's id.
            finished = True
            raise
        finally:
            if not finished:
                router.abort.remote(request_id)

    async def abort(self, request_id: str) -> bool:
        """Abort a request on whichever router runs it; False if none does."""
        return any(await asyncio.gather(*[r.abort.remote(request_id) for r in self.routers]))

    async def score(self, ids_BT: np.ndarray, mask_BT: np.ndarray | None, traceparent: str | None,
                    last_only: bool) -> np.ndarray:
        """Logits [B, T, V] (``last_only``: [B, V]) from the next router (``Router.score``)."""
        return np.asarray(await self._router().score.remote(ids_BT, mask_BT, traceparent, last_only=last_only))

    async def experts_available(self) -> bool:
        """Whether every expert has a live replica (the controller's view, at most HEALTH_TTL_S old). An
        unreachable controller (restarting) keeps the last answer: requests never wait on it."""
        now = time.monotonic()
        if now - self._health_at > HEALTH_TTL_S:
            try:
                health = await asyncio.wait_for(self.controller.health.remote(), HEALTH_TIMEOUT_S)
                self._healthy, self._health_at = health["serving"], now
            except Exception:  # noqa: BLE001 - a restarting controller
                pass
        return self._healthy

    # -- placement ---------------------------------------------------------------------------------------
    async def placement(self) -> tuple[dict, dict, list]:
        """The controller's description and health, and each worker's info (an exception for a dead worker)."""
        state = await self.controller.describe.remote()
        health = await self.controller.health.remote()
        workers = await self.controller.workers.remote()  # the controller's list: it may have scaled
        info = await asyncio.gather(*[w.info.remote() for w in workers], return_exceptions=True)
        return state, health, info

    async def load(self, top_tokens: int) -> tuple[dict, list | None]:
        """The load window, and each layer's ``top_tokens`` most routed token ids per expert (0: none)."""
        load = await self.controller.window_load.remote()
        top = await self.controller.top_tokens.remote(top_tokens) if top_tokens else None
        return load, top

    async def rebalance(self, *, dry_run: bool, policy: str | None, params: dict | None) -> dict:
        return await _refusable(self.controller.rebalance.remote(dry_run=dry_run, policy=policy, params=params))

    async def set_policy(self, policy: str, params: dict | None) -> None:
        await _refusable(self.controller.set_policy.remote(policy, params))

    async def request_scale(self, workers: int) -> dict:
        return await _refusable(self.controller.request_scale.remote(workers))


async def _refusable(call):
    """The controller refuses with ValueError (a policy not allowed, bad parameters, a plan or worker count that does
    not fit) and changes nothing: the client's request was invalid."""
    try:
        return await call
    except ValueError as e:
        raise InvalidRequest(reason(e)) from None
