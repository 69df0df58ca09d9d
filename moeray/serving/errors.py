"""Exceptions -> gRPC status codes and HTTP statuses: the one table every error the ingress answers comes from
(gRPC handlers through ``answers`` / ``fail_with``, the OpenAI-compatible HTTP API in moeray/serving/openai_api.py
through ``answer``, and the 'loading' stand-in in moeray/serving/lifecycle.py).

A client gets one line naming the cause, the value and the limit; never a traceback, a pid, an IP, an actor id or a
path (Ray's wrapped exceptions carry all of those: they are unwrapped to the original exception first, and what is
not in the table is logged here with its traceback and the request id, and answered INTERNAL with just that id).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import re

import grpc
from ray import exceptions as ray_errors

from moeray import telemetry
from moeray.request import DuplicateRequestId, InvalidRequest, new_request_id
from moeray.router.dispatch import ExpertsUnavailable

log = logging.getLogger(__name__)

MAX_DETAILS_CHARS = 1024
ROUTER_DIED = "the router running this request failed and is restarting; the request can be retried"
BACKEND_LOST = "a process serving this request was lost; the request can be retried"


class AdmissionFull(Exception):
    """As many requests as admission control allows are in flight and waiting."""


class ResponseTooLarge(Exception):
    """The response would exceed the server's gRPC message size limit."""


class RequestTooLarge(ResponseTooLarge):
    """An HTTP request body over the server's message size limit."""


class ModelNotFound(Exception):
    """The request names a model this server does not serve."""


class Draining(Exception):
    """The server is shutting down: requests in flight finish, new ones are refused (moeray serve's SIGTERM)."""


class NotServing(Exception):
    """Some experts have no live replica (the controller is restoring them): the HTTP API answers 503 at once."""


class Unauthenticated(Exception):
    """A missing or wrong API key (the HTTP API's --api-key), or no admin token sent (placement mutations)."""


class PermissionDenied(Exception):
    """A wrong admin token, or none configured on the server (placement mutations)."""


class ModelLoading(Exception):
    """The engine is still loading (moeray serve's stand-in answers everything with it)."""


class RouteNotFound(Exception):
    """An HTTP path this server does not serve."""


class MethodNotAllowed(Exception):
    """An HTTP method a path does not take."""


class Fail(Exception):
    """Raised after the status is set on the gRPC context: Serve's proxy answers with that status."""


# First match wins (DuplicateRequestId is an InvalidRequest). A message of None: a fixed one, never str(exc).
# Columns: exception, gRPC status code, HTTP status (the OpenAI-compatible API), fixed message.
STATUS_TABLE: list[tuple[type[BaseException], grpc.StatusCode, int, str | None]] = [
    (DuplicateRequestId, grpc.StatusCode.ALREADY_EXISTS, 409, None),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT, 400, None),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401, None),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, 403, None),
    (RouteNotFound, grpc.StatusCode.NOT_FOUND, 404, None),
    (MethodNotAllowed, grpc.StatusCode.UNIMPLEMENTED, 405, None),
    (AdmissionFull, grpc.StatusCode.RESOURCE_EXHAUSTED, 429, None),
    (ResponseTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED, 413, None),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND, 404, None),
    (Draining, grpc.StatusCode.UNAVAILABLE, 503, None),
    (NotServing, grpc.StatusCode.UNAVAILABLE, 503, None),
    (ModelLoading, grpc.StatusCode.UNAVAILABLE, 503, None),
    (ExpertsUnavailable, grpc.StatusCode.UNAVAILABLE, 503, None),
    (ray_errors.RayActorError, grpc.StatusCode.UNAVAILABLE, 503, ROUTER_DIED),  # also ActorDied/ActorUnavailable
    (ray_errors.WorkerCrashedError, grpc.StatusCode.UNAVAILABLE, 503, BACKEND_LOST),
    (ray_errors.ObjectLostError, grpc.StatusCode.UNAVAILABLE, 503, BACKEND_LOST),
    (ray_errors.NodeDiedError, grpc.StatusCode.UNAVAILABLE, 503, BACKEND_LOST),
]
# Answers about the server's own state, not a failure of the backend: not worth a warning in the server log.
_EXPECTED = (Draining, NotServing, ModelLoading)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclasses.dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode  # gRPC; also the ``code`` label of moeray_rejected_requests for either protocol
    http: int  # the OpenAI-compatible API's status
    message: str  # one line, safe to show a client


def unwrap(exc: BaseException) -> BaseException:
    """The exception an actor raised, out of Ray's RayTaskError wrappers (nested when it crossed several actors)."""
    seen = 0
    while isinstance(exc, ray_errors.RayTaskError) and seen < 16:
        cause = getattr(exc, "cause", None)
        if cause is None or cause is exc:
            break
        exc, seen = cause, seen + 1
    return exc


def one_line(text: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """``text`` as one printable line of at most ``limit`` characters."""
    text = " ".join(_ANSI.sub("", str(text)).split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(value: str, limit: int = 64) -> str:
    """A client-supplied string for an error message: repr'd (one line) and cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 4]}...' ({len(value)} characters)"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(code, one-line message) for an exception in the table (after unwrapping Ray's wrappers); else None."""
    row = _row(exc)
    return None if row is None else (row.code, row.message)


def http_status_of(exc: BaseException) -> tuple[int, str] | None:
    """(HTTP status, one-line message) for an exception in the table (after unwrapping Ray's wrappers); else None."""
    row = _row(exc)
    return None if row is None else (row.http, row.message)


def _row(exc: BaseException) -> Answer | None:
    exc = unwrap(exc)
    for kind, code, http, fixed in STATUS_TABLE:
        if isinstance(exc, kind):
            if isinstance(exc, ray_errors.RayTaskError):  # a wrapper whose cause did not survive: never its text
                return None
            return Answer(code, http, one_line(fixed if fixed else str(exc)))
    return None


def answer(exc: BaseException, request_id: str | None) -> Answer:
    """The table's answer to ``exc``. Anything else is logged with its traceback and the request id and answered
    INTERNAL (HTTP 500) with a generic message naming that id; a backend failure (UNAVAILABLE) is logged too."""
    found = _row(exc)
    request_id = request_id or new_request_id()  # an error before the request had one: this one names it in the log
    if found is None:
        log.error("request %s failed unexpectedly", request_id, exc_info=exc)
        return Answer(grpc.StatusCode.INTERNAL, 500,
                      f"internal error serving request {request_id}; the server log has the details")
    if found.code == grpc.StatusCode.UNAVAILABLE and not isinstance(unwrap(exc), _EXPECTED):
        log.warning("request %s: %s (%s)", request_id, found.message, type(unwrap(exc)).__name__, exc_info=exc)
    return found


def reason(exc: BaseException) -> str:
    """The one-line message of an error an actor raised (Ray's wrapper adds the remote traceback to its own)."""
    return str(getattr(exc, "cause", None) or exc)


def fail(ctx, code: grpc.StatusCode, message: str):
    """Answer ``code`` with ``message`` (made one line) and stop the handler."""
    message = one_line(message)
    telemetry.rejected(code)
    ctx.set_code(code)
    ctx.set_details(message)
    raise Fail(message)


def fail_with(ctx, exc: BaseException, request_id: str | None):
    """Answer the status the table gives ``exc`` (see ``answer``) and stop the handler."""
    found = answer(exc, request_id)
    fail(ctx, found.code, found.message)


def answers(handler):
    """Decorate a unary gRPC handler ``(self, request, grpc_context)``, sync or async: any error it raises is
    answered from the table. The wrapper keeps the handler's signature, so Serve still passes ``grpc_context``."""
    @functools.wraps(handler)
    async def wrapped(self, request, grpc_context):
        try:
            result = handler(self, request, grpc_context)
            return await result if inspect.isawaitable(result) else result
        except Fail:
            raise
        except Exception as e:  # noqa: BLE001 - every error answers from the one table
            fail_with(grpc_context, e, None)
    return wrapped
