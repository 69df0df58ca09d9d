"""The router actor: the dense parts of the model, the batching scheduler, and dispatch to expert workers.

A threaded Ray actor: callers block in ``generate`` on their own thread while one loop thread steps the batch. The
in-process engine (``moeray.local_engine``) runs the same class as a plain object, so Ray is imported only where a
controller actor is called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import queue
import statistics
import threading
import time
from collections.abc import Iterator

import numpy as np
import torch
from transformers import GenerationConfig

from moeray import telemetry
from moeray.model.backbone import build_backbone, resident_bytes
from moeray.placement.algorithms.plan import Plan
from moeray.request import (DEFAULT_MAX_FORWARD_TOKENS, MAX_LOGPROBS, GenerationResult, InvalidRequest,
                            RequestLimits, SamplingParams, StreamChunk, check_request_id, new_request_id)
from moeray.router.dispatch import ExpertDispatcher, ExpertsUnavailable
from moeray.router.feed import FeedBatch, Feeds
from moeray.router.kv_config import KVCacheConfig
from moeray.router.overlap import auto_min_tokens, plan_micro_batches
from moeray.router.scheduler import KVStats, Scheduler
from moeray.router.grammar import Grammars
from moeray.router.sequence import Sequence, token_logprobs
from moeray.transport import WorkerCall, make_transport, pack

log = logging.getLogger(__name__)


def _eos_ids(checkpoint_path: str, config) -> frozenset[int]:
    try:
        eos = GenerationConfig.from_pretrained(checkpoint_path, local_files_only=True).eos_token_id
    except OSError:  # no generation_config.json
        eos = getattr(config.get_text_config(), "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _memory() -> dict:
    """This process's resident memory now and at its peak (Linux /proc; empty elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    except OSError:
        return {}
    return {"rss_bytes": int(fields["VmRSS"].split()[0]) * 1024, "peak_rss_bytes": int(fields["VmHWM"].split()[0]) * 1024}


class Router:
    def __init__(
        self,
        *,
        checkpoint_path: str,
        dtype: torch.dtype,
        plan: Plan,
        workers: list,
        max_batch_size: int = 32,
        max_new_tokens_cap: int = 4096,
        max_forward_tokens: int = DEFAULT_MAX_FORWARD_TOKENS,
        num_threads: int = 1,
        track_tokens: bool = False,
        restore_timeout_s: float = 120.0,
        controller_name: str | None = None,
        telemetry_config: telemetry.TelemetryConfig | None = None,
        transport: str = "tcp",
        kv_cache: KVCacheConfig = KVCacheConfig(),
        device: str | None = None,
        micro_batches: int | None = None,
        replica_rule: str = "even",
    ) -> None:
        torch.set_num_threads(num_threads)
        telemetry.setup(telemetry_config)
        # The dense parts and the KV cache run on ``device``: "cuda" where the router holds a GPU (as the engine
        # asks), "cpu" otherwise; None: CUDA when this process sees it. NOTE: a GPU Ray accounts for but CUDA does
        # not show (a test cluster's declared GPUs) runs on CPU, as expert workers do.
        if device is None or device == "cuda":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        # A router Ray restarted after a crash finds the controller by name and starts on the plan in force now,
        # not on the one it was first given (the controller does not exist yet at the first start).
        self.controller = None
        if controller_name is not None:
            import ray

            try:
                self.controller = ray.get_actor(controller_name)
                plan, workers = ray.get(self.controller.plan_and_workers.remote())
            except ValueError:
                pass
        # NOTE: the transport is built here, in this process: a compiled graph runs only where it was compiled.
        self.transport_name = transport
        self.dispatcher = ExpertDispatcher(plan, make_transport(transport, workers), track_tokens=track_tokens,
                                           replica_rule=replica_rule)
        self.model, loaded = build_backbone(checkpoint_path, dtype, self.dispatcher, device=device)
        self.spec = loaded.spec
        self.eos_ids = _eos_ids(loaded.checkpoint.path, loaded.checkpoint.config)  # a directory, also for a hub id
        self.grammars = Grammars(str(loaded.checkpoint.path), self.spec.vocab_size, self.eos_ids)
        self.limits = RequestLimits.of(self.spec, max_new_tokens_cap)
        self.restore_timeout_s = restore_timeout_s
        self.dispatcher.on_worker_lost = self._report_lost
        # Micro-batches (None: automatic) hide a round trip behind another micro-batch's dense compute; the direct
        # transport has none to hide, so there the automatic rule keeps one.
        min_tokens = None if transport == "direct" else auto_min_tokens(self.spec.num_experts, self.spec.top_k)
        self.scheduler = Scheduler(self.model, on_forward=self._on_forward, recover=self._recover,
                                   on_step_end=self.dispatcher.load.end_step, micro_batches=micro_batches,
                                   micro_batch_min_tokens=min_tokens, grammars=self.grammars,
                                   max_batch_size=max_batch_size, max_forward_tokens=max_forward_tokens,
                                   device=device,
                                   kv_cache_bytes=kv_cache.pool_bytes(torch.device(device)),
                                   block_size=kv_cache.block_size, max_prefill_tokens=kv_cache.max_prefill_tokens,
                                   prefix_caching=kv_cache.prefix_caching)
        self._stopped = threading.Event()
        self.feeds = Feeds()  # the ingresses' token streams (Router.start, Router.feed)
        self._loop = threading.Thread(target=self._run, name="moeray-step-loop", daemon=True)
        self._loop.start()

    def _on_forward(self, ids_T: torch.Tensor | None) -> None:
        # NOTE: per thread in the dispatcher (micro-batches); a step's loads form one record at its end (on_step_end)
        self.dispatcher.token_ids_T = ids_T

    def set_micro_batches(self, micro_batches: int | None) -> None:
        """Split the following steps into this many micro-batches (None: the automatic rule); ``moeray bench serve``
        runs overlap on and off on one server."""
        with self.scheduler.forward_lock:
            plan_micro_batches([1], micro_batches)  # a bad count raises here, naming the limit
            self.scheduler.micro_batches = micro_batches

    def set_controller(self, controller) -> None:
        self.controller = controller

    def _report_lost(self, worker: int) -> None:
        """A worker died mid-step: the controller restores redundancy in the background."""
        if self.controller is not None:
            self.controller.restore.remote([worker])

    def _recover(self, error: Exception) -> bool:
        """Experts lost with their last replica: wait for the controller to re-place them, then retry the step."""
        if not isinstance(error, ExpertsUnavailable) or self.controller is None:
            return False
        import ray  # a controller is a Ray actor: the in-process engine has none

        deadline = time.monotonic() + self.restore_timeout_s
        try:
            record = ray.get(self.controller.restore.remote(sorted(self.dispatcher.dead_workers)),
                             timeout=self.restore_timeout_s)
        except Exception:
            log.exception("the placement controller could not restore %s", error)
            return False
        # NOTE: a restore another router asked for first answers at once with the plan in force; its switch to
        # this router may still be on its way, and a retry before it would find the same experts missing.
        while self.dispatcher.plan.epoch < record.get("epoch", 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        return True

    def _run(self) -> None:
        while not self._stopped.is_set():
            if self.scheduler.wait_for_work(timeout=0.1):
                self.scheduler.step()
            elif self.scheduler.forward_lock.acquire(blocking=False):  # idle: a compiled graph stops polling
                try:
                    self.dispatcher.transport.release_if_idle()
                finally:
                    self.scheduler.forward_lock.release()

    def new_sequence(self, prompt_ids: list[int], sampling: SamplingParams, request_id: str | None = None,
                     on_token=None, span=None, resumed: list[int] = ()) -> Sequence:
        """``resumed``: tokens this request already produced elsewhere (a router lost): they are its output so far,
        recomputed with the prompt, and it continues after them exactly (penalties, limits, seed, grammar)."""
        ids = self.limits.check(prompt_ids, sampling)
        resumed = self.limits.check_resumed(resumed, sampling)
        request_id = check_request_id(request_id) if request_id else new_request_id()
        stop = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.eos_ids))
        seq = Sequence(request_id=request_id, prompt_ids=ids, sampling=sampling, stop_ids=frozenset(stop),
                       on_token=on_token, span=span, output_ids=resumed)
        if sampling.structured is not None:
            if sampling.ignore_eos or not self.eos_ids:
                raise InvalidRequest("a structured output ends with the model's end-of-sequence token: it needs one, "
                                     "and cannot be combined with ignore_eos")
            seq.matcher = self.grammars.matcher(sampling.structured)
            if not all(seq.matcher.accept_token(t) for t in resumed):
                raise InvalidRequest("the resumed tokens do not follow the request's structured output")
        return seq

    def generate(self, prompt_ids: list[int], sampling: SamplingParams, request_id: str | None = None,
                 traceparent: str | None = None) -> GenerationResult:
        """Run one request to completion in the shared batch. Bad input raises InvalidRequest before it joins.
        ``traceparent``: the caller's W3C trace context (telemetry), continued by this request's span."""
        with telemetry.request_span("moeray.router.request", traceparent, request_id) as span:
            seq = self.scheduler.submit(self.new_sequence(prompt_ids, sampling, request_id, span=span))
            seq.done.wait()
            if seq.error is not None:
                raise seq.error
        return seq.result()

    def stream(self, prompt_ids: list[int], sampling: SamplingParams, request_id: str | None = None,
               traceparent: str | None = None, resumed: list[int] = ()) -> Iterator[StreamChunk]:
        """Yield new tokens as the shared batch produces them (a Ray streaming generator). If the consumer goes
        away mid-stream the request is aborted, freeing its batch slot. ``resumed``: see ``new_sequence``."""
        with telemetry.request_span("moeray.router.request", traceparent, request_id) as span:
            yield from self._stream(prompt_ids, sampling, request_id, span, resumed)

    def _stream(self, prompt_ids, sampling, request_id, span, resumed=()) -> Iterator[StreamChunk]:
        produced: queue.Queue[tuple] = queue.Queue()
        seq = self.scheduler.submit(self.new_sequence(prompt_ids, sampling, request_id, resumed=list(resumed),
                                                      on_token=lambda *item: produced.put(item), span=span))
        try:
            while not (seq.done.is_set() and produced.empty()):
                try:
                    items = [produced.get(timeout=0.05)]
                except queue.Empty:
                    continue
                while not produced.empty():
                    items.append(produced.get_nowait())
                logprobs = [lp for _, lp in items] if sampling.logprobs is not None else None
                yield StreamChunk(request_id=seq.request_id, token_ids=[t for t, _ in items], logprobs=logprobs)
            if seq.error is not None:
                raise seq.error
            yield StreamChunk(request_id=seq.request_id, token_ids=[], finish_reason=seq.finish_reason)
        finally:
            if not seq.done.is_set():
                self.scheduler.abort(seq.request_id)

    def start(self, prompt_ids: list[int], sampling: SamplingParams, request_id: str, feed_id: str, key: int,
              traceparent: str | None = None, resumed: list[int] = ()) -> None:
        """Start one request whose chunks go out on feed ``feed_id`` under ``key`` (``moeray.router.feed``; the
        ingress's path). Returns once it is queued; bad input raises InvalidRequest here, and a feed that has ended
        raises FeedClosed. ``resumed``: the tokens it already streamed from a router that died (``new_sequence``)."""
        span_scope = contextlib.ExitStack()
        span = span_scope.enter_context(telemetry.request_span("moeray.router.request", traceparent, request_id))
        try:
            seq = self.new_sequence(prompt_ids, sampling, request_id, span=span, resumed=list(resumed))
            feed = self.feeds.register(feed_id, key, seq.request_id)
        except BaseException as e:
            span_scope.__exit__(type(e), e, e.__traceback__)
            raise
        seq.on_token = functools.partial(feed.put_token, key)

        def done(seq: Sequence) -> None:
            feed.finish(key, seq.finish_reason, seq.error)
            if span is not None and seq.finish_reason == "abort":
                span.set_attribute("moeray.aborted", True)
            error = seq.error
            span_scope.__exit__(None if error is None else type(error), error, None)

        seq.on_done = done
        try:
            self.scheduler.submit(seq)
        except BaseException as e:
            self.feeds.unregister(feed, key)
            span_scope.__exit__(type(e), e, e.__traceback__)
            raise

    def feed(self, feed_id: str) -> Iterator[FeedBatch]:
        """Feed ``feed_id``'s batches as they come (a Ray streaming generator): the chunks of every request started
        on it, after an empty first batch saying the feed is open. Ends when the feed has been idle for
        ``feed.IDLE_S`` or the router stops; a reader that leaves first aborts the requests still open on it."""
        feed = self.feeds.open(feed_id)
        try:
            yield FeedBatch({})
            while not self._stopped.is_set():
                batch = feed.take(timeout=1.0)
                if batch is None:
                    return
                if batch.chunks or batch.errors:
                    yield batch
        finally:
            self.feeds.end(feed_id)
            for request_id in feed.open_request_ids():
                self.scheduler.abort(request_id)

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def score(self, input_ids_BT: np.ndarray, attention_mask_BT: np.ndarray | None = None,
              traceparent: str | None = None, last_only: bool = False) -> np.ndarray:
        """Logits [B, T, V] (float32) for a batch of prompts, as transformers' forward would give them; with
        ``last_only``, [B, V]: each row's logits at its last real position (per the attention mask)."""
        ids = torch.as_tensor(np.asarray(input_ids_BT), dtype=torch.long)
        if ids.dim() != 2 or ids.numel() == 0:
            raise InvalidRequest(f"input_ids must be a non-empty [batch, tokens] array; got shape {tuple(ids.shape)}")
        mask = torch.ones_like(ids) if attention_mask_BT is None else torch.as_tensor(np.asarray(attention_mask_BT),
                                                                                        dtype=torch.long)
        if mask.shape != ids.shape:
            raise InvalidRequest(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
        if ids.shape[1] > self.spec.max_positions:
            raise InvalidRequest(f"{ids.shape[1]} tokens exceed the model's {self.spec.max_positions} positions")
        if ids.min() < 0 or ids.max() >= self.spec.vocab_size:
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {self.spec.vocab_size})")
        if not ((mask == 0) | (mask == 1)).all() or (mask.sum(dim=1) == 0).any():
            raise InvalidRequest("attention_mask must hold 0 and 1 only, with at least one 1 per row")
        with telemetry.request_span("moeray.router.score", traceparent, current=True):
            return self.scheduler.score(ids, mask, last_only=last_only).float().cpu().numpy()

    def prompt_logprobs(self, prompt_ids: list[int], top: int = 0, traceparent: str | None = None) -> list:
        """Each prompt position's TokenLogprob given the tokens before it (None for the first, which has none), with
        its ``top`` most likely alternatives: the prompt's half of OpenAI's ``echo`` with ``logprobs``. One
        forward of the prompt, reduced here so that only the chosen and top tokens leave the router."""
        ids = self.limits.check(prompt_ids, SamplingParams(max_new_tokens=1))
        if not 0 <= top <= MAX_LOGPROBS:
            raise InvalidRequest(f"prompt logprobs must lie in [0, {MAX_LOGPROBS}] (alternatives per token); got {top}")
        if len(ids) == 1:
            return [None]
        ids_BT = torch.tensor([ids])
        with telemetry.request_span("moeray.router.score", traceparent, current=True):
            logits_TV = self.scheduler.score(ids_BT, torch.ones_like(ids_BT))[0]
        return [None, *token_logprobs(logits_TV[:-1], ids[1:], top)]

    def set_plan(self, plan: Plan, workers: list | None = None) -> int:
        """Switch to ``plan`` between forwards (a forward in flight finishes on the old epoch); returns the epoch.
        New ``workers`` rebuild the transport's view of them (a compiled graph is torn down and compiled again)."""
        with self.scheduler.forward_lock:
            self.dispatcher.set_plan(plan, workers)
        return plan.epoch

    def epoch(self) -> int:
        return self.dispatcher.plan.epoch

    def take_load(self) -> dict:
        """Step load records since the last call (the placement controller pulls them; see LoadCounter.take), and
        the requests waiting and running now against the batch capacity (for the autoscaler)."""
        s = self.scheduler
        return {**self.dispatcher.load.take(), "waiting": s.num_waiting, "running": len(s.running),
                "capacity": s.max_batch_size}

    def kv_stats(self) -> KVStats:
        return self.scheduler.kv_stats()

    def resident_bytes(self) -> int:
        return resident_bytes(self.model)

    def expert_bytes_held(self) -> int:
        """Bytes of routed-expert parameters with real storage here; always 0 (they stay on the meta device)."""
        paths = tuple(layer.module_path + "." for layer in self.spec.moe_layers)
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters(remove_duplicate=False)
                   if n.startswith(paths) and p.device.type != "meta")

    def stats(self) -> dict:
        s = self.scheduler
        return {"steps": s.steps, "load_steps": self.dispatcher.load.closed_steps, "scores": s.scores,
                "running": len(s.running), "waiting": s.num_waiting,
                "step_s": s.step_s, "forward_s": s.forward_s, "dispatch_s": self.dispatcher.dispatch_s,
                "router_busy_s": s.router_busy_s, "micro_batch_steps": s.micro_batch_steps,
                "micro_batches": s.micro_batches, "dispatch": dataclasses.asdict(self.dispatcher.times),
                "transport": type(self.dispatcher.transport).__name__,
                "graph_compiles": getattr(self.dispatcher.transport, "compiles", 0),
                "graph_idle_releases": getattr(self.dispatcher.transport, "idle_releases", 0),
                "kv": dataclasses.asdict(s.kv_stats()), **_memory()}

    def where(self) -> dict:
        """Where this router runs (GetPlacement, ``moeray placement show``): its node, its GPUs in Ray's
        accounting, and the device its dense compute uses."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "device": self.device, "pid": os.getpid(), "running": len(self.scheduler.running),
                "waiting": self.scheduler.num_waiting}

    def round_trip_floor(self, tokens: int, repeats: int = 50, transport: str | None = None) -> float:
        """Median seconds of a bare round trip from this router to every live worker at once, each carrying
        ``tokens`` hidden states both ways and computing nothing: the floor of one MoE layer with that many tokens on
        every worker, over ``transport``: "object_store" (Ray actor calls) or "tcp"; default: this router's own
        (other paths measure as the object store)."""
        import ray

        if not 1 <= tokens <= 1 << 16:
            raise ValueError(f"tokens must lie in [1, 65536]; got {tokens}")
        transport = transport or self.transport_name
        dead = self.dispatcher.dead_workers
        workers = [w for i, w in enumerate(self.dispatcher.transport.workers) if i not in dead]
        x_TH = pack(torch.zeros(tokens, self.spec.moe_layers[0].hidden_size, dtype=self.model.dtype))
        if transport == "tcp":
            from moeray.transport.tcp import TcpTransport

            echo = TcpTransport(workers, method="round_trip_call")
            no_pairs = np.zeros(0, np.int32)
            calls = {w: WorkerCall(0, 0, x_TH, no_pairs, no_pairs, no_pairs.view(np.float32))
                     for w in range(len(workers))}

            def once() -> None:
                echo.send(calls)
        else:
            echo = None

            def once() -> None:
                ray.get([w.round_trip.remote(x_TH) for w in workers])
        times = []
        try:
            for _ in range(repeats + 5):  # the first few warm up
                started = time.perf_counter()
                once()
                times.append(time.perf_counter() - started)
        finally:
            if echo is not None:
                echo.close()
        return statistics.median(times[5:])

    def ping(self) -> bool:
        return True

    def shutdown(self) -> None:
        self._stopped.set()
        self._loop.join(timeout=5)
        with self.scheduler.forward_lock:
            self.dispatcher.transport.close()  # a compiled graph: its workers' loops exit
        self.scheduler.close()
        telemetry.shutdown()  # flush: the engine kills this actor next

