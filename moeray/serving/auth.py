"""Bearer tokens at the ingress: the admin token placement mutations need (gRPC PlacementService) and the optional
API key of the OpenAI-compatible HTTP API. Each check raises an exception of moeray/serving/errors.py's table;
neither token is ever echoed in a message.
"""

from __future__ import annotations

import hmac
import os

from moeray.serving.errors import PermissionDenied, Unauthenticated

ADMIN_TOKEN_ENV, ADMIN_TOKEN_FILE_ENV = "MOERAY_ADMIN_TOKEN", "MOERAY_ADMIN_TOKEN_FILE"
API_KEY_ENV = "MOERAY_API_KEY"
ENV_VARS = (ADMIN_TOKEN_ENV, ADMIN_TOKEN_FILE_ENV, API_KEY_ENV)  # what the ingress replica is started with


def read_admin_token() -> str | None:
    """The bearer token that placement mutations need: $MOERAY_ADMIN_TOKEN, or the file $MOERAY_ADMIN_TOKEN_FILE
    names (re-read on every check, so rotating the file rotates the token)."""
    path = os.environ.get(ADMIN_TOKEN_FILE_ENV)
    if path:
        with open(path) as f:
            return f.read().strip() or None
    return os.environ.get(ADMIN_TOKEN_ENV) or None


def check_admin(authorization: str) -> None:
    """``authorization``: the gRPC metadata value. No token configured refuses every mutation."""
    expected = read_admin_token()
    if expected is None:
        raise PermissionDenied("placement changes are disabled: no admin token is set")
    if not authorization.startswith("Bearer "):
        raise Unauthenticated("placement changes need 'authorization: Bearer <token>'")
    if not hmac.compare_digest(authorization.removeprefix("Bearer ").encode(), expected.encode()):
        raise PermissionDenied("the admin token is wrong")


def check_api_key(authorization: str) -> None:
    """``authorization``: the HTTP header's value. No key configured ($MOERAY_API_KEY unset) lets every call in."""
    expected = os.environ.get(API_KEY_ENV)
    if not expected:
        return
    if authorization[:7].lower() != "bearer ":
        raise Unauthenticated("this server needs an API key: send 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(authorization[7:].strip().encode(), expected.encode()):
        raise Unauthenticated("the API key is wrong")
