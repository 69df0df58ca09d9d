"""GenerateResponse.text as the ingress assembles it: one detokenizer per request over the router's chunks, stop
strings ending the stream (finish reason STOP, the generation aborted). The ingress class runs here as is, in this
process, against a fake router's feed (the gRPC server fixtures serve a checkpoint without a tokenizer); no Ray."""

import asyncio

import grpc

from feed_fakes import FeedRouter
from moeray.model.demo import byte_tokenizer
from moeray.request import RequestLimits, StreamChunk
from moeray.serving import app, errors
from moeray.serving.engine_handle import EngineHandle
from moeray.serving.gen import generate_pb2


class FakeRouter(FeedRouter):
    """Fixed chunks of new token ids, then the finish, as the router's feed carries them."""

    def __init__(self, chunks: list[list[int]], finish_reason: str = "length"):
        super().__init__()
        self.token_chunks, self.finish_reason = chunks, finish_reason

    async def chunks(self, request_id):
        for chunk in self.token_chunks:
            yield StreamChunk(request_id=request_id, token_ids=list(chunk))
        yield StreamChunk(request_id=request_id, token_ids=[], finish_reason=self.finish_reason)


class Context:
    def __init__(self):
        self.code = self.details = None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def _ingress(router, tokenizer):
    # the class as written: Serve's ingress wrapper (HTTP) would build an ASGI app around it
    cls = next(c for c in app.Ingress.func_or_class.__mro__ if "Generate" in vars(c))
    limits = RequestLimits(vocab_size=259, max_positions=2048, max_new_tokens_cap=64)
    ingress = cls(model_name="demo", engine=EngineHandle(routers=[router], controller=None, limits=limits))
    ingress.tokenizer = tokenizer
    return ingress


def _generate(ingress, stop=(), include=False, max_new_tokens=32):
    request = generate_pb2.GenerateRequest(
        request_id="r1", prompt_ids=generate_pb2.TokenIds(ids=[1, 2, 3]),
        sampling=generate_pb2.SamplingParams(max_new_tokens=max_new_tokens, stop=stop,
                                             include_stop_str_in_output=include))
    context = Context()

    async def run():
        return [r async for r in ingress.Generate(request, grpc_context=context)]

    try:
        return asyncio.run(run()), context
    except errors.Fail:
        return None, context


def test_generate_text_streams_whole_characters_and_stops_on_stop_strings():
    tok = byte_tokenizer()
    ids = tok.encode("héllo 👨‍👩‍👧 wörld. END more", add_special_tokens=False)
    # chunks that split "é", the ZWJ emoji and "ö" between them, as the router's batches may
    chunks = [ids[:2], ids[2:9], ids[9:20], ids[20:30], ids[30:]]
    assert all(c for c in chunks)
    router = FakeRouter(chunks)
    responses, _ = _generate(_ingress(router, tok))
    texts = [r.text for r in responses]
    assert "".join(texts) == tok.decode(ids) and not any("\ufffd" in t for t in texts)
    assert texts[0] == "h" and [list(r.token_ids) for r in responses[:-1]] == chunks  # "é" comes whole next
    assert responses[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH and not router.aborted

    # a stop string spanning chunks: the text ends before it, STOP, the generation aborted
    router = FakeRouter(chunks)
    responses, _ = _generate(_ingress(router, tok), stop=["END", "never"])
    assert "".join(r.text for r in responses) == "héllo 👨‍👩‍👧 wörld. "
    assert [r.finish_reason for r in responses][-1] == generate_pb2.FINISH_REASON_STOP
    assert responses[-1].usage.completion_tokens == sum(len(r.token_ids) for r in responses)
    assert router.aborted == ["r1"]
    responses, _ = _generate(_ingress(FakeRouter(chunks), tok), stop=["END"], include=True)
    assert "".join(r.text for r in responses) == "héllo 👨‍👩‍👧 wörld. END"

    # no tokenizer: no text, and stop strings are refused
    responses, _ = _generate(_ingress(FakeRouter(chunks), None))
    assert all(r.text == "" for r in responses) and len(responses) == len(chunks) + 1
    responses, context = _generate(_ingress(FakeRouter(chunks), None), stop=["END"])
    assert responses is None and context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "stop strings need a checkpoint with a tokenizer" in context.details
    responses, context = _generate(_ingress(FakeRouter(chunks), tok), stop=["x"] * 17)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "at most 16" in context.details
