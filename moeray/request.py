"""Requests, sampling parameters and results, and the checks that keep bad input out of a running batch."""

from __future__ import annotations

import dataclasses
import math
import re
import uuid
from collections.abc import Sequence

MAX_REQUEST_ID_CHARS = 128
# The most tokens one forward sends the expert workers (EngineConfig.max_forward_tokens): it bounds a worker's
# activation memory and the size of a message its data port accepts (moeray/transport/frames.py).
DEFAULT_MAX_FORWARD_TOKENS = 8192


def check_step_fits(max_batch_size: int, max_prefill_tokens: int, max_forward_tokens: int) -> None:
    """A step carries at most every running sequence's next token and the prefill budget: it must fit one forward."""
    step = max_batch_size + max_prefill_tokens
    if step > max_forward_tokens:
        raise ValueError(f"a step may carry max_batch_size + max_prefill_tokens = {max_batch_size} + "
                         f"{max_prefill_tokens} = {step} tokens, over max_forward_tokens {max_forward_tokens}: "
                         "raise max_forward_tokens or lower one of them")
MIN_TEMPERATURE = 1e-5  # below it (but above 0) logits / temperature overflow float32: the sampler would fail
MAX_LOGPROBS = 20  # the most alternatives a token's log-probabilities list (OpenAI's top_logprobs limit)
MAX_LOGIT_BIAS = 1024  # token ids one request may bias
MAX_REPETITION_PENALTY = 10.0
# A request whose router dies goes on at another from the tokens it streamed (Engine.stream, the ingress) this many
# times, then fails with the router's error.
MAX_MIGRATIONS = 3
_REQUEST_ID = re.compile(r"[!-~]+")  # printable ASCII, no spaces


class InvalidRequest(ValueError):
    """The request is malformed; the message names the field, the value and the limit."""


class DuplicateRequestId(InvalidRequest):
    """A request id that a request still in flight already uses (gRPC: ALREADY_EXISTS)."""


def new_request_id() -> str:
    """A server-chosen request id: 122 random bits from os.urandom (uuid4), so not guessable by other clients."""
    return uuid.uuid4().hex


def check_request_id(request_id: str, field: str = "request_id") -> str:
    """A client-chosen request id: 1 to MAX_REQUEST_ID_CHARS printable ASCII characters, no spaces."""
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
        size = f"{len(request_id)} characters" if isinstance(request_id, str) else type(request_id).__name__
        raise InvalidRequest(f"{field} must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters; got {size}")
    if not _REQUEST_ID.fullmatch(request_id):
        at = next(i for i, c in enumerate(request_id) if not "!" <= c <= "~")
        raise InvalidRequest(f"{field} must be printable ASCII without spaces; character {at} is "
                             f"{ascii(request_id[at])}")
    return request_id


STRUCTURED_KINDS = ("json", "json_schema", "regex", "choice", "grammar", "structural_tag")
MAX_STRUCTURED_CHARS = 64 * 1024  # a schema, regex or grammar's text


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """Output constrained to a language (moeray/router/grammar.py compiles it with xgrammar): ``json`` (any JSON
    object), ``json_schema`` (the JSON schema in ``spec``), ``regex``, ``choice`` (one of the strings in
    ``choices``), ``grammar`` (EBNF in ``spec``, as xgrammar reads it) or ``structural_tag`` (xgrammar's JSON
    structural tag: how tool_choice enforces a call)."""

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidRequest(f"structured output kind {self.kind!r} is not one of {STRUCTURED_KINDS}")
        if len(self.spec) > MAX_STRUCTURED_CHARS or sum(map(len, self.choices)) > MAX_STRUCTURED_CHARS:
            raise InvalidRequest(f"a structured output's {self.kind} is over {MAX_STRUCTURED_CHARS} characters")
        if self.kind == "choice" and not self.choices:
            raise InvalidRequest("a choice structured output needs at least one choice")
        object.__setattr__(self, "choices", tuple(self.choices))


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
    # Log-probabilities of each new token, and of this many most likely alternatives (None: none), from the model's
    # own logits: log-softmax in float32 over the whole vocabulary, before temperature, top-k or top-p.
    logprobs: int | None = None
    # Logit adjustments, applied in this order before temperature (as vLLM does): ``logit_bias`` added per token id;
    # stop and end-of-sequence tokens barred until ``min_tokens`` new tokens; ``repetition_penalty`` (> 1 less
    # likely) on every token in the prompt or output, CTRL's rule (a positive logit divided, a negative one
    # multiplied); ``frequency_penalty`` times each token's count in the output, and ``presence_penalty`` once for
    # any count, subtracted. ``min_p`` then drops, after temperature, tokens below min_p times the top probability.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # The output must belong to this language: tokens outside it are masked before sampling, and generation ends
    # (a stop token) where the language allows nothing more.
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise InvalidRequest(f"max_new_tokens must be a positive integer; got {self.max_new_tokens!r}")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < math.inf):  # also rejects NaN
            raise InvalidRequest(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}; got "
                                 f"{self.temperature!r}")
        if not 0 < self.top_p <= 1:  # also rejects NaN
            raise InvalidRequest(f"top_p must lie in (0, 1]; got {self.top_p!r}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 disables it); got {self.top_k!r}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidRequest(f"seed must lie in [0, 2**64); got {self.seed!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequest(f"logprobs must lie in [0, {MAX_LOGPROBS}] (alternatives per token); got "
                                 f"{self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:  # also rejects NaN
                raise InvalidRequest(f"{name} must lie in [-2, 2]; got {getattr(self, name)!r}")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidRequest(f"repetition_penalty must lie in (0, {MAX_REPETITION_PENALTY}] (1: none); got "
                                 f"{self.repetition_penalty!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest(f"min_p must lie in [0, 1]; got {self.min_p!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidRequest(f"min_tokens must lie in [0, max_new_tokens {self.max_new_tokens}]; got "
                                 f"{self.min_tokens!r}")
        bias = tuple((int(t), float(b)) for t, b in dict(self.logit_bias).items())
        if len(bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias holds {len(bias)} tokens; at most {MAX_LOGIT_BIAS} are allowed")
        bad = next(((t, b) for t, b in bias if not -100.0 <= b <= 100.0), None)
        if bad is not None:
            raise InvalidRequest(f"logit_bias for token {bad[0]} must lie in [-100, 100]; got {bad[1]!r}")
        object.__setattr__(self, "logit_bias", bias)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def adjusts_logits(self) -> bool:
        """Whether any logit adjustment is set (the sampler skips the rest)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token's log-probability, its rank, and the most likely tokens at its position with theirs (most likely
    first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int = 1  # 1 + how many tokens are more likely than this one


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationResult:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]  # new tokens only
    finish_reason: str  # "stop" (a stop/eos token), "length" (max_new_tokens) or "abort"
    logprobs: list[TokenLogprob] | None = None  # one per output token, when SamplingParams.logprobs asked

    def to_json(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "output_ids": self.output_ids}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamChunk:
    """New tokens of one streaming request since its previous chunk; the last chunk carries the finish reason."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None  # set on the last chunk only
    logprobs: list[TokenLogprob] | None = None  # one per token, when SamplingParams.logprobs asked


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
        bad = next((t for t, _ in sampling.logit_bias if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"logit_bias token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def check_resumed(self, resumed: Sequence[int], sampling: SamplingParams) -> list[int]:
        """A resumed request's output so far (tokens it streamed before its router died): fewer than it may make."""
        ids = list(resumed)
        if ids and len(ids) >= sampling.max_new_tokens:
            raise InvalidRequest(f"{len(ids)} resumed tokens leave nothing of max_new_tokens {sampling.max_new_tokens}")
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"resumed token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def check_batch(self, prompts: Sequence[Sequence[int]],
                    sampling: SamplingParams | Sequence[SamplingParams | None] | None) -> list[SamplingParams]:
        """Every prompt of a batch checked before any starts (the error names the prompt); one sampling setting for
        all, or one per prompt. Returns the settings per prompt."""
        samplings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        if len(samplings) != len(prompts):
            raise InvalidRequest(f"{len(samplings)} sampling parameter sets for {len(prompts)} prompts")
        samplings = [s or SamplingParams() for s in samplings]
        for i, (p, s) in enumerate(zip(prompts, samplings)):
            try:
                self.check(p, s)
            except InvalidRequest as e:
                raise InvalidRequest(f"prompt {i}: {e}") from None
        return samplings
