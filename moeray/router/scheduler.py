"""Continuous batching over a paged KV pool: each step runs every running sequence's next token together with
chunks of waiting prompts, in one packed forward.

```
submit ─▶ waiting ──admit: shared prefix blocks, blocks for the first chunk──▶ running ──▶ done (blocks returned)
             ▲                                                                   │ step: next token, or next chunk
             └───────── preempted: blocks freed, recomputed when re-admitted ◀───┘ (the pool ran out)
```

A step takes every running sequence (its next token, or the next chunk of its prompt while it is still
prefilling), then admits waiting sequences while the step's prefill budget and the batch size allow. The budget is
``max_prefill_tokens`` when set, else chosen each step from measured step costs so that a step with prompt tokens
takes at most twice a decode step (``moeray.router.prefill_budget``). A prompt longer than the budget is prefilled
over several steps, so running streams wait at most one chunk. A sequence whose keys and values fill a block
takes a new one; when the pool has none, the most recently admitted sequence is preempted: its blocks go back and
it waits at the head of the queue to be prefilled again over its prompt and the tokens it has produced, so its
output continues exactly. A request that could never fit
the pool, even alone, is refused when it is submitted.

Sequence state is one number: ``num_computed``, its positions whose keys and values are in the pool. A step feeds
positions ``num_computed ..`` and samples a token when it reaches the end of the known tokens. A failed step
advances nothing, so running it again after a recovery recomputes exactly the same positions into the same slots.

Micro-batches: a step with enough work is split by sequence into micro-batches (``overlap.plan_micro_batches``, a pure
rule), each one a packed forward of its own on its own thread. They take turns on the router
(``moeray.router.overlap``): while one micro-batch's tokens are with the expert workers, another computes its
dense layers. A sequence's tokens stay in one micro-batch, so attention sees exactly what it sees in one forward,
and each micro-batch writes only its own sequences' KV slots. A micro-batch that fails is retried alone after a
recovery; the others' sequences advance.

Shape legend: Q new tokens in a step (packed), S sampled positions, V vocabulary, B rows and T tokens (scoring).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import torch

from moeray import telemetry
from moeray.model.architecture import kv_layout_of
from moeray.router.prefill_budget import FLOOR as PREFILL_FLOOR, PrefillBudget
from moeray.request import DEFAULT_MAX_FORWARD_TOKENS, DuplicateRequestId, InvalidRequest, check_step_fits
from moeray.router import overlap, scoring
from moeray.router.kv_blocks import BlockTable, OutOfBlocks
from moeray.router.kv_pool import KVPool, Row, StepLayout, use_paged_attention
from moeray.router.sequence import Sequence, sample_next, sampled_logprobs

log = logging.getLogger(__name__)

MAX_STEP_RETRIES = 3  # a step that still fails after this many recoveries fails its sequences
DEFAULT_BLOCK_SIZE = 16
DEFAULT_TOKENS_PER_SEQUENCE = 2048  # the pool's size when none is given: this many tokens per batch slot

@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of a step: its rows (sequence, new positions), decode rows first, and its forward's inputs."""

    rows: list[tuple[Sequence, int]]
    ids_Q: torch.Tensor
    pos_Q: torch.Tensor
    keep: list[int]  # positions (in this micro-batch) whose logits are sampled
    samplers: list[Sequence]  # the sequences sampled, in the order of ``keep``
    layout: StepLayout

    @property
    def seqs(self) -> list[Sequence]:
        return [seq for seq, _ in self.rows]


@dataclasses.dataclass(frozen=True)
class KVStats:
    """The KV pool as the router's metrics, stats and ``GetModelInfo`` report it."""

    blocks_total: int
    blocks_used: int
    block_size: int
    bytes_per_token: int  # the model's keys and values (or MLA latent) per token, all layers
    pool_bytes: int
    tokens_held: int  # positions running sequences hold (shared prefix blocks count once per sequence)
    preemptions: int
    prefix_queries: int  # prompt tokens looked up in the prefix cache, and those found
    prefix_hits: int

    @property
    def usage(self) -> float:
        return self.blocks_used / self.blocks_total


class Scheduler:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        on_forward: Callable[[torch.Tensor | None], None],
        recover: Callable[[Exception], bool] | None = None,
        on_step_end: Callable[[], None] | None = None,
        micro_batches: int | None = None,
        micro_batch_min_tokens: int | None = None,
        max_batch_size: int = 32,
        max_forward_tokens: int = DEFAULT_MAX_FORWARD_TOKENS,
        device: torch.device | str = "cpu",
        kv_cache_bytes: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_prefill_tokens: int | None = None,
        prefix_caching: bool = True,
        grammars=None,
    ) -> None:
        self.model = model
        self.grammars = grammars  # moeray.router.grammar.Grammars: structured outputs' masks (None: no grammars)
        # Told each forward's token ids before it and None after, on the thread that runs that forward (micro-batches
        # run theirs at once, each on its own thread). Forwards are packed: every token is real, none is padding.
        self.on_forward = on_forward
        self.on_step_end = on_step_end  # once per step (or score), after all of its forwards
        # Asked when a step fails: True if the cause was repaired (e.g. lost experts re-placed) and the step should
        # run again from where it started.
        self.recover = recover
        self.max_batch_size = max_batch_size
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be at least 1; got {max_prefill_tokens}")
        check_step_fits(max_batch_size, max_prefill_tokens or PREFILL_FLOOR, max_forward_tokens)
        self.max_prefill_tokens = max_prefill_tokens  # None: automatic, from measured step costs (prefill_budget.py)
        self.prefill_rule = None if max_prefill_tokens is not None else \
            PrefillBudget(ceiling=max_forward_tokens - max_batch_size)
        self.max_forward_tokens = max_forward_tokens  # a step's tokens stay under it; a score splits its rows by it
        overlap.plan_micro_batches([1], micro_batches)  # refuses a bad count here, naming it
        self.micro_batches = micro_batches  # None: automatic (plan_micro_batches); may change between steps
        self.micro_batch_min_tokens = micro_batch_min_tokens  # the automatic rule's (None: it keeps one)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # micro-batches after the first
        self.device = torch.device(device)
        use_paged_attention(model)
        layers = kv_layout_of(model)
        block_bytes = KVPool.bytes_per_token_of(layers, model.dtype) * block_size
        if kv_cache_bytes is None:
            kv_cache_bytes = max_batch_size * DEFAULT_TOKENS_PER_SEQUENCE // block_size * block_bytes
        if kv_cache_bytes < block_bytes:
            raise ValueError(f"kv_cache_bytes {kv_cache_bytes} is below one block of {block_size} tokens "
                             f"({block_bytes} bytes for this model)")
        num_blocks = kv_cache_bytes // block_bytes
        self.pool = KVPool(layers, num_blocks, block_size, model.dtype, self.device)
        self.blocks = BlockTable(num_blocks, block_size, prefix_caching)
        self.forward_lock = threading.Lock()  # one forward at a time: the dispatcher's token ids are per forward
        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admitted sequences holding blocks, in admission order
        self._active: dict[str, Sequence] = {}  # request id -> its sequence, from submit until done (under _cond)
        self.scores = 0  # score() calls
        self.steps = 0
        self.step_s = 0.0  # wall time in steps, and the part of it inside the model's forward
        self.forward_s = 0.0
        self.router_busy_s = 0.0  # of forward_s, the router computing (the micro-batches' turns held)
        self.micro_batch_steps = 0  # steps run as more than one micro-batch
        self.preemptions = 0
        self.prefix_queries = self.prefix_hits = 0

    # -- submission (any thread) -------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Sequence:
        """Queue ``seq``. InvalidRequest if it could not fit the KV pool even alone; DuplicateRequestId if a
        sequence with its id is still in flight (an aborted one that has not finished yet does not count: a client
        may retry at once under the same id)."""
        need = len(seq.prompt_ids) + seq.sampling.max_new_tokens
        if self.blocks.blocks_for(need) > self.blocks.num_blocks:
            raise InvalidRequest(f"prompt of {len(seq.prompt_ids)} tokens plus max_new_tokens "
                                 f"{seq.sampling.max_new_tokens} exceeds the router's KV cache of "
                                 f"{self.blocks.num_blocks * self.blocks.block_size} tokens")
        with self._cond:
            other = self._active.get(seq.request_id)
            if other is not None and not other.done.is_set() and not other.aborted:
                raise DuplicateRequestId(f"request_id {seq.request_id!r} is already in flight; request ids must be "
                                         "unique among running requests")
            self._active[seq.request_id] = seq
            self._waiting.append(seq)
            self._cond.notify_all()
            telemetry.queue_depth(len(self._waiting))
        return seq

    def abort(self, request_id: str) -> bool:
        with self._cond:  # finds a sequence waiting, running or preempted
            seq = self._active.get(request_id)
            if seq is None or seq.done.is_set():
                return False
            seq.aborted = True
            return True

    def _retire(self, seq: Sequence) -> None:
        """``seq`` is done: return its blocks, wake its caller and free its request id."""
        self.blocks.release(seq.kv)
        seq.done.set()
        with self._cond:
            if self._active.get(seq.request_id) is seq:
                del self._active[seq.request_id]
        if seq.on_done is not None:
            seq.on_done(seq)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def wait_for_work(self, timeout: float) -> bool:
        with self._cond:
            if not self._waiting and not self.running:
                self._cond.wait(timeout)
            return bool(self._waiting or self.running)

    # -- stepping (the loop thread) ----------------------------------------------------------------------
    def step(self) -> None:
        started = time.perf_counter()
        for seq in [s for s in self.running if s.aborted]:
            self._finish(seq, "abort")
        batch = self._schedule()
        if batch:
            ran = time.perf_counter()
            clean = self._run(batch)
            if self.prefill_rule is not None and clean:  # a step that waited on a recovery measures nothing
                self.prefill_rule.observe(sum(new == 1 for _, new in batch), sum(new for _, new in batch if new > 1),
                                          time.perf_counter() - ran)
        self.steps += 1
        self.step_s += time.perf_counter() - started
        telemetry.kv_cache(self.kv_stats())

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """This step's (sequence, new positions): the running ones first, then admissions."""
        budget, batch, i = self.max_prefill_tokens, [], 0
        if budget is None:
            budget = self.prefill_rule.budget(sum(s.num_tokens - s.num_computed == 1 for s in self.running))
        while i < len(self.running):
            seq = self.running[i]
            remaining = seq.num_tokens - seq.num_computed
            new = 1 if remaining == 1 else min(remaining, budget)
            if new and not self._reserve(seq, seq.num_computed + new):
                break  # it was the most recent itself, and is preempted
            if new:
                budget -= new if remaining > 1 else 0
                batch.append((seq, new))
            i += 1
        with self._cond:
            while self._waiting and len(self.running) < self.max_batch_size and budget > 0:
                seq = self._waiting[0]
                if seq.aborted:
                    self._waiting.popleft()
                    self._finish(seq, "abort")
                    continue
                hit = self.blocks.match_prefix(seq.kv, seq.tokens(0, seq.num_tokens), seq.num_tokens - 1)
                new = min(seq.num_tokens - hit, budget)
                try:
                    self.blocks.grow(seq.kv, hit + new)
                except OutOfBlocks:
                    self.blocks.release(seq.kv)  # it waits for blocks (running sequences return them)
                    break
                self._waiting.popleft()
                seq.num_computed = hit
                self.prefix_queries += seq.num_tokens
                self.prefix_hits += hit
                telemetry.prefix_lookup(seq.num_tokens, hit)
                self.running.append(seq)
                budget -= new
                batch.append((seq, new))
            telemetry.queue_depth(len(self._waiting))
        return batch

    def _reserve(self, seq: Sequence, positions: int) -> bool:
        """Blocks for ``positions`` of ``seq``, preempting the most recently admitted sequences while the pool has
        too few; False if ``seq`` itself had to go."""
        while True:
            try:
                self.blocks.grow(seq.kv, positions)
                return True
            except OutOfBlocks:
                victim = self.running.pop()
                self.blocks.release(victim.kv)
                victim.num_computed = 0
                self.preemptions += 1
                telemetry.preempted()
                log.info("KV pool full: preempted %s (%d tokens; recomputed when re-admitted)", victim.request_id,
                         victim.num_tokens)
                with self._cond:
                    self._waiting.appendleft(victim)
                if victim is seq:
                    return False

    def _run(self, batch: list[tuple[Sequence, int]]) -> bool:
        """Run one step's batch; True when every micro-batch ran at its first attempt (no failure, no recovery)."""
        batch = [b for b in batch if b[1] == 1] + [b for b in batch if b[1] != 1]  # the layout's decode block first
        parts = overlap.plan_micro_batches([new for _, new in batch], self.micro_batches, self.micro_batch_min_tokens)
        pending = [self._micro_batch([batch[r] for r in part]) for part in parts]
        seqs = [seq for seq, _ in batch]
        kind = "decode" if all(new == 1 for _, new in batch) else "prefill"
        # structured outputs: their masks are filled on the grammar thread while the forward runs
        sampled = [seq for m in pending for seq in m.samplers]
        masks = None if self.grammars is None else self.grammars.fill_async([s.matcher for s in sampled])
        done: dict[int, torch.Tensor] = {}  # micro-batch index -> its sampled logits
        left = list(range(len(pending)))
        clean = True  # every micro-batch ran at its first attempt
        try:
            for attempt in range(1 + MAX_STEP_RETRIES):
                results = self._forward([pending[i] for i in left], kind, seqs)
                done.update((i, r) for i, r in zip(left, results) if not isinstance(r, Exception))
                failed = [(i, r) for i, r in zip(left, results) if isinstance(r, Exception)]
                if not failed:
                    break
                clean = False
                error = failed[0][1]
                if attempt < MAX_STEP_RETRIES and self.recover is not None and self.recover(error):
                    log.warning("step failed (%s); retrying %d of its %d micro-batches after recovery", error,
                                len(failed), len(pending))
                    left = [i for i, _ in failed]
                    continue
                # a failed step fails its sequences, never the loop; micro-batches that ran advance below
                lost = [seq for i, _ in failed for seq in pending[i].seqs]
                log.error("step failed; failing %d sequences", len(lost), exc_info=error)
                for i, e in failed:
                    for seq in pending[i].seqs:
                        seq.error = e
                        self._finish(seq, None)
                break
        finally:
            if self.on_step_end is not None:
                self.on_step_end()
        samplers, logits = [], []
        for i in sorted(done):
            micro = pending[i]
            for seq, new in micro.rows:
                seq.num_computed += new
                if seq.num_computed // self.blocks.block_size > len(seq.kv.content_ids):
                    self.blocks.register_full(seq.kv, seq.tokens(0, seq.num_computed), seq.num_computed)
            if micro.samplers:
                samplers += micro.samplers
                logits.append(done[i])
        if samplers:
            logits_BV = torch.cat(logits) if len(logits) > 1 else logits[0]
            allowed_BV = None
            if masks is not None:
                row = {id(seq): i for i, seq in enumerate(sampled)}
                allowed_BV = masks.result()[[row[id(seq)] for seq in samplers]]
            tokens = sample_next(logits_BV, samplers, allowed_BV)
            self._emit(samplers, tokens, sampled_logprobs(logits_BV, samplers, tokens))
        return clean

    def _micro_batch(self, rows: list[tuple[Sequence, int]]) -> MicroBatch:
        ids, positions, keep, samplers = [], [], [], []
        for seq, new in rows:
            ids += seq.tokens(seq.num_computed, seq.num_computed + new)
            positions += range(seq.num_computed, seq.num_computed + new)
            if seq.num_computed + new == seq.num_tokens:
                keep.append(len(ids) - 1)
                samplers.append(seq)
        layout = StepLayout([Row(seq.num_computed, new, seq.kv.block_ids) for seq, new in rows], self.pool,
                            self.device)
        return MicroBatch(rows=rows, ids_Q=torch.tensor(ids), pos_Q=torch.tensor(positions), keep=keep,
                          samplers=samplers, layout=layout)

    def _forward(self, micro: list[MicroBatch], kind: str, seqs: list[Sequence]) -> list[torch.Tensor | Exception]:
        """Each micro-batch's sampled logits [S, V], or the exception its forward raised. The first runs on this
        thread, the others on the pool's; all have finished when this returns."""
        turn = overlap.Turn()
        with self.forward_lock, telemetry.step_span(kind, seqs):
            started = time.perf_counter()
            try:
                if len(micro) == 1:
                    return [self._forward_one(micro[0], turn)]
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(overlap.MAX_MICRO_BATCHES - 1,
                                                                       thread_name_prefix="moeray-micro-batch")
                self.micro_batch_steps += 1
                # NOTE: each thread runs in a copy of this one's context, so the step span stays the current span
                futures = [self._pool.submit(contextvars.copy_context().run, self._forward_one, m, turn)
                           for m in micro[1:]]
                first = self._forward_one(micro[0], turn)
                return [first] + [f.result() for f in futures]
            finally:
                self.forward_s += time.perf_counter() - started
                self.router_busy_s += turn.held_s

    def _forward_one(self, micro: MicroBatch, turn: overlap.Turn) -> torch.Tensor | Exception:
        # NOTE: grad mode and the active layout are per thread, so each micro-batch's thread sets its own
        try:
            with torch.no_grad(), micro.layout.active(), turn.held():
                self.on_forward(micro.ids_Q)
                try:
                    out = self.model(input_ids=micro.ids_Q[None].to(self.device),
                                     position_ids=micro.pos_Q[None].to(self.device), cache=micro.layout,
                                     use_cache=True, logits_to_keep=torch.tensor(micro.keep or [0], device=self.device))
                finally:
                    self.on_forward(None)
            return out.logits[0]
        except Exception as e:  # noqa: BLE001 - returned: the step decides (recovery, or failing its sequences)
            return e

    def _emit(self, seqs: list[Sequence], tokens: list[int], logprobs: list) -> None:
        telemetry.tokens_emitted(seqs)
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            seq.output_ids.append(token)
            if logprob is not None:
                seq.output_logprobs.append(logprob)
            if seq.matcher is not None and not seq.matcher.accept_token(token):
                seq.error = InvalidRequest(f"the structured output refused token {token}")  # a mask that lied
                self._finish(seq, None)
                continue
            if seq.on_token is not None:
                seq.on_token(token, logprob)
            if token in seq.stop_ids:
                self._finish(seq, "stop")
            elif len(seq.output_ids) >= seq.sampling.max_new_tokens:
                self._finish(seq, "length")
            elif seq.aborted:
                self._finish(seq, "abort")

    def _finish(self, seq: Sequence, reason: str | None) -> None:
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        self._retire(seq)

    def close(self) -> None:
        """Stop the micro-batch and grammar threads (after the last step)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.grammars is not None:
            self.grammars.close()

    def kv_stats(self) -> KVStats:
        b = self.blocks
        return KVStats(blocks_total=b.num_blocks, blocks_used=b.num_used, block_size=b.block_size,
                       bytes_per_token=self.pool.bytes_per_token, pool_bytes=self.pool.nbytes,
                       tokens_held=sum(s.num_computed for s in self.running), preemptions=self.preemptions,
                       prefix_queries=self.prefix_queries, prefix_hits=self.prefix_hits)

    # -- scoring (moeray/router/scoring.py) ---------------------------------------------------------------
    def score(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits for every position of a padded batch (no cache kept): ``scoring.score``."""
        self.scores += 1
        return scoring.score(self, ids_BT, mask_BT, last_only)
