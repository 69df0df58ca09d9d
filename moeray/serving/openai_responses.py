"""The OpenAI-compatible HTTP API's response bodies: completions whole or as server-sent events, and errors.

No Ray, no FastAPI here (the routes in moeray/serving/openai_api.py send what these build). Errors are OpenAI's
shape, ``{"error": {"message", "type", "param", "code"}}``; the status comes from moeray/serving/errors.py's table.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable

from moeray.serving.openai_protocol import UNSUPPORTED, Parsed

# HTTP status -> OpenAI's error type and code
_KIND = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
         403: ("invalid_request_error", "permission_denied"), 404: ("invalid_request_error", "not_found"),
         405: ("invalid_request_error", "method_not_allowed"), 409: ("invalid_request_error", "conflict"),
         413: ("invalid_request_error", "request_too_large"), 429: ("rate_limit_error", "rate_limit_exceeded"),
         500: ("server_error", "internal_error"), 503: ("service_unavailable", "service_unavailable")}
_FIELDS = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
           "seed", "stop", "stream", "stream_options", "n", "ignore_eos", "stop_token_ids", "return_token_ids",
           "include_stop_str_in_output", "skip_special_tokens", "add_special_tokens", "add_generation_prompt",
           "chat_template_kwargs", "user", "logprobs", "top_logprobs", "echo", "prompt_logprobs",
           "presence_penalty", "frequency_penalty", "logit_bias", "repetition_penalty", "min_p", "min_tokens",
           "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "tools", "tool_choice",
           "parallel_tool_calls", *UNSUPPORTED}
_PARAM = re.compile(r"(?:prompt \d+: )?([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*)")
_PARAM_PREFIXES = {"stop token id": "stop_token_ids", "prompt token id": "prompt", "prompt of": "prompt"}
DONE = "data: [DONE]\n\n"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclasses.dataclass(slots=True)
class Piece:
    """New output of one choice: its text delta, token ids (and their TokenLogprobs when asked for), and on the last
    piece the finish reason. A choice's first piece carries its prompt when the request echoes it or asked for the
    prompt's logprobs (``prompt_ids``; ``prompt_logprobs``: a TokenLogprob per position, None for the first)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list | None = None
    prompt_ids: list[int] | None = None
    prompt_logprobs: list | None = None
    tool_calls: list[dict] | None = None  # calls completed in this piece (OpenAI's shape, without an index)
    reasoning: str = ""  # the model's reasoning (harmony's analysis channel), vLLM's reasoning_content


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind, default_code = _KIND.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def param_of(message: str) -> str | None:
    """The request field a message names (they start with it: 'max_tokens 9000 is above ...')."""
    for prefix, param in _PARAM_PREFIXES.items():
        if message.startswith(prefix) or message.partition(": ")[2].startswith(prefix):
            return param
    m = _PARAM.match(message)
    if m and re.split(r"[.\[]", m.group(1))[0] in _FIELDS:
        return m.group(1)
    return None


def event(data: dict) -> str:
    """One server-sent event."""
    return f"data: {_dumps(data)}\n\n"


def usage(parsed: Parsed, completion_tokens: int) -> dict:
    prompt = sum(len(j.prompt_ids) for j in parsed.jobs if j.first in (-1, j.index))  # once per prompt, as OpenAI
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def keep_best(pieces: list[Piece], parsed: Parsed) -> tuple[list[Piece], Parsed]:
    """best_of: per prompt, the ``n`` candidates with the highest mean logprob per new token (ties: the lower
    index), renumbered prompt x n + rank, with the request reduced to their jobs."""
    if parsed.best_of == parsed.n:
        return pieces, parsed
    total, count = {}, {}
    for p in pieces:
        total[p.index] = total.get(p.index, 0.0) + sum(r.logprob for r in p.logprobs or ())
        count[p.index] = count.get(p.index, 0) + len(p.token_ids)
    mean = {j.index: total.get(j.index, 0.0) / max(count.get(j.index, 0), 1) for j in parsed.jobs}
    renumber = {}
    for start in range(0, len(parsed.jobs), parsed.best_of):
        group = parsed.jobs[start:start + parsed.best_of]
        best = sorted(group, key=lambda j: (-mean[j.index], j.index))[:parsed.n]
        for rank, job in enumerate(best):
            renumber[job.index] = start // parsed.best_of * parsed.n + rank
    jobs = [dataclasses.replace(j, index=renumber[j.index], first=renumber[j.index] // parsed.n * parsed.n)
            for j in parsed.jobs if j.index in renumber]  # ``first``: usage counts each prompt once
    kept = [dataclasses.replace(p, index=renumber[p.index], logprobs=p.logprobs if parsed.logprobs is not None
                                else None) for p in pieces if p.index in renumber]
    return kept, dataclasses.replace(parsed, jobs=sorted(jobs, key=lambda j: j.index), best_of=parsed.n)


def whole(pieces: list[Piece], parsed: Parsed, chat: bool, meta: dict, decode: Callable[[int], str]) -> dict:
    """A completion (``chat``: chat completion) answered at once, one choice per prompt; ``meta``: id, created,
    model; ``decode``: a token id's text (for log-probabilities)."""
    texts = {j.index: [] for j in parsed.jobs}
    tokens = {j.index: [] for j in parsed.jobs}
    records = {j.index: [] for j in parsed.jobs}
    calls = {j.index: [] for j in parsed.jobs}
    reasoning = {j.index: [] for j in parsed.jobs}
    prompt: dict[int, Piece] = {}
    reasons: dict[int, str | None] = {j.index: None for j in parsed.jobs}
    for p in pieces:
        texts[p.index].append(p.text)
        tokens[p.index].extend(p.token_ids)
        records[p.index].extend(p.logprobs or ())
        calls[p.index].extend(p.tool_calls or ())
        reasoning[p.index].append(p.reasoning)
        if p.prompt_ids is not None:
            prompt[p.index] = p
        reasons[p.index] = p.finish_reason or reasons[p.index]
    choices = []
    for job in parsed.jobs:
        i, text = job.index, "".join(texts[job.index])
        if chat:
            logprobs = None if parsed.logprobs is None else chat_logprobs(tokens[i], records[i], decode)
            message = {"role": "assistant", "content": text}
            if calls[i]:  # content null when only calls were said
                message = {"role": "assistant", "content": text.strip() or None, "tool_calls": calls[i]}
            if any(reasoning[i]):
                message["reasoning_content"] = "".join(reasoning[i])
            choice = {"index": i, "message": message, "logprobs": logprobs, "finish_reason": reasons[i]}
        else:
            logprobs = None
            if parsed.logprobs is not None:
                ids, recs = tokens[i], records[i]
                if parsed.echo and i in prompt:
                    ids, recs = prompt[i].prompt_ids + ids, prompt[i].prompt_logprobs + recs
                logprobs, _ = completion_logprobs(ids, recs, decode, 0)
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reasons[i]}
        if i in prompt and prompt[i].prompt_logprobs is not None and parsed.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(prompt[i].prompt_ids, prompt[i].prompt_logprobs, decode)
        if parsed.return_token_ids:
            choice["prompt_token_ids"] = job.prompt_ids
            choice["token_ids"] = tokens[i]
        choices.append(choice)
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": usage(parsed, sum(map(len, tokens.values())))}


def completion_logprobs(token_ids: list[int], records: list, decode: Callable[[int], str],
                        offset: int) -> tuple[dict, int]:
    """The legacy completions shape (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``) of tokens
    whose text starts at ``offset`` in the choice's text; records may be None (a prompt's first token). Returns it
    and the offset after the tokens. Offsets add up each token's own text, as vLLM's do."""
    texts = [decode(t) for t in token_ids]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [None if r is None else r.logprob for r in records],
            "top_logprobs": [None if r is None else {decode(t): lp for t, lp in r.top} for r in records],
            "text_offset": offsets}, offset


def _entry(token_id: int, logprob: float, decode: Callable[[int], str]) -> dict:
    text = decode(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}


def chat_logprobs(token_ids: list[int], records: list, decode: Callable[[int], str]) -> dict:
    """Chat's shape: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``."""
    return {"content": [{**_entry(t, r.logprob, decode), "top_logprobs": [_entry(a, lp, decode) for a, lp in r.top]}
                        for t, r in zip(token_ids, records)]}


def vllm_prompt_logprobs(prompt_ids: list[int], records: list, decode: Callable[[int], str]) -> list:
    """vLLM's ``prompt_logprobs``: per position None (the first) or ``{token id: {logprob, rank, decoded_token}}`` for
    the prompt's token and its alternatives."""
    out = []
    for t, r in zip(prompt_ids, records):
        if r is None:
            out.append(None)
            continue
        entry = {str(a): {"logprob": lp, "rank": k + 1, "decoded_token": decode(a)} for k, (a, lp) in enumerate(r.top)}
        entry[str(t)] = {"logprob": r.logprob, "rank": r.rank, "decoded_token": decode(t)}
        out.append(entry)
    return out


def first_choices(parsed: Parsed) -> list[dict]:
    """A chat stream's first event: each choice's role."""
    return [{"index": j.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for j in parsed.jobs]


class StreamState:
    """Per choice of a stream, where its text stands (completions' ``text_offset`` runs on over its chunks) and how
    many tool calls it has sent (their deltas' ``index``)."""

    def __init__(self, parsed: Parsed, decode: Callable[[int], str]) -> None:
        self.parsed, self.decode = parsed, decode
        self.offset: dict[int, int] = {}
        self.calls: dict[int, int] = {}  # per choice, the tool calls streamed so far (their deltas' index)

    def of(self, piece: Piece, chat: bool) -> dict | None:
        """The ``logprobs`` of the event ``piece`` makes (None where none were asked for)."""
        if self.parsed.logprobs is None:
            return None
        ids, recs = piece.token_ids, piece.logprobs or []
        if chat:
            return chat_logprobs(ids, recs, self.decode)
        if piece.prompt_ids is not None and self.parsed.echo:
            ids, recs = piece.prompt_ids + ids, piece.prompt_logprobs + recs
        out, self.offset[piece.index] = completion_logprobs(ids, recs, self.decode, self.offset.get(piece.index, 0))
        return out


def piece_choices(piece: Piece, chat: bool, return_token_ids: bool, state: StreamState) -> list[list[dict]]:
    """The choices of the stream events one piece makes, in order (none when it carries nothing to send)."""
    ids = {"token_ids": piece.token_ids} if return_token_ids else {}
    prompt = {}
    if piece.prompt_ids is not None and piece.prompt_logprobs is not None and state.parsed.prompt_logprobs is not None:
        prompt = {"prompt_logprobs": vllm_prompt_logprobs(piece.prompt_ids, piece.prompt_logprobs, state.decode)}
    # a piece whose text is held back (a partial character) still carries its tokens' logprobs
    scored = bool(piece.token_ids) and state.parsed.logprobs is not None
    if not chat:
        if piece.text or ids or prompt or scored or piece.finish_reason is not None:
            return [[{"index": piece.index, "text": piece.text, "logprobs": state.of(piece, chat),
                      "finish_reason": piece.finish_reason, **ids, **prompt}]]
        return []
    out = []
    if piece.tool_calls:
        state.calls[piece.index] = first = state.calls.get(piece.index, 0)
        state.calls[piece.index] += len(piece.tool_calls)
        out.append([{"index": piece.index, "delta": {"tool_calls": [
            {"index": first + k, **call} for k, call in enumerate(piece.tool_calls)]}, "logprobs": None,
            "finish_reason": None}])
    if piece.reasoning:
        out.append([{"index": piece.index, "delta": {"reasoning_content": piece.reasoning}, "logprobs": None,
                     "finish_reason": None}])
    if piece.text or ids or scored or prompt:
        out.append([{"index": piece.index, "delta": {"content": piece.text},
                     "logprobs": state.of(piece, chat) if piece.token_ids else None, "finish_reason": None,
                     **ids, **prompt}])
    if piece.finish_reason is not None:
        out.append([{"index": piece.index, "delta": {}, "logprobs": None, "finish_reason": piece.finish_reason}])
    return out
