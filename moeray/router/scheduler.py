"""Continuous batching: requests join and leave one running batch between steps.

The running batch is one left-padded KV cache: row b holds sequence b right-aligned, an attention mask marks its
padding, and position ids count only its real tokens, so each row computes exactly what it would alone. A step
is either a prefill of newly admitted requests (their own padded batch, then merged into the running cache) or a
decode of every running sequence. Finished rows are dropped and common leading padding trimmed.

transformers' own continuous-batching manager (``generate_batch``) was tried first: it fails on DeepSeek-V3's MLA
attention (key and value head sizes differ), so moeray keeps this small scheduler that works for every model.

Shape legend: B rows in a batch, S cached positions, Q new tokens per row, V vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache

from moeray import telemetry
from moeray.request import DuplicateRequestId, GenerationResult, SamplingParams

log = logging.getLogger(__name__)

MAX_STEP_RETRIES = 3  # a step that still fails after this many recoveries fails its sequences
PAD_ID = 0  # any valid id: padded positions are masked out of attention and never dispatched to experts


@dataclasses.dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stop_ids: frozenset[int]
    on_token: Callable[[int], None] | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    aborted: bool = False
    span: object = None  # the request's router span (telemetry): step spans link to it
    arrived_s: float = dataclasses.field(default_factory=time.perf_counter)
    last_token_s: float = 0.0  # when its latest token came (telemetry: time to first token, inter-token latency)

    def __post_init__(self) -> None:
        self.generator = None
        if not self.sampling.greedy:
            self.generator = torch.Generator()
            if self.sampling.seed is not None:
                self.generator.manual_seed(self.sampling.seed)
            else:
                self.generator.seed()

    def result(self) -> GenerationResult:
        return GenerationResult(request_id=self.request_id, prompt_ids=self.prompt_ids,
                                output_ids=list(self.output_ids), finish_reason=self.finish_reason or "abort")


def sample_next(logits_BV: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    tokens = logits_BV.argmax(dim=-1).tolist()
    for b, seq in enumerate(seqs):
        s = seq.sampling
        if s.greedy:
            continue
        logits_V = logits_BV[b].float() / s.temperature
        if s.top_k:
            kth = torch.topk(logits_V, min(s.top_k, logits_V.numel())).values[-1]
            logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
        probs_V = torch.softmax(logits_V, dim=-1)
        if s.top_p < 1:
            sorted_V, order_V = probs_V.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop_V = sorted_V.cumsum(0) - sorted_V >= s.top_p
            probs_V = probs_V.scatter(0, order_V, sorted_V.masked_fill(drop_V, 0))
        tokens[b] = int(torch.multinomial(probs_V, 1, generator=seq.generator))
    return tokens


def _left_pad(t: torch.Tensor, length: int, value: float = 0) -> torch.Tensor:
    """Pad dim -2 (cache positions) or dim -1 (mask) on the left up to ``length``."""
    dim = -2 if t.dim() == 4 else -1
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_full(shape, value), t], dim=dim)


class Scheduler:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        on_forward: Callable[[torch.Tensor | None, torch.Tensor | None], None],
        recover: Callable[[Exception], bool] | None = None,
        max_batch_size: int = 32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        # Told before each forward which flattened tokens are real (and their ids), and (None, None) after it.
        self.on_forward = on_forward
        # Asked when a step fails: True if the cause was repaired (e.g. lost experts re-placed) and the step should
        # run again from where it started.
        self.recover = recover
        self.max_batch_size = max_batch_size
        self.device = torch.device(device)
        self.forward_lock = threading.Lock()  # one forward at a time: the dispatcher's token mask is per forward
        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._active: dict[str, Sequence] = {}  # request id -> its sequence, from submit until done (under _cond)
        self.scores = 0  # score() calls
        self._cache: DynamicCache | None = None
        self._mask_BS: torch.Tensor | None = None
        self.steps = 0
        self.step_s = 0.0  # wall time in steps, and the part of it inside the model's forward
        self.forward_s = 0.0

    # -- submission (any thread) -------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Sequence:
        """Queue ``seq``; DuplicateRequestId if a sequence with its id is still in flight (an aborted one that has
        not finished yet does not count: a client may retry at once under the same id)."""
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
        with self._cond:  # also finds a sequence in its prefill, between the waiting queue and the running batch
            seq = self._active.get(request_id)
            if seq is None or seq.done.is_set():
                return False
            seq.aborted = True
            return True

    def _retire(self, seq: Sequence) -> None:
        """``seq`` is done: wake its caller and free its request id."""
        seq.done.set()
        with self._cond:
            if self._active.get(seq.request_id) is seq:
                del self._active[seq.request_id]

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
        with self._cond:
            free = self.max_batch_size - len(self.running)
            admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            telemetry.queue_depth(len(self._waiting))
        admitted = [s for s in admitted if not self._finish_if_aborted(s)]
        # NOTE: a forward only ever replaces cache tensors (torch.cat), never writes into them, so keeping the
        # current ones is enough to roll a failed step back and run it again.
        saved = (self.running, self._mask_BS, None if self._cache is None else
                 [(layer.keys, layer.values) for layer in self._cache.layers])
        for attempt in range(1 + MAX_STEP_RETRIES):
            try:
                if admitted:
                    self._prefill(admitted)
                elif self.running:
                    self._decode()
                break
            except Exception as e:  # a failed step fails its sequences, never the loop
                if attempt < MAX_STEP_RETRIES and self.recover is not None and self.recover(e):
                    log.warning("step failed (%s); retrying it after recovery", e)
                    self.running, self._mask_BS = saved[0], saved[1]
                    self._cache = None if saved[2] is None else DynamicCache(ddp_cache_data=saved[2])
                    continue
                log.exception("step failed; failing %d sequences", len(self.running) + len(admitted))
                for seq in set(self.running) | set(admitted):
                    seq.error = e
                    self._retire(seq)
                self.running, self._cache, self._mask_BS = [], None, None
                break
        self.steps += 1
        self.step_s += time.perf_counter() - started
        telemetry.kv_cache(self._cache)

    def _finish_if_aborted(self, seq: Sequence) -> bool:
        if seq.aborted:
            seq.finish_reason = "abort"
            self._retire(seq)
        return seq.aborted

    def _forward(self, ids_BQ, mask_BS, pos_BQ, cache, token_mask_T, seqs=()) -> torch.Tensor:
        kind = "decode" if token_mask_T is None else "prefill"
        with self.forward_lock, torch.no_grad(), telemetry.step_span(kind, seqs):
            self.on_forward(token_mask_T, ids_BQ.reshape(-1))
            started = time.perf_counter()
            try:
                out = self.model(input_ids=ids_BQ.to(self.device), attention_mask=mask_BS.to(self.device),
                                 position_ids=pos_BQ.to(self.device), past_key_values=cache, use_cache=True,
                                 logits_to_keep=1)
            finally:
                self.forward_s += time.perf_counter() - started
                self.on_forward(None, None)
        return out.logits[:, -1]

    def _prefill(self, seqs: list[Sequence]) -> None:
        length = max(len(s.prompt_ids) for s in seqs)
        pads = [length - len(s.prompt_ids) for s in seqs]
        ids_BQ = torch.tensor([[PAD_ID] * p + s.prompt_ids for p, s in zip(pads, seqs)])
        mask_BS = torch.tensor([[0] * p + [1] * (length - p) for p in pads])
        pos_BQ = torch.arange(length).unsqueeze(0) - torch.tensor(pads).unsqueeze(1)
        cache = DynamicCache()
        logits_BV = self._forward(ids_BQ, mask_BS, pos_BQ, cache, mask_BS.reshape(-1).bool(), seqs)
        self._merge(seqs, cache, mask_BS)
        self._emit(seqs, sample_next(logits_BV, seqs))

    def _decode(self) -> None:
        seqs = self.running
        ids_BQ = torch.tensor([[s.output_ids[-1]] for s in seqs])
        pos_BQ = self._mask_BS.sum(dim=1, keepdim=True)
        self._mask_BS = torch.cat([self._mask_BS, torch.ones(len(seqs), 1, dtype=self._mask_BS.dtype)], dim=1)
        logits_BV = self._forward(ids_BQ, self._mask_BS, pos_BQ, self._cache, None, seqs)
        self._emit(seqs, sample_next(logits_BV, seqs))

    def _merge(self, seqs: list[Sequence], cache: DynamicCache, mask_BS: torch.Tensor) -> None:
        if not self.running:
            self.running, self._cache, self._mask_BS = list(seqs), cache, mask_BS
            return
        length = max(self._mask_BS.shape[1], mask_BS.shape[1])
        layers = []
        for old, new in zip(self._cache.layers, cache.layers):
            layers.append(tuple(torch.cat([_left_pad(a, length), _left_pad(b, length)], dim=0)
                                for a, b in ((old.keys, new.keys), (old.values, new.values))))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask_BS = torch.cat([_left_pad(self._mask_BS, length), _left_pad(mask_BS, length)], dim=0)
        self.running = self.running + list(seqs)

    def _emit(self, seqs: list[Sequence], tokens: list[int]) -> None:
        telemetry.tokens_emitted(seqs)
        for seq, token in zip(seqs, tokens):
            seq.output_ids.append(token)
            if seq.on_token is not None:
                seq.on_token(token)
            if token in seq.stop_ids:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.sampling.max_new_tokens:
                seq.finish_reason = "length"
            elif seq.aborted:
                seq.finish_reason = "abort"
        keep = [b for b, s in enumerate(self.running) if s.finish_reason is None]
        for seq in self.running:
            if seq.finish_reason is not None:
                self._retire(seq)
        if len(keep) == len(self.running):
            return
        if not keep:
            self.running, self._cache, self._mask_BS = [], None, None
            return
        index = torch.tensor(keep)
        mask_BS = self._mask_BS.index_select(0, index)
        # trim the leading positions that are padding in every remaining row
        start = int((mask_BS.cumsum(dim=1) == 0).sum(dim=1).min())
        layers = [(layer.keys.index_select(0, index.to(layer.keys.device))[:, :, start:],
                   layer.values.index_select(0, index.to(layer.values.device))[:, :, start:])
                  for layer in self._cache.layers]
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask_BS = mask_BS[:, start:]
        self.running = [self.running[b] for b in keep]

    # -- scoring -----------------------------------------------------------------------------------------
    def score(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits for every position of a right- or left-padded batch (no cache kept), [B, T, V]; with
        ``last_only``, each row's logits at its last real position only, [B, V] (the LM head runs on just the
        distinct last positions, U <= B of them)."""
        self.scores += 1
        pos_BT = (mask_BT.cumsum(dim=1) - 1).clamp(min=0)
        keep = {}
        if last_only:
            last_B = mask_BT.shape[1] - 1 - mask_BT.flip(1).argmax(dim=1)
            keep_U, index_B = torch.unique(last_B, return_inverse=True)
            keep = {"logits_to_keep": keep_U.to(self.device)}
        with self.forward_lock, torch.no_grad():
            self.on_forward(mask_BT.reshape(-1).bool(), ids_BT.reshape(-1))
            try:
                out = self.model(input_ids=ids_BT.to(self.device), attention_mask=mask_BT.to(self.device),
                                 position_ids=pos_BT.to(self.device), use_cache=False, **keep)
            finally:
                self.on_forward(None, None)
        if last_only:  # [B, U, V] -> each row's own position
            return out.logits[torch.arange(len(index_B), device=out.logits.device), index_B.to(out.logits.device)]
        return out.logits
