"""The OpenAI-compatible HTTP API's response bodies: completions whole or as server-sent events, and errors.

No Ray, no FastAPI here (the routes in moeray/serving/openai_api.py send what these build). Errors are OpenAI's
shape, ``{"error": {"message", "type", "param", "code"}}``; the status comes from moeray/serving/errors.py's table.
"""

from __future__ import annotations

import dataclasses
import json
import re

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
           "chat_template_kwargs", "user", *UNSUPPORTED}
_PARAM = re.compile(r"(?:prompt \d+: )?([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*)")
_PARAM_PREFIXES = {"stop token id": "stop_token_ids", "prompt token id": "prompt", "prompt of": "prompt"}
DONE = "data: [DONE]\n\n"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclasses.dataclass(slots=True)
class Piece:
    """New output of one choice: its text delta, token ids, and on the last piece the finish reason."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


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
    prompt = sum(len(j.prompt_ids) for j in parsed.jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def whole(pieces: list[Piece], parsed: Parsed, chat: bool, meta: dict) -> dict:
    """A completion (``chat``: chat completion) answered at once, one choice per prompt; ``meta``: id, created,
    model."""
    texts = {j.index: [] for j in parsed.jobs}
    tokens = {j.index: [] for j in parsed.jobs}
    reasons: dict[int, str | None] = {j.index: None for j in parsed.jobs}
    for p in pieces:
        texts[p.index].append(p.text)
        tokens[p.index].extend(p.token_ids)
        reasons[p.index] = p.finish_reason or reasons[p.index]
    choices = []
    for job in parsed.jobs:
        i, text = job.index, "".join(texts[job.index])
        if chat:
            choice = {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reasons[i]}
        else:
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": reasons[i]}
        if parsed.return_token_ids:
            choice["prompt_token_ids"] = job.prompt_ids
            choice["token_ids"] = tokens[i]
        choices.append(choice)
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": usage(parsed, sum(map(len, tokens.values())))}


def first_choices(parsed: Parsed) -> list[dict]:
    """A chat stream's first event: each choice's role."""
    return [{"index": j.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for j in parsed.jobs]


def piece_choices(piece: Piece, chat: bool, return_token_ids: bool) -> list[list[dict]]:
    """The choices of the stream events one piece makes, in order (none when it carries nothing to send)."""
    ids = {"token_ids": piece.token_ids} if return_token_ids else {}
    if not chat:
        if piece.text or ids or piece.finish_reason is not None:
            return [[{"index": piece.index, "text": piece.text, "logprobs": None,
                      "finish_reason": piece.finish_reason, **ids}]]
        return []
    out = []
    if piece.text or ids:
        out.append([{"index": piece.index, "delta": {"content": piece.text}, "logprobs": None, "finish_reason": None,
                     **ids}])
    if piece.finish_reason is not None:
        out.append([{"index": piece.index, "delta": {}, "logprobs": None, "finish_reason": piece.finish_reason}])
    return out
