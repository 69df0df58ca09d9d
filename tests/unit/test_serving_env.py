"""serving_env: what `moeray serve` sets for Serve's processes (the serving suite runs under it: tests/conftest.py)."""

from moeray.serving.serve_env import (DEFAULT_MAX_MESSAGE_BYTES, ENVELOPE_BYTES, MAX_MESSAGE_ENV, PROXY_GRPC_ENV,
                                      REPLICA_MAX_MESSAGE_ENV, serving_env)


def test_the_proxy_replica_channel_takes_what_the_proxy_may_send():
    assert serving_env(2**20, current={}) == {MAX_MESSAGE_ENV: str(2**20), PROXY_GRPC_ENV: "1",
                                              REPLICA_MAX_MESSAGE_ENV: str(2**20 + ENVELOPE_BYTES)}
    assert serving_env(current={MAX_MESSAGE_ENV: str(2**24)})[REPLICA_MAX_MESSAGE_ENV] == str(2**24 + ENVELOPE_BYTES)
    # gRPC's limits are signed 32-bit
    assert serving_env(current={})[REPLICA_MAX_MESSAGE_ENV] == str(DEFAULT_MAX_MESSAGE_BYTES) == str(2**31 - 1)


def test_a_users_own_proxy_setting_stands():
    assert PROXY_GRPC_ENV not in serving_env(current={PROXY_GRPC_ENV: "0"})
