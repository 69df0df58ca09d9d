"""One request's state in a router (``Sequence``), and how its next token is picked from its logits.

The scheduler (``moeray.router.scheduler``) admits, steps and retires sequences; the router starts them for its
callers and streams their tokens (``on_token``, ``on_done``).

Shape legend: B sequences sampled, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable

import torch

from moeray.request import GenerationResult, SamplingParams, TokenLogprob
from moeray.router.kv_blocks import SeqBlocks


@dataclasses.dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stop_ids: frozenset[int]
    on_token: Callable[[int, TokenLogprob | None], None] | None = None  # each new token (and its logprobs)
    on_done: Callable[[Sequence], None] | None = None  # once, when it finished or failed (after ``done`` is set)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    aborted: bool = False
    span: object = None  # the request's router span (telemetry): step spans link to it
    arrived_s: float = dataclasses.field(default_factory=time.perf_counter)
    last_token_s: float = 0.0  # when its latest token came (telemetry: time to first token, inter-token latency)
    kv: SeqBlocks = dataclasses.field(default_factory=SeqBlocks)
    num_computed: int = 0  # positions whose keys and values are in the pool
    output_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # when sampling.logprobs asks
    matcher: object = None  # its structured output's xgrammar matcher (moeray/router/grammar.py), if it has one

    def __post_init__(self) -> None:
        self.generator = None
        if not self.sampling.greedy:
            self.generator = torch.Generator()
            self.base_seed = self.sampling.seed if self.sampling.seed is not None else random.getrandbits(63)

    def seeded_generator(self) -> torch.Generator:
        """The generator for the next draw, seeded by (the request's seed, how many tokens it has produced): the
        sampler's whole state is in the request, so a sequence resumed elsewhere from its output so far (a router
        lost, moeray/serving/engine_handle.py) draws exactly what it would have."""
        self.generator.manual_seed(hash((self.base_seed, len(self.output_ids))) & (2**63 - 1))
        return self.generator

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, stop: int) -> list[int]:
        """Positions ``start:stop`` of prompt + output, without concatenating the whole sequence."""
        n = len(self.prompt_ids)
        return self.prompt_ids[start:stop] + self.output_ids[max(start - n, 0):max(stop - n, 0)]

    def result(self) -> GenerationResult:
        return GenerationResult(request_id=self.request_id, prompt_ids=self.prompt_ids,
                                output_ids=list(self.output_ids), finish_reason=self.finish_reason or "abort",
                                logprobs=list(self.output_logprobs) if self.sampling.logprobs is not None else None)


def adjusted_logits(logits_V: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """``seq``'s logit adjustments (SamplingParams: logit_bias, min_tokens, repetition, frequency and presence
    penalties, in that order) applied to its next-token logits, in float32; a new tensor."""
    s, logits_V = seq.sampling, logits_V.float().clone()
    if s.logit_bias:
        ids, bias = zip(*s.logit_bias)
        logits_V[list(ids)] += torch.tensor(bias, device=logits_V.device)
    if len(seq.output_ids) < s.min_tokens and seq.stop_ids:
        logits_V[sorted(seq.stop_ids)] = float("-inf")
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.output_ids)), device=logits_V.device)
        picked = logits_V[seen]
        logits_V[seen] = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
    if (s.frequency_penalty or s.presence_penalty) and seq.output_ids:
        count_V = torch.bincount(torch.tensor(seq.output_ids), minlength=logits_V.numel()).to(logits_V)
        logits_V -= s.frequency_penalty * count_V + s.presence_penalty * (count_V > 0).to(logits_V)
    return logits_V


def sample_next(logits_BV: torch.Tensor, seqs: list[Sequence], allowed_BV: torch.Tensor | None = None) -> list[int]:
    """Each sequence's next token: the argmax where greedy, else a draw after temperature, top-k, top-p and min-p,
    from the sequence's own generator (seeded per request); logit adjustments first where a sequence sets any, and
    only the tokens ``allowed_BV`` allows (its structured output's mask) where it has a grammar."""
    tokens = logits_BV.argmax(dim=-1).tolist()
    for b, seq in enumerate(seqs):
        s = seq.sampling
        adjusted = s.adjusts_logits or seq.matcher is not None
        logits_V = adjusted_logits(logits_BV[b], seq) if s.adjusts_logits else logits_BV[b]
        if seq.matcher is not None:
            logits_V = logits_V.float().masked_fill(~allowed_BV[b].to(logits_V.device), float("-inf"))
        if s.greedy:
            if adjusted:
                tokens[b] = int(logits_V.argmax())
            continue
        logits_V = logits_V.float() / s.temperature
        if s.min_p:  # on the whole distribution after temperature, before top-k and top-p (as vLLM)
            probs_V = torch.softmax(logits_V, dim=-1)
            logits_V = logits_V.masked_fill(probs_V < s.min_p * probs_V.max(), float("-inf"))
        if s.top_k:
            kth = torch.topk(logits_V, min(s.top_k, logits_V.numel())).values[-1]
            logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
        probs_V = torch.softmax(logits_V, dim=-1)
        if s.top_p < 1:
            sorted_V, order_V = probs_V.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop_V = sorted_V.cumsum(0) - sorted_V >= s.top_p
            probs_V = probs_V.scatter(0, order_V, sorted_V.masked_fill(drop_V, 0))
        tokens[b] = int(torch.multinomial(probs_V, 1, generator=seq.seeded_generator()))
    return tokens


def token_logprobs(logits_TV: torch.Tensor, token_ids: list[int], top: int) -> list[TokenLogprob]:
    """Each row's log-probability of ``token_ids[t]`` and its ``top`` most likely tokens: log-softmax in float32 over
    the whole vocabulary of the model's own logits (no temperature, top-k or top-p), as transformers' would be."""
    logprobs_TV = torch.log_softmax(logits_TV.float(), dim=-1)
    chosen_T1 = logprobs_TV.gather(1, torch.tensor(token_ids, device=logprobs_TV.device)[:, None])
    rank_T = ((logprobs_TV > chosen_T1).sum(dim=1) + 1).tolist()
    chosen_T = chosen_T1[:, 0].tolist()
    if top:
        values_TN, ids_TN = torch.topk(logprobs_TV, min(top, logprobs_TV.shape[-1]), dim=-1)
        tops = [tuple(zip(i_N, v_N)) for i_N, v_N in zip(ids_TN.tolist(), values_TN.tolist())]
    else:
        tops = [()] * len(token_ids)
    return [TokenLogprob(t, lp, top_N, r) for t, lp, top_N, r in zip(token_ids, chosen_T, tops, rank_T)]


def sampled_logprobs(logits_BV: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprob | None]:
    """Per sequence, its new token's log-probabilities where its sampling asks for them (else None)."""
    want = [b for b, seq in enumerate(seqs) if seq.sampling.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(seqs)
    if want:
        top = max(seqs[b].sampling.logprobs for b in want)
        for b, record in zip(want, token_logprobs(logits_BV[want], [tokens[b] for b in want], top)):
            out[b] = dataclasses.replace(record, top=record.top[:seqs[b].sampling.logprobs])
    return out
