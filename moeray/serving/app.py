"""The Ray Serve application: one ingress deployment behind Serve's gRPC and HTTP proxies, fronting the routers.

It serves moeray.v1.GenerateService, moeray.v1.PlacementService, the KServe v2 GRPCInferenceService and
grpc.health.v1.Health (Serve's proxy routes each RPC to the ingress method of the same name; reflection comes
from the proxy), and the OpenAI-compatible HTTP API (moeray/serving/openai_api.py: the ASGI app the same replica
builds in ``__serve_build_asgi_app__``). Both reach the engine through one ``EngineHandle`` (each request at the
least-loaded router; the routers share one pool of expert workers), build responses in ``codec`` and answer
errors from the one table in ``errors``.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING

from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from moeray import telemetry
from moeray.request import MAX_LOGPROBS, InvalidRequest, check_request_id, new_request_id
from moeray.serving import auth, codec, errors
from moeray.serving.admission import Admission, serve_limits
from moeray.serving.detokenize import text_stream
from moeray.serving.engine_handle import EngineHandle
from moeray.serving.serve_env import DEFAULT_MAX_MESSAGE_BYTES, MAX_MESSAGE_ENV
from moeray.serving.tool_calls import syntax_of
from moeray.serving.wire import SERVICER_FUNCTIONS  # noqa: F401 - the generated ones, decoding errors answered

if TYPE_CHECKING:
    from moeray.serving.gen import generate_pb2
    from moeray.serving.gen import grpc_predict_v2_pb2 as kserve_pb2

# NOTE: codec imports the KServe stubs on first use only: a process that starts the app may also hold
# tritonclient, whose own copy of the KServe messages would clash with ours in protobuf's default pool.

@serve.deployment(ray_actor_options={"num_cpus": 0}, **serve_limits(256, 256))
@serve.ingress()  # HTTP: the app __serve_build_asgi_app__ returns; gRPC: the methods below, by name
class Ingress:
    def __init__(self, *, engine: EngineHandle, model_name: str | None = None,
                 credentials: auth.Credentials | None = None, max_ongoing: int = 256, max_queued: int = 256,
                 chat_template: str | None = None, tool_call_parser: str | None = None) -> None:
        self.engine = engine
        self.credentials = credentials or auth.Credentials()  # the API key and admin token (moeray/serving/auth.py)
        self.chat_template = chat_template  # --chat-template: overrides the checkpoint's (HTTP chat completions)
        self.admission = Admission(max_ongoing, max_queued)  # exact: see moeray/serving/admission.py
        self.max_message_bytes = int(os.environ.get(MAX_MESSAGE_ENV) or DEFAULT_MAX_MESSAGE_BYTES)
        telemetry.setup(engine.telemetry)
        self.model_name = model_name or engine.model_name
        self.spec, self.limits = engine.spec, engine.limits
        # --tool-call-parser, else the family's (a handle without a spec: a test's, Hermes)
        self.call_syntax = syntax_of(self.spec.architecture if self.spec else "", tool_call_parser)
        self.tokenizer = None
        if engine.has_tokenizer:
            from transformers import AutoTokenizer

            from moeray.model.hub import local_model_dir  # a hub id's tokenizer files, in this node's cache

            self.tokenizer = AutoTokenizer.from_pretrained(local_model_dir(engine.checkpoint_path),
                                                           local_files_only=True)

    def __serve_build_asgi_app__(self):
        """The OpenAI-compatible HTTP API, on the engine handle, admission and tokenizer of this replica."""
        from moeray.serving.openai_api import build_http_app

        return build_http_app(self)

    def drain(self) -> dict:
        """Stop admitting (new requests: UNAVAILABLE / HTTP 503; health NOT_SERVING); requests in flight carry on.
        Called through a Serve handle by ``moeray serve`` on SIGTERM (moeray/serving/lifecycle.py)."""
        self.admission.drain()
        return self.admission.stats()

    def admission_stats(self) -> dict:
        """Requests running and waiting against the admission limits (through a Serve handle; not a gRPC method)."""
        return self.admission.stats()

    async def serving(self) -> bool:
        """Not draining, and every expert has a live replica (health checks, KServe readiness, the HTTP API)."""
        return not self.admission.draining and await self.engine.experts_available()

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise errors.ModelNotFound(f"model {errors.clip(name)} is not served here; this server serves "
                                       f"{self.model_name!r}")

    # -- moeray.v1.GenerateService -----------------------------------------------------------------------
    @telemetry.traced_rpc("moeray.v1.GenerateService/Generate")
    async def Generate(self, request: generate_pb2.GenerateRequest, grpc_context: RayServegRPCContext):
        request_id = None
        try:
            request_id = check_request_id(request.request_id) if request.request_id else new_request_id()
            sampling = codec.sampling_from_proto(request.sampling)
            ids = self.limits.check(codec.prompt_ids(request, self.tokenizer), sampling)
            text = text_stream(self.tokenizer, request.sampling.stop,  # one detokenizer per request; checks stop
                               include_stop_str_in_output=request.sampling.include_stop_str_in_output)
            async with self.admission.slot(request_id) as admitted:  # AdmissionFull, DuplicateRequestId
                if admitted.aborted:  # Abort came while it waited for a slot
                    yield codec.aborted_response(request_id)
                    return
                prompt_logprobs = None
                if request.sampling.HasField("prompt_logprobs"):
                    if request.sampling.prompt_logprobs > MAX_LOGPROBS:
                        raise InvalidRequest(f"prompt_logprobs must lie in [0, {MAX_LOGPROBS}]; got "
                                             f"{request.sampling.prompt_logprobs}")
                    prompt_logprobs = await self.engine.prompt_logprobs(ids, request.sampling.prompt_logprobs)
                async for response in self._stream(ids, sampling, request_id, text):
                    if prompt_logprobs is not None:  # on the first response
                        codec.add_logprobs(response.prompt_logprobs, prompt_logprobs, ids)
                        prompt_logprobs = None
                    yield response
        except errors.Fail:
            raise
        except Exception as e:  # noqa: BLE001 - every error answers from the one table (moeray/serving/errors.py)
            errors.fail_with(grpc_context, e, request_id)

    async def _stream(self, ids: list[int], sampling, request_id: str, text=None):
        produced = 0
        chunks = self.engine.stream(ids, sampling, request_id, telemetry.current_traceparent())
        async with contextlib.aclosing(chunks):  # leaving early (a stop string, the client gone) aborts it
            async for chunk in chunks:
                produced += len(chunk.token_ids)
                delta = ""
                if text is not None:  # a character split across chunks comes whole; the last chunk flushes
                    delta = text.feed(chunk.token_ids) + (text.finish() if chunk.finish_reason else "")
                stop = text is not None and text.stop_hit is not None
                yield codec.generate_response(chunk, delta, "stop" if stop else chunk.finish_reason, len(ids), produced)
                if stop:
                    return

    @errors.answers
    async def Abort(self, request: generate_pb2.AbortRequest, grpc_context: RayServegRPCContext):
        waiting = self.admission.abort(request.request_id)  # admitted here, maybe not at a router yet
        at_router = await self.engine.abort(request.request_id)
        return codec.abort_response(waiting or at_router)

    @errors.answers
    def GetModelInfo(self, request, grpc_context: RayServegRPCContext):
        return codec.model_info(self.model_name, self.spec, self.tokenizer is not None, self.engine.kv_pool)

    # -- moeray.v1.PlacementService ----------------------------------------------------------------------
    @errors.answers
    async def GetPlacement(self, request, grpc_context: RayServegRPCContext):
        return codec.placement_response(*await self.engine.placement())

    @errors.answers
    async def GetLoad(self, request, grpc_context: RayServegRPCContext):
        return codec.load_response(*await self.engine.load(request.top_tokens), self.tokenizer)

    def _authorize(self, ctx: RayServegRPCContext) -> None:
        self.credentials.check_admin(dict(ctx.invocation_metadata()).get("authorization", ""))

    @errors.answers
    async def Rebalance(self, request, grpc_context: RayServegRPCContext):
        self._authorize(grpc_context)
        record = await self.engine.rebalance(dry_run=request.dry_run, policy=request.policy or None,
                                             params=codec.params_from_json(request.params_json))
        return codec.rebalance_response(record)

    @errors.answers
    async def SetPolicy(self, request, grpc_context: RayServegRPCContext):
        self._authorize(grpc_context)
        await self.engine.set_policy(request.policy, codec.params_from_json(request.params_json))
        return codec.set_policy_response(request.policy)

    @errors.answers
    async def ScaleWorkers(self, request, grpc_context: RayServegRPCContext):
        """Accept a worker count and answer at once (applied=False: in progress; GetPlacement shows how far it got)."""
        self._authorize(grpc_context)
        return codec.scale_response(await self.engine.request_scale(request.workers))

    # -- KServe v2 ---------------------------------------------------------------------------------------
    @errors.answers
    def ServerLive(self, request, grpc_context: RayServegRPCContext):
        return codec.server_live()

    @errors.answers
    async def ServerReady(self, request, grpc_context: RayServegRPCContext):
        return codec.server_ready(await self.serving())

    @errors.answers
    async def ModelReady(self, request, grpc_context: RayServegRPCContext):
        self.check_model(request.name)
        return codec.model_ready(await self.serving())

    @errors.answers
    def ServerMetadata(self, request, grpc_context: RayServegRPCContext):
        return codec.server_metadata()

    @errors.answers
    def ModelMetadata(self, request, grpc_context: RayServegRPCContext):
        self.check_model(request.name)
        return codec.model_metadata(self.model_name, self.spec.vocab_size)

    @telemetry.traced_rpc("inference.GRPCInferenceService/ModelInfer")
    async def ModelInfer(self, request, grpc_context: RayServegRPCContext) -> kserve_pb2.ModelInferResponse:
        request_id = None
        try:
            self.check_model(request.model_name)
            request_id = check_request_id(request.id, "id") if request.id else new_request_id()
            ids, mask = codec.kserve_inputs(request, self.spec.vocab_size, self.spec.max_positions)
            outputs = codec.kserve_outputs(request)
            # before any compute: a response over the message limit would be computed only to be dropped
            codec.check_response_size(request, self.model_name, outputs, *ids.shape, self.spec.vocab_size,
                                      self.max_message_bytes)
            last_only = "logits" not in outputs
            async with self.admission.slot():
                scored = await self.engine.score(ids, mask, telemetry.current_traceparent(), last_only)
            return codec.kserve_response(request, self.model_name, outputs, scored, mask)
        except errors.Fail:
            raise
        except Exception as e:  # noqa: BLE001 - every error answers from the one table (moeray/serving/errors.py)
            errors.fail_with(grpc_context, e, request_id)

    # -- grpc.health.v1 ----------------------------------------------------------------------------------
    @errors.answers
    async def Check(self, request, grpc_context: RayServegRPCContext):
        return codec.health_response(await self.serving())


def start_serving(engine, *, grpc_port: int = 9000, http_port: int = 8000, host: str = "127.0.0.1",
                  model_name: str | None = None, app_name: str = "moeray", route_prefix: str = "/",
                  max_ongoing_requests: int = 256, max_queued_requests: int = 256,
                  chat_template: str | None = None, credentials: auth.Credentials | None = None,
                  tool_call_parser: str | None = None) -> str:
    """Start Serve's proxies and deploy the ingress in front of ``engine``'s routers; returns the model name.

    Admission control (exact, in the ingress: moeray/serving/admission.py): at most ``max_ongoing_requests``
    Generate/ModelInfer calls run and ``max_queued_requests`` more wait; the next is answered RESOURCE_EXHAUSTED at
    once. The same ingress serves the OpenAI-compatible HTTP API on ``http_port`` (``chat_template``: a Jinja
    template replacing the checkpoint's for /v1/chat/completions).

    NOTE: Ray 2.60's gRPC proxy binds every interface ([::]:port) whatever ``host`` says; ``host`` binds the
    HTTP proxy. Put a firewall or a Kubernetes Service in front when the machine is reachable from outside.
    """
    start_proxies(grpc_port=grpc_port, http_port=http_port, host=host)
    handle = EngineHandle.of(engine)
    credentials = credentials or auth.Credentials.from_env()  # None: this process's environment, read once here
    ingress = _ingress(handle, model_name, max_ongoing_requests, max_queued_requests, chat_template, credentials,
                       tool_call_parser)
    # NOTE: the gRPC proxy routes to an application only when it has a route prefix (then, alone, by default).
    serve.run(ingress, name=app_name, route_prefix=route_prefix, logging_config={"enable_access_log": False})
    wait_for_proxies(grpc_port=grpc_port, http_port=http_port)
    return model_name or handle.model_name


def wait_for_proxies(*, grpc_port: int, http_port: int, timeout_s: float = 180.0) -> None:
    """Return once every Serve proxy is HEALTHY, i.e. listens on both ports; raise naming the ports if not.

    serve.run returns when the replicas are up, but a proxy starts on its own schedule, and one whose bind fails
    (a port taken) is restarted again and again on the same port without anything being raised here.
    """
    from ray.serve.schema import ProxyStatus

    deadline, seen = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        seen = serve.status().proxies
        if seen and all(status == ProxyStatus.HEALTHY for status in seen.values()):
            return
        time.sleep(0.2)
    states = ", ".join(sorted(str(getattr(s, "value", s)) for s in seen.values())) or "none started"
    raise RuntimeError(f"Serve's proxies are not listening on gRPC port {grpc_port} and HTTP port {http_port} "
                       f"after {timeout_s:.0f} s (proxy states: {states}); is either port taken?")


def start_proxies(*, grpc_port: int, http_port: int, host: str) -> None:
    """Start Serve with its gRPC proxy (our servicers registered) and its HTTP proxy (idempotent)."""
    from ray.serve.config import gRPCOptions

    serve.start(http_options={"host": host, "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS),
                logging_config={"enable_access_log": False})


def _ingress(engine: EngineHandle, model_name: str | None, max_ongoing: int, max_queued: int,
             chat_template: str | None, credentials: auth.Credentials, tool_call_parser: str | None = None):
    return Ingress.options(**serve_limits(max_ongoing, max_queued)).bind(
        engine=engine, model_name=model_name, credentials=credentials, max_ongoing=max_ongoing,
        max_queued=max_queued, chat_template=chat_template, tool_call_parser=tool_call_parser)


class EngineHost:
    """Owns an Engine (its workers, routers and controller) for an application Serve builds from a config file:
    Serve calls the builder in a short-lived task, so the actors need an owner that outlives it."""

    def __init__(self, config) -> None:
        from moeray.engine import Engine

        self.engine = Engine(config)

    def state(self) -> EngineHandle:
        return EngineHandle.of(self.engine)

    def shutdown(self) -> None:
        self.engine.shutdown()


def build_app(args: dict):
    """The Serve application builder for ``serveConfigV2`` (``import_path: moeray.serving.app:build_app``).

    ``args``: EngineConfig fields (``model`` defaults to the embedded demo; ``controller`` a mapping of
    ControllerConfig fields), plus ``model_name``, ``max_ongoing_requests``, ``max_queued_requests``, ``chat_template``
    and ``tool_call_parser``. The engine
    lives in a detached actor named ``moeray-engine-<app>`` (one per application name, ``app_name`` arg), reused when
    Serve rebuilds the application, so expert workers keep their slots across redeploys of the ingress.
    """
    import ray

    from moeray.config import EngineConfig
    from moeray.placement.config import ControllerConfig

    args = dict(args)
    serving = {k: args.pop(k) for k in ("model_name", "max_ongoing_requests", "max_queued_requests", "app_name",
                                        "chat_template", "tool_call_parser") if k in args}
    if not args.get("model"):
        from moeray.model.demo import ensure_demo_checkpoint

        args["model"] = str(ensure_demo_checkpoint())
    controller = args.pop("controller", None) or {}
    if not isinstance(controller, dict):
        raise ValueError(f"args.controller must be a mapping of placement settings; got {controller!r}")
    from moeray.telemetry import TelemetryConfig

    otel = TelemetryConfig(**(args.pop("telemetry", None) or {}))  # a mapping of TelemetryConfig fields
    from moeray.router.kv_config import KVCacheConfig

    kv_cache = KVCacheConfig(**(args.pop("kv_cache", None) or {}))  # a mapping of KVCacheConfig fields
    config = EngineConfig(controller=ControllerConfig(**controller), telemetry=otel, kv_cache=kv_cache,
                          **args)  # a bad field fails here, named
    host = ray.remote(EngineHost).options(
        name=f"moeray-engine-{serving.get('app_name', 'moeray')}", lifetime="detached", get_if_exists=True,
        num_cpus=0, max_concurrency=4).remote(config)
    # NOTE: the pod's own environment (a Secret's file named by $MOERAY_ADMIN_TOKEN_FILE), read in the builder
    return _ingress(ray.get(host.state.remote()), serving.get("model_name"),
                    serving.get("max_ongoing_requests", 256), serving.get("max_queued_requests", 256),
                    serving.get("chat_template"), auth.Credentials.from_env(), serving.get("tool_call_parser"))
