"""The servicer functions Serve's gRPC proxy registers (``grpc_servicer_functions``): the generated ones, except
that a request whose bytes do not decode answers INVALID_ARGUMENT instead of UNKNOWN.

Why here: Serve's proxy keeps each generated handler's ``request_deserializer`` (it only swaps the behaviour for its
own routing function), so grpcio decodes the request in the proxy, before any of our code runs; a DecodeError there
escapes grpcio's aio server as "Unexpected <class 'DecodeError'>", status UNKNOWN, and the proxy has no interceptor
hook. So, while a generated ``add_*_to_server`` registers its service: the deserializer is made tolerant (it returns
an ``Undecodable`` marker instead of raising), and once Serve has put in its routing behaviours, each is wrapped to
answer a marker with INVALID_ARGUMENT right in the proxy. A malformed request never reaches the ingress.

Only the generic handlers are registered, not grpcio's "registered method" fast path (Serve would wrap those in a
dictionary we never see); every method is still served, through the generic lookup, as on grpcio before 1.63.

NOTE: the proxy process imports this module; keep it free of torch and of the engine.
"""

from __future__ import annotations

import grpc

MAX_ERROR_CHARS = 200


class Undecodable:
    """What a tolerant deserializer returns for bytes that are not a valid message of the method's request type."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(deserializer):
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)  # Message.FromString, bound to the message class
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def decode(raw: bytes):
        try:
            return deserializer(raw)
        except Exception as e:  # DecodeError, or invalid UTF-8 in a string field
            reason = " ".join(str(e).split())[:MAX_ERROR_CHARS]
            reason = "" if not reason or reason.startswith("Error parsing message") else f": {reason}"
            return Undecodable(f"the request ({len(raw)} bytes) does not decode as a {type_name} protobuf "
                               f"message{reason}")
    return decode


def _guard_unary(behaviour):
    async def handler(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)
    return handler


def _guard_stream(behaviour):
    async def handler(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async for response in behaviour(request, context):
            yield response
    return handler


class _Registrar:
    """Stands in for Serve's gRPC server while a generated ``add_*_to_server`` registers one service."""

    def __init__(self, server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        for generic in generic_handlers:
            generic._method_handlers = {
                method: h if h.request_streaming else h._replace(request_deserializer=_tolerant(h.request_deserializer))
                for method, h in generic._method_handlers.items()}
        self._server.add_generic_rpc_handlers(generic_handlers)  # Serve swaps in its routing behaviours here
        for generic in generic_handlers:  # looked up per call, so wrapping them now still takes effect
            generic._method_handlers = {method: _guarded(h) for method, h in generic._method_handlers.items()}

    def add_registered_method_handlers(self, service_name, method_handlers) -> None:
        pass  # see the module docstring: the generic handlers serve every method


def _guarded(h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    if h.request_streaming:
        return h
    changes = {}
    if h.unary_unary is not None:
        changes["unary_unary"] = _guard_unary(h.unary_unary)
    if h.unary_stream is not None:
        changes["unary_stream"] = _guard_stream(h.unary_stream)
    return h._replace(**changes)


# What Serve's proxy imports (``grpc_servicer_functions``): each registers one generated service through _Registrar.
def add_generate_service(servicer, server) -> None:
    from moeray.serving.gen import generate_pb2_grpc

    generate_pb2_grpc.add_GenerateServiceServicer_to_server(servicer, _Registrar(server))


def add_placement_service(servicer, server) -> None:
    from moeray.serving.gen import placement_pb2_grpc

    placement_pb2_grpc.add_PlacementServiceServicer_to_server(servicer, _Registrar(server))


def add_inference_service(servicer, server) -> None:
    from moeray.serving.gen import grpc_predict_v2_pb2_grpc

    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, _Registrar(server))


def add_health_service(servicer, server) -> None:
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(servicer, _Registrar(server))


SERVICER_FUNCTIONS = [f"{__name__}.{f.__name__}" for f in (add_generate_service, add_placement_service,
                                                           add_inference_service, add_health_service)]
