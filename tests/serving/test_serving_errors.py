"""The ingress's exception -> status table (Ray's wrappers unwrapped, one-line messages) and the proxy-side decoding
guard of moeray.serving.wire, on a plain grpc.aio server standing in for Serve's proxy (no Ray cluster)."""

import asyncio
from unittest import mock

import grpc
import pytest
from grpc.aio._server import Server
from ray.exceptions import ActorDiedError, RayTaskError

from moeray.request import DuplicateRequestId, InvalidRequest
from moeray.router.dispatch import ExpertsUnavailable
from moeray.serving import errors, wire
from moeray.serving.gen import generate_pb2

pytestmark = pytest.mark.ray

C = grpc.StatusCode


def _ray_wrapped(exc):
    """What awaiting a failed actor call raises: a RayTaskError carrying the remote traceback (pid, IP, paths)."""
    try:
        raise exc
    except Exception as e:
        return RayTaskError("stream", "Traceback (most recent call last):\n  File \"/home/u/x.py\", line 1\n"
                            "\x1b[36m(pid=4242, ip=10.1.2.3)\x1b[0m actor_id=abc123", e).as_instanceof_cause()


@pytest.mark.parametrize("exc,code,message", [
    (InvalidRequest("temperature must be finite; got inf"), C.INVALID_ARGUMENT, "temperature must be finite; got inf"),
    (DuplicateRequestId("request_id 'a' is already in flight"), C.ALREADY_EXISTS, "request_id 'a' is already"),
    (ExpertsUnavailable(0, [3, 5], [1]), C.UNAVAILABLE, "MoE layer 0: experts [3, 5] have no live replica"),
    (errors.AdmissionFull("full"), C.RESOURCE_EXHAUSTED, "full"),
    (errors.ResponseTooLarge("too big"), C.RESOURCE_EXHAUSTED, "too big"),
    (errors.ModelNotFound("no such model"), C.NOT_FOUND, "no such model"),
    (ActorDiedError(), C.UNAVAILABLE, errors.ROUTER_DIED),
])
@pytest.mark.parametrize("wrapped", [False, True])
def test_the_table_unwraps_ray_errors(exc, code, message, wrapped):
    if wrapped:
        exc = _ray_wrapped(exc)
        assert "pid=4242" in str(exc)
    got_code, got_message = errors.status_of(exc)
    assert got_code == code and got_message.startswith(message)
    assert "\n" not in got_message and "pid" not in got_message and "10.1.2.3" not in got_message


def test_anything_else_is_internal_with_only_the_request_id(caplog):
    ctx = mock.Mock()
    with pytest.raises(errors.Fail):
        errors.fail_with(ctx, _ray_wrapped(KeyError("secret /etc/path")), "req-7")
    ctx.set_code.assert_called_once_with(C.INTERNAL)
    [details] = ctx.set_details.call_args.args
    assert details == "internal error serving request req-7; the server log has the details"
    assert "req-7" in caplog.text and "KeyError" in caplog.text  # the traceback stays server-side


def test_messages_are_one_bounded_line():
    assert errors.one_line("a\nb\x1b[31m c\x00", 100) == "a b c?"
    assert len(errors.one_line("x" * 10**6)) == errors.MAX_DETAILS_CHARS
    assert errors.clip("y" * 10**6) == "'" + "y" * 59 + "...' (1000000 characters)"


class _FakeServeProxy(Server):
    """Does to handlers what Serve's gRPCGenericServer does: keeps the deserializer, swaps the behaviours."""

    def __init__(self):
        super().__init__(thread_pool=None, generic_handlers=(), interceptors=(), maximum_concurrent_rpcs=None,
                         compression=None, options=[])

    def add_generic_rpc_handlers(self, handlers):
        async def unary(request, context):
            return generate_pb2.AbortResponse(aborted=request.request_id == "x").SerializeToString()

        async def stream(request, context):
            yield generate_pb2.GenerateResponse(request_id=request.request_id).SerializeToString()

        handlers[0]._method_handlers = {k: h._replace(response_serializer=None, unary_unary=unary, unary_stream=stream)
                                        for k, h in handlers[0]._method_handlers.items()}
        super().add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name, handlers):
        raise AssertionError("only generic handlers are registered")


def test_undecodable_requests_answer_invalid_argument_in_the_proxy():
    async def main():
        server = _FakeServeProxy()
        wire.add_generate_service(mock.Mock(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                generate = channel.unary_stream("/moeray.v1.GenerateService/Generate")
                abort = channel.unary_unary("/moeray.v1.GenerateService/Abort")
                for bad in (b"\xff\xff\xff", b"\x0a\x02\xff\xfe"):  # a bad tag; invalid UTF-8 in a string field
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        [r async for r in generate(bad)]
                    assert err.value.code() == C.INVALID_ARGUMENT
                    assert err.value.details() == (f"the request ({len(bad)} bytes) does not decode as a "
                                                   "moeray.v1.GenerateRequest protobuf message")
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await abort(bad)
                    assert err.value.code() == C.INVALID_ARGUMENT and "moeray.v1.AbortRequest" in err.value.details()
                good = generate_pb2.GenerateRequest(request_id="ok").SerializeToString()
                assert [r async for r in generate(good)] == [b"\n\x02ok"]
                assert await abort(generate_pb2.AbortRequest(request_id="x").SerializeToString()) == b"\x08\x01"
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_servicer_functions_are_importable_defs():
    assert wire.SERVICER_FUNCTIONS == [f"moeray.serving.wire.add_{s}_service"
                                       for s in ("generate", "placement", "inference", "health")]


def test_every_unary_handler_answers_from_the_table_and_keeps_its_signature():
    import inspect

    class Servicer:
        @errors.answers
        def Sync(self, request, grpc_context):
            raise InvalidRequest(f"field x is {request}; the limit is 3")

        @errors.answers
        async def Async(self, request, grpc_context):
            if request == "denied":
                raise errors.PermissionDenied("the admin token is wrong")
            return request * 2

    assert "grpc_context" in inspect.signature(Servicer.Sync).parameters  # how Serve decides to pass it
    for call, request, code, details in [(Servicer().Sync, 9, C.INVALID_ARGUMENT, "field x is 9; the limit is 3"),
                                         (Servicer().Async, "denied", C.PERMISSION_DENIED, "the admin token is wrong")]:
        ctx = mock.Mock()
        with pytest.raises(errors.Fail):
            asyncio.run(call(request, ctx))
        ctx.set_code.assert_called_once_with(code)
        ctx.set_details.assert_called_once_with(details)
    assert asyncio.run(Servicer().Async("ab", mock.Mock())) == "abab"


def test_one_answer_per_exception_for_both_protocols():
    assert errors.answer(errors.RouteNotFound("no route"), "r") == errors.Answer(C.NOT_FOUND, 404, "no route")
    assert errors.answer(errors.ModelLoading("loading"), None) == errors.Answer(C.UNAVAILABLE, 503, "loading")
    internal = errors.answer(ValueError("/etc/secret"), "req-9")
    assert (internal.code, internal.http) == (C.INTERNAL, 500) and "req-9" in internal.message
    assert "secret" not in internal.message
