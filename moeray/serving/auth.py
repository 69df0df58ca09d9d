"""Bearer tokens at the ingress: the admin token placement mutations need (gRPC PlacementService) and the optional
API key of the OpenAI-compatible HTTP API. Each check raises an exception of moeray/serving/errors.py's table;
neither token is ever echoed in a message, a log line or a repr.

The secrets are read once, where the server starts (``Credentials.from_env``: the operator's environment, or a
mounted Secret's file), and handed to the ingress as an argument: never written into a process environment, which
every process Ray starts from it would copy and Ray's runtime environments would show.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
from collections.abc import Mapping

from moeray.serving.errors import PermissionDenied, Unauthenticated

ADMIN_TOKEN_ENV, ADMIN_TOKEN_FILE_ENV = "MOERAY_ADMIN_TOKEN", "MOERAY_ADMIN_TOKEN_FILE"
API_KEY_ENV = "MOERAY_API_KEY"


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class Credentials:
    api_key: str | None = None  # the HTTP API's; None: every call is let in
    admin_token: str | None = None
    admin_token_file: str | None = None  # wins over admin_token; re-read on every check, so rotating it rotates

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, *, api_key: str | None = None) -> Credentials:
        """$MOERAY_API_KEY (or ``api_key``, e.g. a flag's), $MOERAY_ADMIN_TOKEN and $MOERAY_ADMIN_TOKEN_FILE."""
        return cls(api_key=api_key or environ.get(API_KEY_ENV) or None,
                   admin_token=environ.get(ADMIN_TOKEN_ENV) or None,
                   admin_token_file=environ.get(ADMIN_TOKEN_FILE_ENV) or None)

    def __repr__(self) -> str:  # NOTE: what is set, never a value: Serve and tracebacks may print its arguments
        return (f"Credentials(api_key={'<set>' if self.api_key else None}, "
                f"admin_token={'<set>' if self.admin_token else None}, admin_token_file={self.admin_token_file!r})")

    def current_admin_token(self) -> str | None:
        if self.admin_token_file:
            with open(self.admin_token_file) as f:
                return f.read().strip() or None
        return self.admin_token

    def check_admin(self, authorization: str) -> None:
        """``authorization``: the gRPC metadata value. No token configured refuses every mutation."""
        expected = self.current_admin_token()
        if expected is None:
            raise PermissionDenied("placement changes are disabled: no admin token is set")
        if not authorization.startswith("Bearer "):
            raise Unauthenticated("placement changes need 'authorization: Bearer <token>'")
        if not hmac.compare_digest(authorization.removeprefix("Bearer ").encode(), expected.encode()):
            raise PermissionDenied("the admin token is wrong")

    def check_api_key(self, authorization: str) -> None:
        """``authorization``: the HTTP header's value. No key configured lets every call in."""
        if not self.api_key:
            return
        if authorization[:7].lower() != "bearer ":
            raise Unauthenticated("this server needs an API key: send 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(authorization[7:].strip().encode(), self.api_key.encode()):
            raise Unauthenticated("the API key is wrong")
