"""The environment ``moeray serve`` gives Serve's processes, without importing Ray: set before Ray starts them."""

from __future__ import annotations

import os
from collections.abc import Mapping

# Serve's gRPC proxy's limit (Serve reads the same variable, with this default): a ModelInfer response over it is
# refused before any compute.
MAX_MESSAGE_ENV, DEFAULT_MAX_MESSAGE_BYTES = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", 2**31 - 1
PROXY_GRPC_ENV, REPLICA_MAX_MESSAGE_ENV = "RAY_SERVE_PROXY_USE_GRPC", "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
ENVELOPE_BYTES = 64 * 1024  # what Serve wraps around a response on the proxy-replica channel, with room to spare


def serving_env(max_message_bytes: int | None = None, current: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables ``moeray serve`` sets for Serve's processes, given the environment ``current``. Serve's
    processes read them when they start, so they are set before Ray starts them (``set_serving_env``: ``moeray
    serve``, the bench, the tests); deploy/Dockerfile sets the same in the image for a cluster.

    - ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``: the gRPC proxy's message limit (``max_message_bytes``, when given).
    - ``RAY_SERVE_PROXY_USE_GRPC=1`` (unless set): the proxies reach the ingress replica over gRPC, on the replica's
      own inter-deployment server, instead of as Ray actor calls whose every streamed message is a Ray object
      reported back to the proxy. At 32 streams on the demo that path took the proxy most of a core of the two,
      and steps took 1.2-1.5x as long (BENCHMARKS.md). A Serve handle made elsewhere is unchanged.
    - ``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``: that channel's limit (4 MiB by default), raised to the proxy's
      so that a response the proxy may send is never refused before it.
    """
    env = {} if max_message_bytes is None else {MAX_MESSAGE_ENV: str(max_message_bytes)}
    limit = int(env.get(MAX_MESSAGE_ENV) or current.get(MAX_MESSAGE_ENV) or DEFAULT_MAX_MESSAGE_BYTES)
    if PROXY_GRPC_ENV not in current:
        env[PROXY_GRPC_ENV] = "1"
    env[REPLICA_MAX_MESSAGE_ENV] = str(min(limit + ENVELOPE_BYTES, 2**31 - 1))
    return env


def set_serving_env(max_message_bytes: int | None = None) -> None:
    os.environ.update(serving_env(max_message_bytes))
