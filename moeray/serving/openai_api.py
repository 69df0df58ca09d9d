"""The OpenAI-compatible HTTP API: FastAPI routes on Serve's HTTP proxy, served by the gRPC ingress itself.

    GET  /health                 200 when serving; 503 while draining or while experts are unavailable
    GET  /v1/models              the served model (the name gRPC uses)
    POST /v1/completions         prompt: text, token ids, or a list of either (one choice per prompt)
    POST /v1/chat/completions    messages rendered with the checkpoint's chat template (or --chat-template)
    POST /tokenize               a prompt's or messages' token ids (vLLM's shape; also /v1/tokenize)
    POST /detokenize             token ids' text (vLLM's shape; also /v1/detokenize)
    GET  /tokenizer_info         the tokenizer's class, special tokens, vocabulary size and context length

One deployment, two front doors: ``Ingress`` (moeray/serving/app.py) is a ``@serve.ingress()`` deployment whose
``__serve_build_asgi_app__`` returns ``build_http_app(self)``, so Serve's HTTP proxy sends HTTP requests to this
ASGI app while its gRPC proxy keeps calling the gRPC methods by name, in the same replica. Both take the same
admission slots (moeray/serving/admission.py: one exact counter), the same engine handle (routing and aborts:
moeray/serving/engine_handle.py), the same tokenizer and the same incremental detokenizer and stop strings
(moeray/serving/detokenize.py), and answer errors from the same table (moeray/serving/errors.py, whose HTTP column
gives the status here). Request fields are checked in moeray/serving/openai_protocol.py; bodies are built in
moeray/serving/openai_responses.py.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, one line naming the field and the
limit, never a traceback (pydantic's errors included: never FastAPI's 422). A stream that fails after its first
byte (a router lost mid-way) ends with one ``data: {"error": ...}`` event, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeray import telemetry
from moeray.request import InvalidRequest, new_request_id
from moeray.serving import errors
from moeray.serving import openai_responses as bodies
from moeray.serving.detokenize import TextStream
from moeray.serving.openai_protocol import Job, Parsed, parse_chat, parse_completion
from moeray.serving.openai_tokenize import parse_detokenize, parse_tokenize
from moeray.serving.openai_responses import Piece


def build_http_app(ingress) -> FastAPI:
    """The ASGI app Serve's HTTP proxy calls for ``ingress`` (an ``Ingress`` instance: engine handle, admission,
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
    for prefix in ("", "/v1"):
        app.add_api_route(f"{prefix}/tokenize", api.tokenize, methods=["POST"])
        app.add_api_route(f"{prefix}/detokenize", api.detokenize, methods=["POST"])
    app.add_api_route("/tokenizer_info", api.tokenizer_info, methods=["GET"])
    return app


class OpenAIServer:
    def __init__(self, ingress) -> None:
        self.ingress = ingress
        self.created = int(time.time())

    # -- routes ------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if self.ingress.admission.draining:
            return self._error(errors.Draining("the server is shutting down (draining)"), None)
        if not await self.ingress.serving():
            return self._error(errors.NotServing("some experts have no live replica; the server is restoring them"),
                               None)
        return JSONResponse({"status": "ok", "model": self.ingress.model_name})

    def _card(self) -> dict:
        return {"id": self.ingress.model_name, "object": "model", "created": self.created, "owned_by": "moeray",
                "root": self.ingress.model_name, "parent": None, "max_model_len": self.ingress.limits.max_positions}

    async def models(self, request: Request) -> Response:
        try:
            self.ingress.credentials.check_api_key(request.headers.get("authorization", ""))
        except Exception as e:  # noqa: BLE001
            return self._error(e, None)
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: Request, model: str) -> Response:
        try:
            self.ingress.credentials.check_api_key(request.headers.get("authorization", ""))
            self._check_model(model)
        except Exception as e:  # noqa: BLE001
            return self._error(e, None)
        return JSONResponse(self._card())

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def tokenize(self, request: Request) -> Response:
        try:
            self.ingress.credentials.check_api_key(request.headers.get("authorization", ""))
            body, ids = parse_tokenize(await self._json(request), self.ingress.tokenizer,
                                       getattr(self.ingress, "chat_template", None))
            self._check_model(body.model)
        except Exception as e:  # noqa: BLE001
            return self._error(e, None)
        strs = [self.ingress.tokenizer.convert_ids_to_tokens(t) for t in ids] if body.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": self.ingress.limits.max_positions, "tokens": ids,
                             "token_strs": strs})

    async def detokenize(self, request: Request) -> Response:
        try:
            self.ingress.credentials.check_api_key(request.headers.get("authorization", ""))
            body, text = parse_detokenize(await self._json(request), self.ingress.tokenizer, self.ingress.limits)
            self._check_model(body.model)
        except Exception as e:  # noqa: BLE001
            return self._error(e, None)
        return JSONResponse({"prompt": text})

    async def tokenizer_info(self, request: Request) -> Response:
        try:
            self.ingress.credentials.check_api_key(request.headers.get("authorization", ""))
            tok = self.ingress.tokenizer
            if tok is None:
                raise InvalidRequest("this checkpoint has no tokenizer")
        except Exception as e:  # noqa: BLE001
            return self._error(e, None)
        return JSONResponse({"tokenizer_class": type(tok).__name__, "vocab_size": self.ingress.limits.vocab_size,
                             "model_max_length": self.ingress.limits.max_positions,
                             **{name: getattr(tok, name, None) for name in ("bos_token", "eos_token", "pad_token",
                                                                             "unk_token")},
                             "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                             "chat_template": getattr(self.ingress, "chat_template", None) or tok.chat_template})

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    # -- errors ------------------------------------------------------------------------------------------
    async def route_error(self, request: Request, exc: StarletteHTTPException) -> Response:
        path = errors.clip(request.url.path)
        if exc.status_code == 404:
            e = errors.RouteNotFound(f"no route {request.method} {path}; this server serves GET /health, GET "
                                     "/v1/models, POST /v1/completions, POST /v1/chat/completions, POST /tokenize, "
                                     "POST /detokenize and GET /tokenizer_info")
        elif exc.status_code == 405:
            e = errors.MethodNotAllowed(f"{request.method} is not allowed on {path}")
        else:  # Starlette raises only the two above for these routes
            e = InvalidRequest(str(exc.detail)) if exc.status_code < 500 else exc
        return self._error(e, None)

    async def validation_error(self, request: Request, exc: RequestValidationError) -> Response:
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return self._error(InvalidRequest(f"{param or 'the request'}: {first.get('msg', 'invalid')}"), None, param)

    def _error(self, exc: BaseException, request_id: str | None, param: str | None = None) -> Response:
        """The OpenAI-shaped answer for ``exc``, from errors.py's table (anything else: 500 naming the request id,
        the details in the server log)."""
        answer = errors.answer(exc, request_id)
        telemetry.rejected(answer.code)
        if param is None and answer.http == 400:
            param = bodies.param_of(answer.message)
        headers = {"WWW-Authenticate": "Bearer"} if answer.http == 401 else {}
        if request_id:
            headers["x-request-id"] = request_id
        return JSONResponse(bodies.error_body(answer.http, answer.message, param, _code(exc)),
                            status_code=answer.http, headers=headers or None)

    # -- request checks ----------------------------------------------------------------------------------
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
            self.ingress.credentials.check_api_key(request.headers.get("authorization", ""))
            raw = await self._json(request)
            if chat:
                parsed = parse_chat(raw, ingress.limits, ingress.tokenizer, getattr(ingress, "chat_template", None),
                                    ingress.call_syntax)
            else:
                parsed = parse_completion(raw, ingress.limits, ingress.tokenizer)
            self._check_model(parsed.model)
            if ingress.admission.draining:
                raise errors.Draining("the server is shutting down and admits no new requests; retry on another "
                                      "replica")
            if not await ingress.serving():
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
        pieces, parsed = bodies.keep_best(pieces, parsed)
        return JSONResponse(bodies.whole(pieces, parsed, chat, meta, self._decoder()), headers=headers)

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
        # n > 1: a prompt's other choices start once its first has been prefilled, so they reuse its prompt blocks
        prefilled = {j.first: asyncio.Event() for j in jobs if j.first >= 0}
        gens = [self._one(job, rid, parsed, prefilled) for job, rid in zip(jobs, ids)]
        merged = gens[0] if len(gens) == 1 else _merge(gens)
        async with contextlib.aclosing(merged):
            async for piece in merged:
                yield piece

    def _decoder(self):
        """A token id's text for log-probabilities (``token_id:N`` without a tokenizer, as vLLM writes it)."""
        tokenizer = self.ingress.tokenizer
        if tokenizer is None:
            return lambda t: f"token_id:{t}"
        return functools.lru_cache(maxsize=4096)(lambda t: tokenizer.decode([t]))

    async def _one(self, job: Job, request_id: str, parsed: Parsed,
                   prefilled: dict[int, asyncio.Event] | None = None) -> AsyncIterator[Piece]:
        """One prompt at a router: (its echo or prompt logprobs first, then) token ids -> text deltas; a stop
        string ends it (the router request aborted)."""
        tokenizer = self.ingress.tokenizer
        markers = parsed.syntax.markers if _parses(parsed) else ()  # the call syntax's, special tokens or not
        text = None if tokenizer is None else TextStream(
            tokenizer, parsed.stop, include_stop_str_in_output=parsed.include_stop_str_in_output,
            skip_special_tokens=parsed.skip_special_tokens, keep_special=markers)
        first = (prefilled or {}).get(job.first)
        if first is not None and job.first != job.index:
            await first.wait()  # NOTE: before taking an admission place, so a waiting choice never holds one
        async with self.ingress.admission.slot(request_id):  # AdmissionFull, ...
            if parsed.echo or parsed.prompt_logprobs is not None:
                yield await self._prompt_piece(job, parsed)
            if not job.generate:  # max_tokens 0 with echo: the prompt alone
                if first is not None:
                    first.set()
                yield Piece(job.index, "", [], "length")
                return
            try:
                async with contextlib.aclosing(self._at_router(job, request_id, parsed, text)) as pieces:
                    async for piece in pieces:
                        if first is not None:
                            first.set()
                        yield piece
            finally:
                if first is not None:
                    first.set()  # ended or failed before a token: the others go ahead anyway

    async def _prompt_piece(self, job: Job, parsed: Parsed) -> Piece:
        """The choice's first piece: the prompt's text when echoed, its logprobs when asked for."""
        records = None
        if parsed.prompt_logprobs is not None:
            records = await self.ingress.engine.prompt_logprobs(job.prompt_ids, parsed.prompt_logprobs)
        echoed = ""
        if parsed.echo:
            echoed = job.prompt_text if job.prompt_text is not None else self.ingress.tokenizer.decode(job.prompt_ids)
        return Piece(job.index, echoed, [], prompt_ids=job.prompt_ids, prompt_logprobs=records)

    async def _at_router(self, job: Job, request_id: str, parsed: Parsed, text: TextStream | None):
        calls = parsed.syntax.parser() if _parses(parsed) and text is not None else None
        called = False
        chunks = self.ingress.engine.stream(job.prompt_ids, job.sampling, request_id, None)
        async with contextlib.aclosing(chunks):  # leaving early (a stop string, the client gone) aborts it
            async for chunk in chunks:
                tokens, logprobs = chunk.token_ids, chunk.logprobs
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
                            logprobs = logprobs[:k + 1] if logprobs is not None else None
                            break
                stop = text is not None and text.stop_hit is not None
                reason = "stop" if stop else chunk.finish_reason
                if reason is not None and text is not None and not stop:
                    delta += text.finish()  # held-back text: it may still complete a stop string
                    reason = "stop" if text.stop_hit is not None else reason
                split = None
                if calls is not None:  # the text splits into content, reasoning and the tool calls it holds
                    split = calls.feed(delta)
                    if reason is not None:
                        split += calls.finish()
                    delta, called = split.content, called or bool(split.calls)
                    if reason == "stop" and called:
                        reason = "tool_calls"
                yield Piece(job.index, delta, tokens, reason, logprobs=logprobs,
                            tool_calls=(split.calls or None) if split else None,
                            reasoning=split.reasoning if split else "")
                if reason is not None:
                    return

    async def _sse(self, first: Piece, events: AsyncIterator[Piece], parsed: Parsed, chat: bool, meta: dict):
        """Server-sent events: (chat: the role first,) text deltas, each choice's finish reason, usage when asked
        for (stream_options.include_usage), then ``data: [DONE]``."""
        head = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
        usage_null = {"usage": None} if parsed.include_usage else {}
        completion_tokens = 0

        def usage() -> dict:  # the usage of every chunk: null, or so far (stream_options.continuous_usage_stats)
            return {"usage": bodies.usage(parsed, completion_tokens)} if parsed.continuous_usage else usage_null
        state = bodies.StreamState(parsed, self._decoder())
        try:
            if chat:
                yield bodies.event({**head, "choices": bodies.first_choices(parsed), **usage()})
            piece = first
            while piece is not None:
                completion_tokens += len(piece.token_ids)
                for choices in bodies.piece_choices(piece, chat, parsed.return_token_ids, state):
                    yield bodies.event({**head, "choices": choices, **usage()})
                piece = await anext(events, None)
            if parsed.include_usage:
                yield bodies.event({**head, "choices": [], "usage": bodies.usage(parsed, completion_tokens)})
            yield bodies.DONE
        except Exception as e:  # noqa: BLE001 - after the first byte the status is sent: the error is an event
            answer = errors.answer(e, meta["id"])
            telemetry.rejected(answer.code)
            yield bodies.event(bodies.error_body(answer.http, answer.message, None, _code(e)))
            yield bodies.DONE
        finally:
            await events.aclose()


def _parses(parsed: Parsed) -> bool:
    """Whether a chat answer is read for its calls (and, in harmony, its channels)."""
    syntax = parsed.syntax
    return syntax is not None and (syntax.always or (parsed.tools is not None and parsed.tools.parse))


def _code(exc: BaseException) -> str | None:
    """OpenAI's error code where it has one more precise than the status's."""
    return "model_not_found" if isinstance(errors.unwrap(exc), errors.ModelNotFound) else None


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
