"""vLLM's /tokenize and /detokenize request bodies: a prompt or chat messages to token ids (the ids the completion
and chat routes would run), and token ids to text. No Ray, no FastAPI."""

from __future__ import annotations

from typing import Any

from moeray.request import InvalidRequest, RequestLimits
from moeray.serving.chat_template import chat_messages, render_chat
from moeray.serving.openai_protocol import _Body, _encode, _parse


class TokenizeBody(_Body):
    """vLLM's /tokenize: a ``prompt`` (text), or chat ``messages`` rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: Any = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (as vLLM)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeBody(_Body):
    model: str | None = None
    tokens: list[int]


def parse_tokenize(raw: Any, tokenizer, chat_template: str | None) -> tuple[TokenizeBody, list[int]]:
    """/tokenize: the body and the token ids of its prompt or messages (the ids /v1/completions or
    /v1/chat/completions would run)."""
    body = _parse(TokenizeBody, raw)
    if tokenizer is None:
        raise InvalidRequest("tokenize needs a checkpoint with a tokenizer")
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("tokenize takes a prompt (text) or messages, one of them")
    if body.prompt is not None:
        add = True if body.add_special_tokens is None else body.add_special_tokens
        return body, _encode(tokenizer, body.prompt, "prompt", add)
    text = render_chat(tokenizer, chat_template, chat_messages(body.messages), body.add_generation_prompt,
                       body.chat_template_kwargs)
    return body, _encode(tokenizer, text, "messages", bool(body.add_special_tokens))


def parse_detokenize(raw: Any, tokenizer, limits: RequestLimits) -> tuple[DetokenizeBody, str]:
    body = _parse(DetokenizeBody, raw)
    if tokenizer is None:
        raise InvalidRequest("detokenize needs a checkpoint with a tokenizer")
    bad = next((t for t in body.tokens if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"tokens: token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    return body, tokenizer.decode(body.tokens)
