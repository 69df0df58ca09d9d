"""The OpenAI-compatible HTTP API: FastAPI routes on Serve's HTTP proxy, served by the gRPC ingress itself.

    GET  /health                 200 when serving; 503 while draining or while experts are unavailable
    GET  /v1/models              the served model (the name gRPC uses)
    POST /v1/completions         prompt: text, token ids, or a list of either (one choice per prompt)
    POST /v1/chat/completions    messages rendered with the checkpoint's chat template (or --chat-template)

One deployment, two front doors: ``Ingress`` (moeray/serving/app.py) is a ``@serve.ingress()`` deployment whose
``__serve_build_asgi_app__`` returns ``build_http_app(self)``, so Serve's HTTP proxy sends HTTP requests to this
ASGI app while its gRPC proxy keeps calling the gRPC methods by name, in the same replica. Both take the same
admission slots (moeray/serving/admission.py: one exact counter), the same round-robin over the routers, the same
tokenizer and the same incremental detokenizer and stop strings (moeray/serving/detokenize.py), and answer errors
from the same table (moeray/serving/errors.py, whose HTTP column gives the status here).

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, one line naming the field and the
limit, never a traceback (pydantic's errors included: never FastAPI's 422). A stream that fails after its first
byte (a router lost mid-way) ends with one ``data: {"error": ...}`` event, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeray import telemetry
from moeray.request import InvalidRequest, new_request_id
from moeray.serving import errors
from moeray.serving.detokenize import TextStream
from moeray.serving.openai_protocol import UNSUPPORTED, Job, Parsed, parse_chat, parse_completion

log = logging.getLogger(__name__)

API_KEY_ENV = "MOERAY_API_KEY"
_GRPC_CODE = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED",
              409: "ALREADY_EXISTS", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
              503: "UNAVAILABLE"}
# HTTP status -> OpenAI's error type and code
_KIND = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
         404: ("invalid_request_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed"),
         409: ("invalid_request_error", "conflict"), 413: ("invalid_request_error", "request_too_large"),
         429: ("rate_limit_error", "rate_limit_exceeded"), 500: ("server_error", "internal_error"),
         503: ("service_unavailable", "service_unavailable")}
_FIELDS = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
           "seed", "stop", "stream", "stream_options", "n", "ignore_eos", "stop_token_ids", "return_token_ids",
           "include_stop_str_in_output", "skip_special_tokens", "add_special_tokens", "add_generation_prompt",
           "chat_template_kwargs", "user", *UNSUPPORTED}
_PARAM = re.compile(r"(?:prompt \d+: )?([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*)")
_PARAM_PREFIXES = {"stop token id": "stop_token_ids", "prompt token id": "prompt", "prompt of": "prompt"}
_DONE = "data: [DONE]\n\n"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class HTTPError(Exception):
    """An answer with this status and message (routes, methods: what Starlette's own exceptions carry)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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


def _param(message: str) -> str | None:
    """The request field a message names (they start with it: 'max_tokens 9000 is above ...')."""
    for prefix, param in _PARAM_PREFIXES.items():
        if message.startswith(prefix) or message.partition(": ")[2].startswith(prefix):
            return param
    m = _PARAM.match(message)
    if m and re.split(r"[.\[]", m.group(1))[0] in _FIELDS:
        return m.group(1)
    return None


def build_http_app(ingress) -> FastAPI:
    """The ASGI app Serve's HTTP proxy calls for ``ingress`` (an ``Ingress`` instance: routers, admission,
    tokenizer, limits, model name)."""
    api = OpenAIServer(ingress)
    app = FastAPI(title="moeray", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(StarletteHTTPException, api.route_error)
    app.add_exception_handler(RequestValidationError, api.validation_error)
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", api.model, methods=["GET"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    return app


class OpenAIServer:
    def __init__(self, ingress) -> None:
        self.ingress = ingress
        self.created = int(time.time())

    # -- routes ------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if self.ingress.admission.draining:
            return self._error(errors.Draining("the server is shutting down (draining)"), None)
        if not await self.ingress._serving():
            return self._error(errors.NotServing("some experts have no live replica; the server is restoring them"),
                               None)
        return JSONResponse({"status": "ok", "model": self.ingress.model_name})

    def _card(self) -> dict:
        return {"id": self.ingress.model_name, "object": "model", "created": self.created, "owned_by": "moeray",
                "root": self.ingress.model_name, "parent": None, "max_model_len": self.ingress.limits.max_positions}

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except Exception as e:  # noqa: BLE001
            return self._error(e, None)
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: Request, model: str) -> Response:
        try:
            self._authorize(request)
            self._check_model(model)
        except Exception as e:  # noqa: BLE001
            return self._error(e, None)
        return JSONResponse(self._card())

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    # -- errors ------------------------------------------------------------------------------------------
    async def route_error(self, request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = (f"no route {request.method} {errors.clip(request.url.path)}; this server serves GET /health, "
                       "GET /v1/models, POST /v1/completions and POST /v1/chat/completions")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {errors.clip(request.url.path)}"
        else:
            message = errors.one_line(str(exc.detail))
        return self._error(HTTPError(exc.status_code, message), None)

    async def validation_error(self, request: Request, exc: RequestValidationError) -> Response:
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return self._error(HTTPError(400, errors.one_line(f"{param or 'the request'}: {first.get('msg', 'invalid')}")),
                           None, param)

    def _error(self, exc: BaseException, request_id: str | None, param: str | None = None) -> Response:
        """The OpenAI-shaped answer for ``exc``: its status from errors.py's table; anything else is logged with
        its traceback and the request id and answered 500 naming only that id."""
        status, message, code = self._status(exc, request_id)
        if param is None and status == 400:
            param = _param(message)
        telemetry.rejected(_GRPC_CODE.get(status, "UNKNOWN"))
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if request_id:
            headers = {**(headers or {}), "x-request-id": request_id}
        return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)

    @staticmethod
    def _status(exc: BaseException, request_id: str | None) -> tuple[int, str, str | None]:
        if isinstance(exc, HTTPError):
            return exc.status, str(exc), None
        found = errors.http_status_of(exc)
        if found is None:
            request_id = request_id or new_request_id()
            log.error("request %s failed unexpectedly", request_id, exc_info=exc)
            return 500, f"internal error serving request {request_id}; the server log has the details", None
        status, message = found
        if status == 503 and not isinstance(exc, (errors.Draining, errors.NotServing)):
            log.warning("request %s: %s (%s)", request_id, message, type(errors.unwrap(exc)).__name__, exc_info=exc)
        code = "model_not_found" if isinstance(exc, errors.ModelNotFound) else None
        return status, message, code

    # -- request checks ----------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        expected = os.environ.get(API_KEY_ENV)
        if not expected:
            return
        given = request.headers.get("authorization", "")
        if given[:7].lower() != "bearer ":
            raise errors.Unauthenticated("this server needs an API key: send 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(given[7:].strip().encode(), expected.encode()):
            raise errors.Unauthenticated("the API key is wrong")  # never echo either key

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.ingress.model_name:
            raise errors.ModelNotFound(f"model {errors.clip(model)} is not served here; this server serves "
                                       f"{self.ingress.model_name!r} (GET /v1/models)")

    async def _json(self, request: Request):
        limit = self.ingress.max_message_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise errors.RequestTooLarge(f"the request body ({declared} bytes) is over the server's limit of "
                                         f"{limit} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise errors.RequestTooLarge(f"the request body is over the server's limit of {limit} bytes")
        if not body:
            raise InvalidRequest("the request body is empty; send a JSON object")
        try:
            return json.loads(body)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") \
                from None
        except (ValueError, RecursionError) as e:  # not UTF-8; nested too deep
            raise InvalidRequest(f"the request body is not valid JSON: {type(e).__name__}") from None

    # -- generation --------------------------------------------------------------------------------------
    async def _generate(self, request: Request, chat: bool) -> Response:
        request_id = new_request_id()
        created = int(time.time())
        ingress = self.ingress
        try:
            self._authorize(request)
            raw = await self._json(request)
            if chat:
                parsed = parse_chat(raw, ingress.limits, ingress.tokenizer, getattr(ingress, "chat_template", None))
            else:
                parsed = parse_completion(raw, ingress.limits, ingress.tokenizer)
            self._check_model(parsed.model)
            if ingress.admission.draining:
                raise errors.Draining("the server is shutting down and admits no new requests; retry on another "
                                      "replica")
            if not await ingress._serving():
                raise errors.NotServing("some experts have no live replica; the server is restoring them, retry "
                                        "later")
            events = self._run(parsed, request_id)
            first = await anext(events)  # admission and prefill: their errors answer with their status
        except Exception as e:  # noqa: BLE001 - every error answers from the one table (moeray/serving/errors.py)
            return self._error(e, request_id)
        prefix = "chatcmpl-" if chat else "cmpl-"
        meta = {"id": prefix + request_id, "created": created, "model": ingress.model_name}
        headers = {"x-request-id": request_id}
        if parsed.stream:
            body = self._sse(first, events, parsed, chat, meta)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            pieces = [first]
            async for piece in events:
                pieces.append(piece)
        except Exception as e:  # noqa: BLE001
            return self._error(e, request_id)
        finally:
            await events.aclose()
        return JSONResponse(self._whole(pieces, parsed, chat, meta), headers=headers)

    async def _run(self, parsed: Parsed, request_id: str) -> AsyncIterator[Piece]:
        """Every prompt's pieces, as they come. Each prompt takes one admission place, from when it is admitted
        until it ends (a request whose prompts do not all fit in the admission limit now is refused whole)."""
        jobs = parsed.jobs
        admission = self.ingress.admission
        if len(jobs) > 1:
            if len(jobs) > admission.max_ongoing + admission.max_queued:
                raise InvalidRequest(f"prompt holds {len(jobs)} prompts; this server admits at most "
                                     f"{admission.max_ongoing + admission.max_queued} requests at once")
            admission.check_room(len(jobs))
        ids = [request_id] if len(jobs) == 1 else [f"{request_id}-{j.index}" for j in jobs]
        gens = [self._one(job, rid, parsed) for job, rid in zip(jobs, ids)]
        merged = gens[0] if len(gens) == 1 else _merge(gens)
        async with contextlib.aclosing(merged):
            async for piece in merged:
                yield piece

    async def _one(self, job: Job, request_id: str, parsed: Parsed) -> AsyncIterator[Piece]:
        """One prompt at a router: token ids -> text deltas; a stop string ends it (the router request aborted)."""
        tokenizer = self.ingress.tokenizer
        text = None if tokenizer is None else TextStream(
            tokenizer, parsed.stop, include_stop_str_in_output=parsed.include_stop_str_in_output,
            skip_special_tokens=parsed.skip_special_tokens)
        async with self.ingress.admission.slot(request_id), \
                contextlib.aclosing(self._at_router(job, request_id, parsed, text)) as pieces:  # AdmissionFull, ...
            async for piece in pieces:
                yield piece

    async def _at_router(self, job: Job, request_id: str, parsed: Parsed, text: TextStream | None):
        router = self.ingress._router()
        chunks = router.stream.options(num_returns="streaming").remote(job.prompt_ids, job.sampling, request_id, None)
        finished = False
        try:
            async for ref in chunks:
                chunk = await ref
                tokens = chunk.token_ids
                if text is None:
                    delta = ""
                elif not parsed.stop:
                    delta = text.feed(tokens)
                else:  # token by token: the tokens (and usage) end with the one that completes the stop string
                    delta = ""
                    for k, t in enumerate(tokens):
                        delta += text.feed((t,))
                        if text.stop_hit is not None:
                            tokens = tokens[:k + 1]
                            break
                stop = text is not None and text.stop_hit is not None
                reason = "stop" if stop else chunk.finish_reason
                if reason is not None:
                    finished = chunk.finish_reason is not None  # a stop string ends it early: the finally aborts
                    if text is not None and not stop:
                        delta += text.finish()  # held-back text: it may still complete a stop string
                        reason = "stop" if text.stop_hit is not None else reason
                yield Piece(job.index, delta, tokens, reason)
                if reason is not None:
                    return
        except Exception:
            finished = True  # the router ended the request (or died): nothing to abort
            raise
        finally:
            if not finished:  # a stop string, or the client left: stop its generation, free its batch slot
                router.abort.remote(request_id)

    # -- responses ---------------------------------------------------------------------------------------
    def _usage(self, parsed: Parsed, completion_tokens: int) -> dict:
        prompt = sum(len(j.prompt_ids) for j in parsed.jobs)
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}

    def _whole(self, pieces: list[Piece], parsed: Parsed, chat: bool, meta: dict) -> dict:
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
                "usage": self._usage(parsed, sum(map(len, tokens.values())))}

    async def _sse(self, first: Piece, events: AsyncIterator[Piece], parsed: Parsed, chat: bool, meta: dict):
        """Server-sent events: (chat: the role first,) text deltas, each choice's finish reason, usage when asked
        for (stream_options.include_usage), then ``data: [DONE]``."""
        head = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
        usage_null = {"usage": None} if parsed.include_usage else {}
        completion_tokens = 0

        def event(choices: list, **extra) -> str:
            return f"data: {_dumps({**head, 'choices': choices, **usage_null, **extra})}\n\n"

        try:
            if chat:
                yield event([{"index": j.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for j in parsed.jobs])
            piece = first
            while piece is not None:
                completion_tokens += len(piece.token_ids)
                ids = {"token_ids": piece.token_ids} if parsed.return_token_ids else {}
                if chat:
                    if piece.text or ids:
                        yield event([{"index": piece.index, "delta": {"content": piece.text}, "logprobs": None,
                                      "finish_reason": None, **ids}])
                    if piece.finish_reason is not None:
                        yield event([{"index": piece.index, "delta": {}, "logprobs": None,
                                      "finish_reason": piece.finish_reason}])
                elif piece.text or ids or piece.finish_reason is not None:
                    yield event([{"index": piece.index, "text": piece.text, "logprobs": None,
                                  "finish_reason": piece.finish_reason, **ids}])
                piece = await anext(events, None)
            if parsed.include_usage:
                yield f"data: {_dumps({**head, 'choices': [], 'usage': self._usage(parsed, completion_tokens)})}\n\n"
            yield _DONE
        except Exception as e:  # noqa: BLE001 - after the first byte the status is sent: the error is an event
            status, message, code = self._status(e, meta["id"])
            telemetry.rejected(_GRPC_CODE.get(status, "UNKNOWN"))
            yield f"data: {_dumps(error_body(status, message, None, code))}\n\n"
            yield _DONE
        finally:
            await events.aclose()


async def _merge(gens: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """The pieces of several prompts as each comes; the first error ends them all (the others are closed:
    their router requests aborted)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(gen) -> None:
        try:
            async with contextlib.aclosing(gen):
                async for item in gen:
                    await queue.put(item)
        except Exception as e:  # noqa: BLE001 - handed to the reader
            await queue.put(e)
        finally:
            queue.put_nowait(done)

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
