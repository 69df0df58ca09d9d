"""The OpenAI-compatible HTTP API's requests: their fields, checked, turned into moeray prompts and SamplingParams.

No Ray, no FastAPI here (tests/unit/test_openai_protocol.py runs it alone): ``parse_completion`` and ``parse_chat``
take the decoded JSON body and return the ``Job``s to run (one per prompt), or raise ``InvalidRequest`` naming the
field and the limit (HTTP 400). pydantic checks types (strictly: "16" is not an integer, 1 is not a boolean); a
``pydantic.ValidationError`` becomes one ``InvalidRequest`` through ``validation_message``.

Fields (both endpoints): ``model``, ``max_tokens`` (chat: also ``max_completion_tokens``), ``temperature``
(default 1.0, OpenAI's), ``top_p``, ``seed``, ``stop`` (a string or up to 16 strings), ``stream``,
``stream_options.include_usage``, ``n`` (choices per prompt, up to 16: one prefill, the others reuse its prompt
blocks; with a seed, choice k samples with seed + k), ``best_of`` (completions: that many candidates, the n with the
highest mean logprob per token returned; not streamed); moeray's extras, as vLLM names them: ``top_k`` (0 or -1: off),
``ignore_eos``, ``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``, ``return_token_ids``
(token ids in each choice; on by default when the checkpoint has no tokenizer) and, for completions,
``add_special_tokens`` (default true: a text prompt gets the tokenizer's BOS, as vLLM does). Log-probabilities:
completions' ``logprobs`` (alternatives per token, 0-20) and ``echo`` (the prompt first, with its logprobs when
``logprobs`` is set; ``max_tokens`` 0 then scores the prompt alone), chat's ``logprobs`` and ``top_logprobs``, and
vLLM's ``prompt_logprobs`` on both. Logit adjustments: ``presence_penalty``, ``frequency_penalty``, ``logit_bias``
and vLLM's ``repetition_penalty``, ``min_p``, ``min_tokens`` (moeray.request.SamplingParams says how each applies).
Structured outputs (moeray/router/grammar.py): ``response_format`` (``json_object``, ``json_schema``) or vLLM's
``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``. Fields that would change the output and are
not implemented (functions, suffix, ...) are refused when set to anything but their neutral value; any other
unknown field is ignored.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from moeray.request import MAX_LOGPROBS, InvalidRequest, RequestLimits, SamplingParams, StructuredOutput
from moeray.serving.detokenize import check_stop_strings
from moeray.serving.chat_template import chat_messages, render_chat
from moeray.serving.errors import clip
from moeray.serving.tool_calls import SYNTAXES, CallSyntax, ToolRequest, check_tools, forced

MAX_PROMPTS = 64  # prompts in one /v1/completions request (each takes an admission place)
MAX_N = 16  # choices per prompt (each takes an admission place)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to what the positions allow

# field -> its neutral values: any other value is refused (the feature is not implemented)
UNSUPPORTED = {
    "suffix": (None, ""), "functions": (None, []), "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far on every chunk (with include_usage)


class _Common(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Any = None  # a string or a list of strings: checked by check_stop_strings, which names the limits
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    # moeray's extras (vLLM's names)
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool | None = None
    prompt_logprobs: int | None = None  # vLLM's: each prompt position's logprob and this many alternatives
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias in [-100, 100]
    repetition_penalty: float | None = None  # vLLM's extras
    min_p: float | None = None
    min_tokens: int = 0
    # structured outputs: OpenAI's response_format, or vLLM's guided_* (one of them)
    response_format: dict[str, Any] | None = None
    guided_json: Any = None  # a JSON schema, as an object or its text
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionBody(_Common):
    prompt: Any  # a string, token ids, or a list of either: checked in parse_completion
    add_special_tokens: bool = True
    logprobs: int | None = None  # each token's logprob and this many alternatives (the legacy shape)
    echo: bool = False  # the prompt before the completion (with its logprobs when logprobs is set)
    best_of: int | None = None  # candidates per prompt, of which the n most likely per token are returned


class ChatBody(_Common):
    messages: Any  # checked in chat_messages
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: Any = None  # checked in moeray/serving/tool_calls.py
    tool_choice: Any = None
    parallel_tool_calls: bool = True


@dataclasses.dataclass(frozen=True)
class Job:
    """One prompt of a request, ready to run."""

    index: int
    prompt_ids: list[int]
    sampling: SamplingParams
    prompt_text: str | None = None  # as the client sent it (echo returns it)
    generate: bool = True  # False: max_tokens 0 with echo, the prompt's logprobs only
    first: int = -1  # with n > 1, the index of its prompt's first choice, whose prefill the others share


@dataclasses.dataclass(frozen=True)
class Parsed:
    jobs: list[Job]
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    return_token_ids: bool
    model: str | None
    logprobs: int | None = None  # alternatives per new token (None: no logprobs)
    echo: bool = False
    continuous_usage: bool = False  # usage on every chunk of a stream
    tools: ToolRequest | None = None  # a chat request's tools, whose calls the output is parsed for
    syntax: CallSyntax | None = None  # a chat answer's call syntax (moeray/serving/tool_calls.py)
    n: int = 1  # choices returned per prompt; the jobs hold best_of candidates per prompt when that is more
    best_of: int = 1
    prompt_logprobs: int | None = None  # alternatives per prompt position (None: none): echo's, or vLLM's field


def validation_message(error: ValidationError) -> tuple[str, str]:
    """(one-line message, param) for pydantic's first error: the field's dotted path, what was wrong, the value."""
    first = error.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or "body"
    if first["type"] == "missing":
        return f"{param} is required", param
    return f"{param}: {first['msg']}; got {show(first.get('input'))}", param


def show(value: Any) -> str:
    """A client's value for an error message: strings quoted and cut, numbers as they are, containers by type."""
    if isinstance(value, str):
        return clip(value)
    if value is None or isinstance(value, (bool, int, float)):
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
        return text if len(text) <= 64 else text[:40] + f"... ({len(text)} digits)"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


def check_unsupported(body: dict) -> None:
    for field, neutral in UNSUPPORTED.items():
        if field in body and body[field] not in neutral:
            raise InvalidRequest(f"{field} is not supported by this server; leave it unset (got {show(body[field])})")


def _count(value: int | None, field: str) -> int | None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise InvalidRequest(f"{field} must lie in [0, {MAX_LOGPROBS}]; got {value}")
    return value


def _logprobs(body: _Common) -> tuple[int | None, bool, int | None]:
    """(alternatives per new token, echo, alternatives per prompt position), each None when not asked for."""
    prompt = _count(body.prompt_logprobs, "prompt_logprobs")
    if isinstance(body, ChatBody):
        top = _count(body.top_logprobs, "top_logprobs")
        if top is not None and not body.logprobs:
            raise InvalidRequest(f"top_logprobs ({top}) needs logprobs: true")
        return (top or 0) if body.logprobs else None, False, prompt
    top = _count(body.logprobs, "logprobs")
    if body.echo and top is not None and prompt is None:
        prompt = top  # echo with logprobs: the prompt's tokens carry them too (OpenAI's legacy completions)
    return top, body.echo, prompt


def _structured(body: _Common) -> StructuredOutput | None:
    """The body's structured output (response_format or one guided_* field), or None."""
    given = {name: getattr(body, name) for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
             if getattr(body, name) is not None}
    fmt = body.response_format
    if fmt is not None and fmt.get("type") != "text":
        given["response_format"] = fmt
    if len(given) > 1:
        raise InvalidRequest(f"set one structured output at a time; got {', '.join(sorted(given))}")
    if not given:
        return None
    (name, value), = given.items()
    if name == "response_format":
        kind = value.get("type")
        if kind == "json_object":
            return StructuredOutput("json")
        if kind != "json_schema":
            raise InvalidRequest(f"response_format.type must be text, json_object or json_schema; got {show(kind)}")
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequest("response_format.json_schema must be an object with a schema object")
        return StructuredOutput("json_schema", json.dumps(spec.get("schema", {})))
    if name == "guided_json":
        if not isinstance(value, (dict, str)):
            raise InvalidRequest(f"guided_json must be a JSON schema (an object or its text); got {show(value)}")
        return StructuredOutput("json_schema", value if isinstance(value, str) else json.dumps(value))
    if name == "guided_choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidRequest("guided_choice must be a non-empty list of non-empty strings")
        return StructuredOutput("choice", choices=tuple(value))
    return StructuredOutput("regex" if name == "guided_regex" else "grammar", value)


def _adjustments(body: _Common) -> dict:
    """The logit adjustments a body sets, as SamplingParams fields (which check their ranges)."""
    out = {name: float(getattr(body, name)) for name in ("presence_penalty", "frequency_penalty",
                                                         "repetition_penalty", "min_p")
           if getattr(body, name) is not None}
    if body.min_tokens:
        out["min_tokens"] = body.min_tokens
    if body.logit_bias:
        bias = []
        for key, value in body.logit_bias.items():
            if not key.strip().isdigit():
                raise InvalidRequest(f"logit_bias keys must be token ids; got {clip(key)}")
            bias.append((int(key), float(value)))
        out["logit_bias"] = tuple(bias)
    return out


def _common(body: _Common, prompts: list[list[int]], limits: RequestLimits, max_tokens: int | None,
            default_max_tokens: int | None, has_tokenizer: bool, texts: list[str | None] | None = None,
            tools: ToolRequest | None = None, syntax: CallSyntax | None = None) -> Parsed:
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"n must lie in [1, {MAX_N}] (choices per prompt); got {n}")
    best_of = getattr(body, "best_of", None) or n
    if not n <= best_of <= MAX_N:
        raise InvalidRequest(f"best_of must lie in [n = {n}, {MAX_N}]; got {best_of}")
    if best_of > n and body.stream:
        raise InvalidRequest("best_of above n cannot be streamed (the best are known only at the end)")
    logprobs, echo, prompt_logprobs = _logprobs(body)
    adjustments = _adjustments(body)
    structured = _structured(body)
    call = forced(tools, syntax) if tools is not None else None
    if call is not None and structured is not None:
        raise InvalidRequest("tool_choice required or a named function sets the output's structure; leave "
                             "response_format and guided_* unset")
    structured = structured or call
    if structured is not None:
        adjustments["structured"] = structured
    if echo and not has_tokenizer:
        raise InvalidRequest("echo needs a checkpoint with a tokenizer (it returns the prompt as text); use "
                             "return_token_ids")
    stop = check_stop_strings(body.stop)
    if stop and not has_tokenizer:
        raise InvalidRequest("stop strings need a checkpoint with a tokenizer; use stop_token_ids")
    top_k = body.top_k if body.top_k is not None else 0
    if top_k == -1:  # vLLM's "off"
        top_k = 0
    jobs = []
    for i, ids in enumerate(prompts):
        where = f"prompt {i}: " if len(prompts) > 1 else ""
        if not ids:
            raise InvalidRequest(f"{where}prompt is empty; it needs at least 1 token")
        room = limits.max_positions - len(ids)
        if max_tokens is None:
            wanted = default_max_tokens if default_max_tokens is not None else min(limits.max_new_tokens_cap, room)
            if wanted <= 0:
                raise InvalidRequest(f"{where}prompt of {len(ids)} tokens leaves no room for new tokens in the "
                                     f"model's {limits.max_positions} positions")
        else:
            wanted = max_tokens
            if wanted == 0 and echo:  # the prompt alone, scored (lm-evaluation-harness's log-likelihoods)
                pass
            elif wanted <= 0:
                raise InvalidRequest(f"max_tokens must be a positive integer (or 0 with echo); got {wanted}")
            if wanted > limits.max_new_tokens_cap:
                raise InvalidRequest(f"max_tokens {wanted} is above the server's cap {limits.max_new_tokens_cap}")
        if len(ids) + wanted > limits.max_positions:
            raise InvalidRequest(f"{where}prompt of {len(ids)} tokens plus max_tokens {wanted} exceeds the "
                                 f"model's {limits.max_positions} positions")
        for k in range(best_of):  # candidate i * best_of + k; with a seed, it samples with seed + k (reproducible)
            seed = body.seed if body.seed is None or k == 0 else (body.seed + k) % 2**64  # (a bad seed fails at 0)
            sampling = SamplingParams(
                max_new_tokens=max(wanted, 1), temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k, seed=seed,
                stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
                # best_of ranks candidates by their tokens' logprobs: computed even when not returned
                logprobs=logprobs if best_of == n else max(logprobs or 0, 0), **adjustments)
            try:
                jobs.append(Job(i * best_of + k, limits.check(ids, sampling), sampling,
                                prompt_text=texts[i] if texts else None, generate=wanted > 0,
                                first=i * best_of if best_of > 1 else -1))
            except InvalidRequest as e:
                raise InvalidRequest(f"{where}{e}") from None
    return Parsed(jobs=jobs, stop=stop, stream=body.stream,
                  include_usage=bool(body.stream_options and body.stream_options.include_usage),
                  continuous_usage=bool(body.stream_options and body.stream_options.include_usage
                                        and body.stream_options.continuous_usage_stats),
                  include_stop_str_in_output=body.include_stop_str_in_output,
                  skip_special_tokens=body.skip_special_tokens,
                  return_token_ids=(not has_tokenizer) if body.return_token_ids is None else body.return_token_ids,
                  model=body.model, logprobs=logprobs, echo=echo, prompt_logprobs=prompt_logprobs, tools=tools,
                  syntax=syntax, n=n, best_of=best_of)


def _parse(cls, raw: Any):
    if not isinstance(raw, dict):
        raise InvalidRequest(f"the request body must be a JSON object; got {type(raw).__name__}")
    check_unsupported(raw)
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise InvalidRequest(validation_message(e)[0]) from None


def _token_list(value: list, field: str) -> list[int]:
    for j, t in enumerate(value):
        if type(t) is not int:
            raise InvalidRequest(f"{field}[{j}] must be a token id (an integer); got {show(t)}")
    return value


def _encode(tokenizer, text: str, field: str, add_special_tokens: bool) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a JSON escape such as "\ud800": not a character
        raise InvalidRequest(f"{field} is not valid Unicode text: character {e.start} is a lone surrogate "
                             f"({ascii(text[e.start])})") from None
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def parse_completion(raw: Any, limits: RequestLimits, tokenizer) -> Parsed:
    """/v1/completions: ``prompt`` is a string, a list of token ids, or a list of strings or token-id lists (each
    its own choice, index i; at most MAX_PROMPTS)."""
    body = _parse(CompletionBody, raw)
    if raw.get("tools") or raw.get("tool_choice") not in (None, "none"):
        raise InvalidRequest("tools are for /v1/chat/completions; completions take none")
    prompt, single = body.prompt, False
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
        prompt, single = [prompt], True
    elif not isinstance(prompt, list) or not prompt:
        what = "an empty list" if isinstance(prompt, list) else type(prompt).__name__ if prompt is not None else \
            "null"
        raise InvalidRequest(f"prompt must be a string, a list of token ids, or a list of those; got {what}")
    if all(type(p) is int or isinstance(p, float) for p in prompt):  # e.g. [1, 2.5]: token ids, one not an int
        prompt, single = [prompt], True
    if len(prompt) > MAX_PROMPTS:
        raise InvalidRequest(f"prompt holds {len(prompt)} prompts; at most {MAX_PROMPTS} are allowed per request")
    ids: list[list[int]] = []
    texts: list[str | None] = []
    for i, p in enumerate(prompt):
        texts.append(p if isinstance(p, str) else None)
        field = "prompt" if single else f"prompt[{i}]"
        if isinstance(p, str):
            if tokenizer is None:
                raise InvalidRequest(f"{field} is text, which needs a checkpoint with a tokenizer; send token ids")
            ids.append(_encode(tokenizer, p, field, body.add_special_tokens))
        elif isinstance(p, list):
            ids.append(_token_list(p, field))
        else:
            raise InvalidRequest(f"{field} must be a string or a list of token ids; got {type(p).__name__}")
    return _common(body, ids, limits, body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, tokenizer is not None, texts)


def parse_chat(raw: Any, limits: RequestLimits, tokenizer, chat_template: str | None,
               syntax: CallSyntax = SYNTAXES["hermes"]) -> Parsed:
    """/v1/chat/completions: ``messages`` rendered with the checkpoint's chat template (or the server's
    ``--chat-template``), ``add_generation_prompt`` on, then tokenized without adding special tokens again;
    ``syntax``: the server's tool-call syntax (``--tool-call-parser``)."""
    body = _parse(ChatBody, raw)
    messages = chat_messages(body.messages)
    tools = check_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    text = render_chat(tokenizer, chat_template, messages, body.add_generation_prompt, body.chat_template_kwargs,
                       tools.tools if tools is not None else None)
    ids = _encode(tokenizer, text, "messages", False)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return _common(body, [ids], limits, max_tokens, None, True, tools=tools, syntax=syntax)
