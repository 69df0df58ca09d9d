"""The ingress's credentials: read once where the server starts, compared in constant time, never shown. The real
servers with them: test_openai.py (the API key, and that no process `moeray serve` starts holds it in its
environment) and test_grpc.py (the admin token from a file)."""

from __future__ import annotations

import pickle

import pytest

from moeray.serving.auth import Credentials
from moeray.serving.errors import PermissionDenied, Unauthenticated

pytestmark = pytest.mark.ray  # errors.py's table imports Ray's exceptions


def test_read_from_the_environment_once_and_never_shown(tmp_path):
    token = tmp_path / "token"
    token.write_text("file-token\n")
    env = {"MOERAY_API_KEY": "env-key", "MOERAY_ADMIN_TOKEN": "env-token", "MOERAY_ADMIN_TOKEN_FILE": str(token)}
    creds = Credentials.from_env(env)
    assert (creds.api_key, creds.admin_token, creds.admin_token_file) == ("env-key", "env-token", str(token))
    assert Credentials.from_env(env, api_key="flag-key").api_key == "flag-key"
    assert Credentials.from_env({}) == Credentials()
    shown = repr(creds) + str(creds)
    assert "env-key" not in shown and "env-token" not in shown and "<set>" in shown and str(token) in shown
    assert pickle.loads(pickle.dumps(creds)) == creds  # it travels to the ingress as a Serve argument


def test_the_admin_token_file_wins_and_is_read_at_each_check(tmp_path):
    token = tmp_path / "token"
    token.write_text("first\n")
    creds = Credentials(admin_token="ignored", admin_token_file=str(token))
    creds.check_admin("Bearer first")
    with pytest.raises(PermissionDenied, match="the admin token is wrong"):
        creds.check_admin("Bearer ignored")
    token.write_text("second")  # rotated: the next check reads it
    creds.check_admin("Bearer second")
    with pytest.raises(PermissionDenied, match="the admin token is wrong") as err:
        creds.check_admin("Bearer first")
    assert "second" not in str(err.value)
    with pytest.raises(Unauthenticated, match="need 'authorization: Bearer <token>'"):
        creds.check_admin("second")
    with pytest.raises(PermissionDenied, match="placement changes are disabled: no admin token is set"):
        Credentials().check_admin("Bearer anything")


def test_the_api_key(tmp_path):
    Credentials().check_api_key("")  # none set: open
    creds = Credentials(api_key="k3y")
    creds.check_api_key("Bearer k3y")
    creds.check_api_key("bearer  k3y ")  # the scheme is case-insensitive, as HTTP's are
    with pytest.raises(Unauthenticated, match="send 'Authorization: Bearer <key>'"):
        creds.check_api_key("k3y")
    with pytest.raises(Unauthenticated, match="the API key is wrong") as err:
        creds.check_api_key("Bearer k3")
    assert "k3y" not in str(err.value)
