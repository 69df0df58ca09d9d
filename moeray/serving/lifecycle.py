"""What ``moeray serve`` answers before the engine is up, and how it drains on SIGTERM.

- **Loading.** ``serve_loading`` starts Serve's proxies and deploys ``Loading`` under the application's name before
  the engine loads: HTTP answers 503 (OpenAI's error shape, ``Retry-After``) on every path, gRPC health
  NOT_SERVING, KServe ServerLive true and ServerReady false, every other RPC UNAVAILABLE. ``start_serving`` then
  deploys the ingress under the same name, which replaces it.
- **Drain.** ``drain`` tells the ingress to admit nothing more (``Ingress.drain``: new Generate / ModelInfer calls
  are UNAVAILABLE, HTTP generation 503; gRPC health NOT_SERVING, /health 503) and waits until the requests in
  flight (running or queued: the admission counter) have finished, or ``timeout_s`` has passed. ``moeray serve``
  then shuts Serve down (its replicas finish what they are sending) and the engine.
"""

from __future__ import annotations

import threading
import time

from ray import serve

from moeray.serving import errors

LOADING = "the model is loading; retry shortly"


def _loading_http_app():
    """The ASGI app of ``Loading`` (built on its replica): 503 everywhere."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from moeray.serving.openai_responses import error_body

    app = FastAPI(title="moeray (loading)", docs_url=None, redoc_url=None, openapi_url=None)
    status, message = errors.http_status_of(errors.ModelLoading(LOADING))

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def loading(path: str):
        return JSONResponse(error_body(status, message), status_code=status, headers={"Retry-After": "2"})

    return app


def _unavailable(ctx) -> None:
    errors.fail_with(ctx, errors.ModelLoading(LOADING), None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(_loading_http_app)
class Loading:
    """Stands in for the ingress while the engine loads (same application name, so the ingress replaces it)."""

    def Check(self, request):
        from moeray.serving import codec

        return codec.health_response(False)

    def ServerLive(self, request):
        from moeray.serving import codec

        return codec.server_live()

    def ServerReady(self, request):
        from moeray.serving import codec

        return codec.server_ready(False)

    async def Generate(self, request, grpc_context):
        _unavailable(grpc_context)
        yield  # unreachable: Generate is a server-streaming RPC

    async def Abort(self, request, grpc_context):
        _unavailable(grpc_context)

    async def GetModelInfo(self, request, grpc_context):
        _unavailable(grpc_context)

    async def GetPlacement(self, request, grpc_context):
        _unavailable(grpc_context)

    async def GetLoad(self, request, grpc_context):
        _unavailable(grpc_context)

    async def Rebalance(self, request, grpc_context):
        _unavailable(grpc_context)

    async def SetPolicy(self, request, grpc_context):
        _unavailable(grpc_context)

    async def ScaleWorkers(self, request, grpc_context):
        _unavailable(grpc_context)

    async def ModelReady(self, request, grpc_context):
        _unavailable(grpc_context)

    async def ServerMetadata(self, request, grpc_context):
        _unavailable(grpc_context)

    async def ModelMetadata(self, request, grpc_context):
        _unavailable(grpc_context)

    async def ModelInfer(self, request, grpc_context):
        _unavailable(grpc_context)


def serve_loading(*, grpc_port: int, http_port: int, host: str, app_name: str = "moeray") -> None:
    """Start Serve's proxies and answer 'loading' on them until ``start_serving`` deploys the ingress."""
    from moeray.serving.app import start_proxies, wait_for_proxies

    start_proxies(grpc_port=grpc_port, http_port=http_port, host=host)
    serve.run(Loading.bind(), name=app_name, route_prefix="/", logging_config={"enable_access_log": False})
    wait_for_proxies(grpc_port=grpc_port, http_port=http_port)


def drain(app_name: str = "moeray", timeout_s: float = 30.0, interrupted: threading.Event | None = None,
          poll_s: float = 0.1) -> dict:
    """Stop admitting and wait for the requests in flight (at most ``timeout_s``; ``interrupted`` cuts it short).
    Returns the ingress's admission stats at the end (``admitted``: the requests still in flight)."""
    handle = serve.get_app_handle(app_name)
    stats = handle.drain.remote().result(timeout_s=30)
    deadline = time.monotonic() + timeout_s
    while stats["admitted"] and time.monotonic() < deadline and not (interrupted and interrupted.is_set()):
        time.sleep(poll_s)
        stats = handle.admission_stats.remote().result(timeout_s=30)
    return stats
