"""Requests, sampling parameters and results, and the checks that keep bad input out of a running batch."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


class InvalidRequest(ValueError):
    """The request is malformed; the message names the field, the value and the limit."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Greedy by default (temperature 0); ``seed`` makes sampled output reproducible."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise InvalidRequest(f"max_new_tokens must be a positive integer; got {self.max_new_tokens!r}")
        if not self.temperature >= 0:  # also rejects NaN
            raise InvalidRequest(f"temperature must be >= 0; got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must lie in (0, 1]; got {self.top_p!r}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 disables it); got {self.top_k!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationResult:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]  # new tokens only
    finish_reason: str  # "stop" (a stop/eos token), "length" (max_new_tokens) or "abort"

    def to_json(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "output_ids": self.output_ids}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamChunk:
    """New tokens of one streaming request since its previous chunk; the last chunk carries the finish reason."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None  # set on the last chunk only


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestLimits:
    vocab_size: int
    max_positions: int
    max_new_tokens_cap: int

    @classmethod
    def of(cls, spec, max_new_tokens_cap: int) -> RequestLimits:
        """The limits of a model (a ``ModelSpec``) with a deployment's cap on new tokens."""
        return cls(vocab_size=spec.vocab_size, max_positions=spec.max_positions, max_new_tokens_cap=max_new_tokens_cap)

    def check(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> list[int]:
        ids = list(prompt_ids)
        if not ids:
            raise InvalidRequest("prompt is empty; it needs at least 1 token")
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"prompt token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        if sampling.max_new_tokens > self.max_new_tokens_cap:
            raise InvalidRequest(f"max_new_tokens {sampling.max_new_tokens} is above the cap "
                                 f"{self.max_new_tokens_cap}")
        if len(ids) + sampling.max_new_tokens > self.max_positions:
            raise InvalidRequest(
                f"prompt of {len(ids)} tokens plus max_new_tokens {sampling.max_new_tokens} exceeds the model's "
                f"{self.max_positions} positions"
            )
        bad = next((t for t in sampling.stop_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"stop token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return ids
