"""The ingress's one handle on the engine: which router a request goes to, aborts fanned out to every router, the
experts' health, and the placement controller's calls. The gRPC servicers (moeray/serving/app.py) and the OpenAI
routes (moeray/serving/openai_api.py) both go through it, so they route, abort and refuse alike.

``EngineHandle.of(engine)`` is built where the engine lives (the driver, or ``EngineHost``) and travels to the
ingress replica as a deployment argument: actor handles and the checkpoint's facts, all serialisable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.exceptions import RayActorError

from moeray import telemetry
from moeray.request import MAX_MIGRATIONS, InvalidRequest, RequestLimits, SamplingParams, StreamChunk
from moeray.router.feed import FeedClosed
from moeray.serving.errors import reason

if TYPE_CHECKING:
    from moeray.model.architecture import ModelSpec
    from moeray.router.scheduler import KVStats
    from moeray.telemetry import TelemetryConfig

log = logging.getLogger(__name__)

HEALTH_TTL_S = 0.5  # how long a health answer is reused (load balancers probe often)
HEALTH_TIMEOUT_S = 2.0
ROUTER_DOWN_S = 10.0  # how long a router that died is passed over (Ray restarts it on a live node meanwhile)
PLACEMENT_TIMEOUT_S = 2.0  # how long GetPlacement waits for a router's answer (a restarting one says so)
MAX_FEED_REOPENS = 3  # a request that finds its feed just ended tries a new one this many times


class _FeedReader:
    """One feed from one router: a task reads its batches and hands each chunk (or error) to its request's queue;
    requests start on it once the router has it open (``ready``). When the feed ends, every request still reading it
    gets the cause: the router's death (RayActorError), or FeedClosed when it ended idle (only a request whose start
    is still in flight can be left then)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.feed_id = uuid.uuid4().hex
        self.queues: dict[int, asyncio.Queue] = {}
        self.ready = asyncio.Event()  # the router has the feed open (its first, empty batch came), or it ended
        self.ended = False
        self.end: BaseException = FeedClosed(f"feed {self.feed_id} ended")
        self.task: asyncio.Task | None = None
        self._keys = itertools.count()

    def open(self) -> tuple[int, asyncio.Queue]:
        key, chunks = next(self._keys), asyncio.Queue()
        self.queues[key] = chunks
        return key, chunks

    def close(self, key: int) -> None:
        self.queues.pop(key, None)

    async def read(self, router) -> None:
        try:
            async for ref in router.feed.options(num_returns="streaming").remote(self.feed_id):
                batch = await ref
                self.ready.set()
                for key, chunk in batch.chunks.items():
                    if key in self.queues:  # NOTE: a request whose reader left is aborted; its last chunks drop
                        self.queues[key].put_nowait(chunk)
                for key, error in batch.errors.items():
                    if key in self.queues:
                        self.queues[key].put_nowait(error)
        except Exception as e:  # noqa: BLE001 - handed to every request on this feed
            self.end = e
        finally:
            self.ended = True
            self.ready.set()
            for chunks in self.queues.values():
                chunks.put_nowait(self.end)


@dataclasses.dataclass(kw_only=True, eq=False)
class EngineHandle:
    routers: list  # router actor handles; each request goes to the one with the fewest of this ingress's requests
    controller: Any  # the placement controller's actor handle
    spec: ModelSpec | None = None
    limits: RequestLimits | None = None
    model_name: str = ""
    checkpoint_path: str | None = None  # a directory or a pinned hub id: where the ingress finds the tokenizer
    has_tokenizer: bool = False
    kv_pool: KVStats | None = None  # the first router's KV pool, as it started (GetModelInfo)
    telemetry: TelemetryConfig | None = None  # the ingress process's
    topology: str = "colocated"  # how routers and workers are placed (GetPlacement)
    # Per ingress replica, not configuration.
    _next: int = dataclasses.field(default=0, init=False, repr=False)
    _in_flight: dict = dataclasses.field(default_factory=dict, init=False, repr=False)  # router index -> requests
    _down_until: dict = dataclasses.field(default_factory=dict, init=False, repr=False)  # router index -> time
    _readers: dict = dataclasses.field(default_factory=dict, init=False, repr=False)  # router index -> _FeedReader
    _healthy: bool = dataclasses.field(default=True, init=False, repr=False)
    _health_at: float = dataclasses.field(default=-math.inf, init=False, repr=False)

    def __getstate__(self) -> dict:
        # NOTE: feeds belong to one replica's event loop; a copy sent elsewhere opens its own
        return {**vars(self), "_readers": {}}

    @classmethod
    def of(cls, engine) -> EngineHandle:
        """What the ingress needs of a ``moeray.Engine``."""
        checkpoint = engine.checkpoint.checkpoint
        return cls(routers=list(engine.routers), controller=engine.controller, spec=engine.spec,
                   limits=engine.limits, model_name=checkpoint.name, checkpoint_path=checkpoint.ref,
                   has_tokenizer=checkpoint.has_tokenizer, kv_pool=engine.kv_pool,
                   telemetry=engine.config.telemetry.for_process("ingress"), topology=engine.config.topology)

    def _pick(self, avoid: frozenset[int] = frozenset()) -> int:
        """The least-loaded router (this ingress's requests in flight on each), skipping ``avoid`` and routers that
        just failed (their node lost: Ray restarts them elsewhere) while any other is left; ties go round-robin."""
        now = time.monotonic()
        candidates = [i for i in range(len(self.routers)) if i not in avoid and self._down_until.get(i, 0) <= now]
        if not candidates:
            candidates = [i for i in range(len(self.routers)) if i not in avoid] or list(range(len(self.routers)))
        start = self._next
        self._next += 1
        return min(candidates, key=lambda i: (self._in_flight.get(i, 0), (i - start) % len(self.routers)))

    def _router(self):
        return self.routers[self._pick()]

    def _failed(self, index: int) -> None:
        """Router ``index`` died: new requests go to the others for a while (it is being restarted elsewhere)."""
        self._down_until[index] = time.monotonic() + ROUTER_DOWN_S

    # -- requests ----------------------------------------------------------------------------------------
    async def stream(self, prompt_ids: list[int], sampling: SamplingParams, request_id: str,
                     traceparent: str | None = None) -> AsyncIterator[StreamChunk]:
        """The chunks of one request at the least-loaded router, through this ingress's feed from that router
        (``moeray.router.feed``: one Ray stream per router for all of this ingress's requests there). A router that
        dies (its node lost) costs the request nothing: it goes on at another router (or the same one, restarted,
        when no other is left) from the tokens it already streamed, which that router recomputes with the prompt
        (``Router.start``'s ``resumed``), so the stream continues with no token repeated or missing; greedy output is
        what it would have been, and so is a seeded one (the seed and the count of tokens are the sampler's state).
        After MAX_MIGRATIONS such moves it fails with the router's error (UNAVAILABLE). A consumer that stops before
        the last chunk (a stop string, a client gone) aborts it there, freeing its batch slot: close this generator
        promptly (``contextlib.aclosing``)."""
        tried: set[int] = set()
        reopened = migrations = 0
        streamed: list[int] = []  # its tokens so far: where a move to another router resumes it from
        while True:
            index = self._pick(frozenset(tried))
            tried.add(index)
            router = self.routers[index]
            reader = self._reader(index)
            key, chunks = reader.open()
            sent, finished = False, False
            self._in_flight[index] = self._in_flight.get(index, 0) + 1
            try:
                await reader.ready.wait()
                if reader.ended:  # before the router had it open: its death, or a refusal
                    raise reader.end
                await router.start.remote(prompt_ids, sampling, request_id, reader.feed_id, key, traceparent,
                                          streamed)
                while True:
                    item = await chunks.get()
                    if isinstance(item, BaseException):
                        raise item
                    finished = item.finish_reason is not None
                    sent = sent or bool(item.token_ids)
                    streamed.extend(item.token_ids)
                    yield item
                    if finished:
                        return
            except FeedClosed:
                # The feed is not open there (it ended idle as this request came, or the router restarted):
                # nothing started; a new feed, the same router.
                finished = True
                reader.ended = True  # NOTE: its reading task may not have seen the end yet
                tried.discard(index)
                reopened += 1
                if sent or reopened > MAX_FEED_REOPENS:
                    raise
            except RayActorError:
                # NOTE: the router ended the request by dying: nothing to abort, and never another request's id.
                finished = True
                self._failed(index)
                if streamed:
                    migrations += 1
                    if migrations > MAX_MIGRATIONS:
                        raise
                    tried = {index}  # any other router; this one (restarted by Ray) only when none is left
                    telemetry.request_migrated()
                    log.warning("router %d died while request %s ran (%d tokens streamed): it goes on at another "
                                "router from them", index, request_id, len(streamed))
                    continue
                if len(tried) == len(self.routers):
                    raise
                log.warning("router %d died before request %s had a token: starting it on another router", index,
                            request_id)
            except Exception:
                finished = True  # the router ended the request: nothing to abort
                raise
            finally:
                reader.close(key)
                self._in_flight[index] -= 1
                if not finished:
                    router.abort.remote(request_id)

    def _reader(self, index: int) -> _FeedReader:
        """This ingress's feed from router ``index``, opened on first use and again after it ended (on this event
        loop: the queues and the reading task belong to one)."""
        loop = asyncio.get_running_loop()
        reader = self._readers.get(index)
        if reader is None or reader.ended or reader.loop is not loop:
            reader = self._readers[index] = _FeedReader(loop=loop)
            reader.task = loop.create_task(reader.read(self.routers[index]))
        return reader

    async def abort(self, request_id: str) -> bool:
        """Abort a request on whichever router runs it; False if none does."""
        return any(await asyncio.gather(*[r.abort.remote(request_id) for r in self.routers]))

    async def score(self, ids_BT: np.ndarray, mask_BT: np.ndarray | None, traceparent: str | None,
                    last_only: bool) -> np.ndarray:
        """Logits [B, T, V] (``last_only``: [B, V]) from the least-loaded router (``Router.score``)."""
        return np.asarray(await self._forward_only(lambda r: r.score.remote(ids_BT, mask_BT, traceparent,
                                                                            last_only=last_only)))

    async def prompt_logprobs(self, prompt_ids: list[int], top: int, traceparent: str | None = None) -> list:
        """Each prompt position's TokenLogprob (None first) from the least-loaded router (``Router.prompt_logprobs``)."""
        return await self._forward_only(lambda r: r.prompt_logprobs.remote(prompt_ids, top, traceparent))

    async def _forward_only(self, call):
        """``call(router)`` at the least-loaded router; one that dies meanwhile is passed over and the next one asked
        (a forward without generation has no side effects)."""
        tried: set[int] = set()
        while True:
            index = self._pick(frozenset(tried))
            tried.add(index)
            self._in_flight[index] = self._in_flight.get(index, 0) + 1
            try:
                return await call(self.routers[index])
            except RayActorError:
                self._failed(index)
                if len(tried) == len(self.routers):
                    raise
            finally:
                self._in_flight[index] -= 1

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
    async def placement(self) -> tuple[dict, dict, list, list, str]:
        """The controller's description and health, each worker's info (an exception for a dead worker), each
        router's (``Router.where``; an exception for one that did not answer in time), and the topology."""
        state = await self.controller.describe.remote()
        health = await self.controller.health.remote()
        workers = await self.controller.workers.remote()  # the controller's list: it may have scaled
        info = await asyncio.gather(*[w.info.remote() for w in workers], return_exceptions=True)
        routers = await asyncio.gather(*[asyncio.wait_for(_awaitable(r.where.remote()), PLACEMENT_TIMEOUT_S)
                                         for r in self.routers], return_exceptions=True)
        return state, health, info, routers, self.topology

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


async def _awaitable(ref):
    return await ref


async def _refusable(call):
    """The controller refuses with ValueError (a policy not allowed, bad parameters, a plan or worker count that does
    not fit) and changes nothing: the client's request was invalid."""
    try:
        return await call
    except ValueError as e:
        raise InvalidRequest(reason(e)) from None
