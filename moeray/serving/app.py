"""The Ray Serve application: one ingress deployment behind Serve's gRPC and HTTP proxies, fronting the routers.

It serves moeray.v1.GenerateService, moeray.v1.PlacementService, the KServe v2 GRPCInferenceService and
grpc.health.v1.Health (Serve's proxy routes each RPC to the ingress method of the same name; reflection comes
from the proxy), and the OpenAI-compatible HTTP API (moeray/serving/openai_api.py: the ASGI app the same replica
builds in ``__serve_build_asgi_app__``). Requests spread round-robin over the routers, which share one pool of
expert workers.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import os
import time

import grpc
import numpy as np
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from moeray import telemetry
from moeray.request import InvalidRequest, RequestLimits, check_request_id, new_request_id
from moeray.serving import errors
from moeray.serving.admission import Admission, serve_limits
from moeray.serving.detokenize import text_stream
from moeray.serving.errors import Fail as _Fail, fail as _fail  # noqa: F401 - the admin RPCs answer through these
from moeray.serving.wire import SERVICER_FUNCTIONS  # noqa: F401 - the generated ones, decoding errors answered

# NOTE: the generated stubs are imported inside the ingress only (see _stubs). A process that starts the app may
# also hold tritonclient, whose own copy of the KServe messages would clash with ours in protobuf's default pool.

log = logging.getLogger(__name__)

HEALTH_TTL_S = 0.5  # how long a health answer is reused (load balancers probe often)
# Serve's gRPC proxy's limit (Serve reads the same variable, with this default): a ModelInfer response over it is
# refused before any compute.
MAX_MESSAGE_ENV, DEFAULT_MAX_MESSAGE_BYTES = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", 2**31 - 1
ADMIN_TOKEN_ENV, ADMIN_TOKEN_FILE_ENV = "MOERAY_ADMIN_TOKEN", "MOERAY_ADMIN_TOKEN_FILE"


def _stubs():
    from grpc_health.v1 import health_pb2

    from moeray.serving import codec
    from moeray.serving.gen import generate_pb2, grpc_predict_v2_pb2, placement_pb2

    return codec, generate_pb2, placement_pb2, grpc_predict_v2_pb2, health_pb2


def read_admin_token() -> str | None:
    """The bearer token that placement mutations need: $MOERAY_ADMIN_TOKEN, or the file $MOERAY_ADMIN_TOKEN_FILE
    names (re-read on every check, so rotating the file rotates the token)."""
    path = os.environ.get(ADMIN_TOKEN_FILE_ENV)
    if path:
        with open(path) as f:
            return f.read().strip() or None
    return os.environ.get(ADMIN_TOKEN_ENV) or None


@serve.deployment(ray_actor_options={"num_cpus": 0}, **serve_limits(256, 256))
@serve.ingress()  # HTTP: the app __serve_build_asgi_app__ returns; gRPC: the methods below, by name
class Ingress:
    def __init__(self, *, model_name: str, engine_state: dict, env: dict | None = None, max_ongoing: int = 256,
                 max_queued: int = 256, chat_template: str | None = None) -> None:
        os.environ.update(env or {})
        self.chat_template = chat_template  # --chat-template: overrides the checkpoint's (HTTP chat completions)
        self.admission = Admission(max_ongoing, max_queued)  # exact: see moeray/serving/admission.py
        self.max_message_bytes = int(os.environ.get(MAX_MESSAGE_ENV) or DEFAULT_MAX_MESSAGE_BYTES)
        telemetry.setup(engine_state.get("telemetry"))
        global codec, generate_pb2, placement_pb2, kserve_pb2, health_pb2
        codec, generate_pb2, placement_pb2, kserve_pb2, health_pb2 = _stubs()
        self.model_name = model_name
        self.routers = engine_state["routers"]
        self.controller = engine_state["controller"]
        self.spec = engine_state["spec"]
        self.limits: RequestLimits = engine_state["limits"]
        self._next_router = itertools.cycle(range(len(self.routers)))
        self._healthy, self._health_at = True, float("-inf")
        self.tokenizer = None
        if engine_state.get("has_tokenizer"):
            from transformers import AutoTokenizer

            from moeray.model.hub import local_model_dir  # a hub id's tokenizer files, in this node's cache

            self.tokenizer = AutoTokenizer.from_pretrained(local_model_dir(engine_state["checkpoint_path"]),
                                                           local_files_only=True)

    def _router(self):
        return self.routers[next(self._next_router)]

    def __serve_build_asgi_app__(self):
        """The OpenAI-compatible HTTP API, on the routers, admission and tokenizer of this replica."""
        from moeray.serving.openai_api import build_http_app

        return build_http_app(self)

    def drain(self) -> dict:
        """Stop admitting (new requests: UNAVAILABLE / HTTP 503; health NOT_SERVING); requests in flight carry on.
        Called through a Serve handle by ``moeray serve`` on SIGTERM (moeray/serving/lifecycle.py)."""
        self.admission.drain()
        return self.admission.stats()

    # -- moeray.v1.GenerateService -----------------------------------------------------------------------
    @telemetry.traced_rpc("moeray.v1.GenerateService/Generate")
    async def Generate(self, request: generate_pb2.GenerateRequest, grpc_context: RayServegRPCContext):
        request_id = None
        try:
            request_id = check_request_id(request.request_id) if request.request_id else new_request_id()
            sampling = codec.sampling_from_proto(request.sampling)
            ids = self.limits.check(self._prompt_ids(request), sampling)
            text = text_stream(self.tokenizer, request.sampling.stop,  # one detokenizer per request; checks stop
                               include_stop_str_in_output=request.sampling.include_stop_str_in_output)
            async with self.admission.slot(request_id) as admitted:  # AdmissionFull, DuplicateRequestId
                if admitted.aborted:  # Abort came while it waited for a slot
                    yield generate_pb2.GenerateResponse(request_id=request_id,
                                                        finish_reason=codec.FINISH_REASONS["abort"])
                    return
                async for response in self._stream(ids, sampling, request_id, text):
                    yield response
        except _Fail:
            raise
        except Exception as e:  # noqa: BLE001 - every error answers from the one table (moeray/serving/errors.py)
            errors.fail_with(grpc_context, e, request_id)

    async def _stream(self, ids: list[int], sampling, request_id: str, text=None):
        router = self._router()
        chunks = router.stream.options(num_returns="streaming").remote(ids, sampling, request_id,
                                                                        telemetry.current_traceparent())
        produced, finished = 0, False
        try:
            async for ref in chunks:
                chunk = await ref
                produced += len(chunk.token_ids)
                response = generate_pb2.GenerateResponse(request_id=chunk.request_id, token_ids=chunk.token_ids)
                if text is not None:  # a character split across chunks comes whole; the last chunk flushes
                    response.text = text.feed(chunk.token_ids) + (text.finish() if chunk.finish_reason else "")
                stop = text is not None and text.stop_hit is not None
                if chunk.finish_reason is not None or stop:
                    finished = chunk.finish_reason is not None  # a stop string ends it early: the finally aborts
                    response.finish_reason = codec.FINISH_REASONS["stop" if stop else chunk.finish_reason]
                    response.usage.prompt_tokens = len(ids)
                    response.usage.completion_tokens = produced
                yield response
                if stop:
                    return
        except Exception:
            finished = True  # the router ended the request (or died): nothing to abort, and never another's id
            raise
        finally:
            if not finished:  # the client left (cancel, deadline) or a stop string: stop its generation, free its slot
                router.abort.remote(request_id)

    def _prompt_ids(self, request: generate_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "prompt_ids":
            return [int(t) for t in request.prompt_ids.ids]
        if kind == "prompt_text":
            if self.tokenizer is None:
                raise InvalidRequest("prompt_text needs a checkpoint with a tokenizer; send prompt_ids")
            return self.tokenizer(request.prompt_text, add_special_tokens=False)["input_ids"]
        raise InvalidRequest("prompt is empty: set prompt_ids or prompt_text")

    async def Abort(self, request: generate_pb2.AbortRequest,
                    grpc_context: RayServegRPCContext) -> generate_pb2.AbortResponse:
        try:
            waiting = self.admission.abort(request.request_id)  # admitted here, maybe not at a router yet
            aborted = await asyncio.gather(*[r.abort.remote(request.request_id) for r in self.routers])
        except Exception as e:  # noqa: BLE001
            errors.fail_with(grpc_context, e, None)
        return generate_pb2.AbortResponse(aborted=waiting or any(aborted))

    def admission_stats(self) -> dict:
        """Requests running and waiting against the admission limits (through a Serve handle; not a gRPC method)."""
        return self.admission.stats()

    def GetModelInfo(self, request: generate_pb2.GetModelInfoRequest) -> generate_pb2.GetModelInfoResponse:
        s = self.spec
        return generate_pb2.GetModelInfoResponse(
            model_name=self.model_name, architecture=s.architecture, num_layers=s.num_hidden_layers,
            num_moe_layers=len(s.moe_layers), num_experts=s.num_experts, top_k=s.top_k, vocab_size=s.vocab_size,
            max_positions=s.max_positions, total_params=s.total_params, active_params=s.active_params,
            has_tokenizer=self.tokenizer is not None)

    # -- moeray.v1.PlacementService ----------------------------------------------------------------------
    async def GetPlacement(self, request) -> placement_pb2.GetPlacementResponse:
        state = await self.controller.describe.remote()
        health = await self.controller.health.remote()
        workers = await self.controller.workers.remote()  # the controller's list: it may have scaled
        info = await asyncio.gather(*[w.info.remote() for w in workers], return_exceptions=True)
        plan, topology = state["plan"], state["topology"]
        response = placement_pb2.GetPlacementResponse(
            epoch=plan["epoch"], policy=state["policy"], slots_per_worker=topology["slots_per_worker"],
            redundant_slots=state["redundant"], rebalances=state["rebalances"],
            target_workers=health["target_workers"], live_workers=health["live_workers"],
            healing_state=health["state"], healing_error=health["error"],
            experts_available=health["serving"])
        for phy2log, slot_worker in zip(plan["phy2log"], plan["slot_worker"]):
            response.layers.add(phy2log=phy2log, slot_worker=slot_worker)
        for i, (w, node) in enumerate(zip(info, topology["worker_node"])):
            if isinstance(w, Exception):  # a dead worker: the controller has placed its experts elsewhere
                response.workers.add(index=i, device="dead", node=node)
                continue
            response.workers.add(index=w["worker"], node_id=w["node_id"], device=w["device"],
                                 resident_bytes=w["resident_bytes"], node=node)
        return response

    async def GetLoad(self, request) -> placement_pb2.GetLoadResponse:
        load = await self.controller.window_load.remote()
        top = await self.controller.top_tokens.remote(request.top_tokens) if request.top_tokens else None
        response = placement_pb2.GetLoadResponse(window_steps=load["steps"])
        for l, (e_E, w_W, t_E) in enumerate(zip(load["expert_LE"], load["worker_LW"], load["total_LE"])):
            imbalance = float(w_W.max() / w_W.mean()) if w_W.sum() else 1.0
            layer = response.layers.add(expert_tokens=e_E.tolist(), worker_tokens=w_W.tolist(), imbalance=imbalance,
                                        expert_tokens_total=t_E.tolist())
            for tokens in top[l] if top else ():
                ids = [t for t, _ in tokens]
                texts = [self.tokenizer.decode([t]) for t in ids] if self.tokenizer is not None else []
                layer.top_tokens.add(token_ids=ids, counts=[c for _, c in tokens], texts=texts)
        return response

    def _authorize(self, ctx: RayServegRPCContext) -> None:
        expected = read_admin_token()
        given = dict(ctx.invocation_metadata()).get("authorization", "")
        if expected is None:
            _fail(ctx, grpc.StatusCode.PERMISSION_DENIED, "placement changes are disabled: no admin token is set")
        if not given.startswith("Bearer "):
            _fail(ctx, grpc.StatusCode.UNAUTHENTICATED, "placement changes need 'authorization: Bearer <token>'")
        if not hmac.compare_digest(given.removeprefix("Bearer ").encode(), expected.encode()):
            _fail(ctx, grpc.StatusCode.PERMISSION_DENIED, "the admin token is wrong")  # never echo either token

    def _params(self, text: str, ctx: RayServegRPCContext) -> dict | None:
        if not text:
            return None
        try:
            params = json.loads(text)
        except json.JSONDecodeError as e:
            _fail(ctx, grpc.StatusCode.INVALID_ARGUMENT, f"params_json is not valid JSON: {e}")
        if not isinstance(params, dict):
            _fail(ctx, grpc.StatusCode.INVALID_ARGUMENT, f"params_json must be a JSON object; got {type(params).__name__}")
        return params

    @staticmethod
    def _reason(e: Exception) -> str:
        """The one-line message of an error the controller raised (Ray's wrapper adds the remote traceback)."""
        return str(getattr(e, "cause", None) or e)

    async def Rebalance(self, request, grpc_context: RayServegRPCContext) -> placement_pb2.RebalanceResponse:
        self._authorize(grpc_context)
        params = self._params(request.params_json, grpc_context)
        try:
            record = await self.controller.rebalance.remote(dry_run=request.dry_run, policy=request.policy or None,
                                                            params=params)
        except ValueError as e:  # a policy not allowed, bad parameters (nothing changed), or a plan that does not fit
            _fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, self._reason(e))
        response = placement_pb2.RebalanceResponse(
            epoch=record["epoch"], imbalance_before=record["expected_imbalance_before"],
            imbalance_after=record["expected_imbalance_after"], applied=record["applied"],
            moved_slots=record["moved_slots"], moved_bytes=record["moved_bytes"], policy=record["policy"])
        for move in record["moves"]:
            load = move["action"] == "load"
            response.moves.add(layer=move["layer"], expert=move["expert"], from_worker=-1 if load else move["worker"],
                               to_worker=move["worker"] if load else -1)
        return response

    async def SetPolicy(self, request, grpc_context: RayServegRPCContext) -> placement_pb2.SetPolicyResponse:
        self._authorize(grpc_context)
        params = self._params(request.params_json, grpc_context)
        try:
            await self.controller.set_policy.remote(request.policy, params)
        except ValueError as e:  # a policy not allowed, or bad parameters: the policy in force stays
            _fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, self._reason(e))
        return placement_pb2.SetPolicyResponse(policy=request.policy)

    async def ScaleWorkers(self, request, grpc_context: RayServegRPCContext) -> placement_pb2.ScaleWorkersResponse:
        """Accept a worker count and answer at once (applied=False: in progress; GetPlacement shows how far it got)."""
        self._authorize(grpc_context)
        try:
            accepted = await self.controller.request_scale.remote(request.workers)
        except ValueError as e:  # out of [min_workers, max_workers], beyond the cluster, or too few for the experts
            _fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, self._reason(e))
        return placement_pb2.ScaleWorkersResponse(workers=accepted["target"], epoch=accepted["epoch"], applied=False)

    # -- KServe v2 ---------------------------------------------------------------------------------------
    def ServerLive(self, request) -> kserve_pb2.ServerLiveResponse:
        return kserve_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request) -> kserve_pb2.ServerReadyResponse:
        return kserve_pb2.ServerReadyResponse(ready=await self._serving())

    async def ModelReady(self, request, grpc_context: RayServegRPCContext) -> kserve_pb2.ModelReadyResponse:
        self._check_model(request.name, grpc_context)
        return kserve_pb2.ModelReadyResponse(ready=await self._serving())

    def ServerMetadata(self, request) -> kserve_pb2.ServerMetadataResponse:
        from moeray import __version__

        return kserve_pb2.ServerMetadataResponse(name="moeray", version=__version__, extensions=[])

    def ModelMetadata(self, request, grpc_context: RayServegRPCContext) -> kserve_pb2.ModelMetadataResponse:
        self._check_model(request.name, grpc_context)
        response = kserve_pb2.ModelMetadataResponse(name=self.model_name, versions=["1"], platform="moeray")
        response.inputs.add(name="input_ids", datatype="INT64", shape=[-1, -1])
        response.inputs.add(name="attention_mask", datatype="INT64", shape=[-1, -1])
        response.outputs.add(name="logits", datatype="FP32", shape=[-1, -1, self.spec.vocab_size])
        response.outputs.add(name="last_logits", datatype="FP32", shape=[-1, self.spec.vocab_size])
        return response

    @telemetry.traced_rpc("inference.GRPCInferenceService/ModelInfer")
    async def ModelInfer(self, request, grpc_context: RayServegRPCContext) -> kserve_pb2.ModelInferResponse:
        request_id = None
        try:
            self._check_model(request.model_name, grpc_context)
            request_id = check_request_id(request.id, "id") if request.id else new_request_id()
            ids, mask = codec.kserve_inputs(request)
            outputs = codec.kserve_outputs(request)
            (batch, tokens), vocab = ids.shape, self.spec.vocab_size
            if tokens > self.spec.max_positions:
                raise InvalidRequest(f"input_ids has {tokens} tokens; the model has {self.spec.max_positions} "
                                     "positions")
            if ids.min() < 0 or ids.max() >= vocab:
                bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
                raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab})")
            # before any compute: a response over the message limit would be computed only to be dropped
            codec.check_response_size(request, self.model_name, outputs, batch, tokens, vocab, self.max_message_bytes)
            async with self.admission.slot():
                last_only = "logits" not in outputs
                scored = np.asarray(await self._router().score.remote(ids, mask, telemetry.current_traceparent(),
                                                                      last_only=last_only))
            if last_only:
                arrays = {"last_logits": scored}
            else:
                last = scored[np.arange(batch), codec.last_positions(mask, tokens, batch)]
                arrays = {name: scored if name == "logits" else last for name in outputs}
            return codec.kserve_response(request, self.model_name, arrays)
        except _Fail:
            raise
        except Exception as e:  # noqa: BLE001 - every error answers from the one table (moeray/serving/errors.py)
            errors.fail_with(grpc_context, e, request_id)

    def _check_model(self, name: str, ctx: RayServegRPCContext) -> None:
        if name != self.model_name:  # NOT_FOUND
            errors.fail_with(ctx, errors.ModelNotFound(f"model {errors.clip(name)} is not served here; this server "
                                                       f"serves {self.model_name!r}"), None)

    # -- grpc.health.v1 ----------------------------------------------------------------------------------
    async def Check(self, request) -> health_pb2.HealthCheckResponse:
        serving = await self._serving()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if serving else
                                              health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _serving(self) -> bool:
        """Not draining, and every expert has a live replica (the controller's view, at most HEALTH_TTL_S old). An
        unreachable controller (restarting) keeps the last answer: requests never wait on it."""
        if self.admission.draining:
            return False
        now = time.monotonic()
        if now - self._health_at > HEALTH_TTL_S:
            try:
                self._healthy = (await asyncio.wait_for(self.controller.health.remote(), 2.0))["serving"]
                self._health_at = now
            except Exception:  # noqa: BLE001 - a restarting controller
                pass
        return self._healthy


def start_serving(engine, *, grpc_port: int = 9000, http_port: int = 8000, host: str = "127.0.0.1",
                  model_name: str | None = None, app_name: str = "moeray", route_prefix: str = "/",
                  max_ongoing_requests: int = 256, max_queued_requests: int = 256,
                  chat_template: str | None = None) -> str:
    """Start Serve's proxies and deploy the ingress in front of ``engine``'s routers; returns the model name.

    Admission control (exact, in the ingress: moeray/serving/admission.py): at most ``max_ongoing_requests``
    Generate/ModelInfer calls run and ``max_queued_requests`` more wait; the next is answered RESOURCE_EXHAUSTED at
    once. The same ingress serves the OpenAI-compatible HTTP API on ``http_port`` (``chat_template``: a Jinja
    template replacing the checkpoint's for /v1/chat/completions).

    NOTE: Ray 2.60's gRPC proxy binds every interface ([::]:port) whatever ``host`` says; ``host`` binds the
    HTTP proxy. Put a firewall or a Kubernetes Service in front when the machine is reachable from outside.
    """
    start_proxies(grpc_port=grpc_port, http_port=http_port, host=host)
    state = engine_state(engine)
    ingress = _ingress(state, model_name, max_ongoing_requests, max_queued_requests, chat_template)
    # NOTE: the gRPC proxy routes to an application only when it has a route prefix (then, alone, by default).
    serve.run(ingress, name=app_name, route_prefix=route_prefix, logging_config={"enable_access_log": False})
    return state["model_name"] if model_name is None else model_name


def start_proxies(*, grpc_port: int, http_port: int, host: str) -> None:
    """Start Serve with its gRPC proxy (our servicers registered) and its HTTP proxy (idempotent)."""
    from ray.serve.config import gRPCOptions

    serve.start(http_options={"host": host, "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS),
                logging_config={"enable_access_log": False})


def engine_state(engine) -> dict:
    """What the ingress needs of an engine: actor handles and the checkpoint's facts (all serialisable)."""
    checkpoint = engine.checkpoint.checkpoint
    return {"routers": engine.routers, "workers": engine.workers, "controller": engine.controller,
            "spec": engine.spec, "limits": engine.limits, "checkpoint_path": checkpoint.ref,
            "has_tokenizer": checkpoint.has_tokenizer, "model_name": checkpoint.name,
            "telemetry": engine.config.telemetry.for_process("ingress")}


def _ingress(state: dict, model_name: str | None, max_ongoing: int, max_queued: int,
             chat_template: str | None = None):
    from moeray.serving.openai_api import API_KEY_ENV

    env = {k: v for k, v in os.environ.items() if k in (ADMIN_TOKEN_ENV, ADMIN_TOKEN_FILE_ENV, API_KEY_ENV)}
    return Ingress.options(**serve_limits(max_ongoing, max_queued)).bind(
        model_name=model_name or state["model_name"], engine_state=state, env=env, max_ongoing=max_ongoing,
        max_queued=max_queued, chat_template=chat_template)


class EngineHost:
    """Owns an Engine (its workers, routers and controller) for an application Serve builds from a config file:
    Serve calls the builder in a short-lived task, so the actors need an owner that outlives it."""

    def __init__(self, config) -> None:
        from moeray.engine import Engine

        self.engine = Engine(config)

    def state(self) -> dict:
        return engine_state(self.engine)

    def shutdown(self) -> None:
        self.engine.shutdown()


def build_app(args: dict):
    """The Serve application builder for ``serveConfigV2`` (``import_path: moeray.serving.app:build_app``).

    ``args``: EngineConfig fields (``model`` defaults to the embedded demo; ``controller`` a mapping of
    ControllerConfig fields), plus ``model_name``, ``max_ongoing_requests`` and ``max_queued_requests``. The engine
    lives in a detached actor named ``moeray-engine-<app>`` (one per application name, ``app_name`` arg), reused when
    Serve rebuilds the application, so expert workers keep their slots across redeploys of the ingress.
    """
    import ray

    from moeray.engine import EngineConfig
    from moeray.placement.config import ControllerConfig

    args = dict(args)
    serving = {k: args.pop(k) for k in ("model_name", "max_ongoing_requests", "max_queued_requests", "app_name",
                                        "chat_template") if k in args}
    if not args.get("model"):
        from moeray.model.demo import ensure_demo_checkpoint

        args["model"] = str(ensure_demo_checkpoint())
    controller = args.pop("controller", None) or {}
    if not isinstance(controller, dict):
        raise ValueError(f"args.controller must be a mapping of placement settings; got {controller!r}")
    from moeray.telemetry import TelemetryConfig

    otel = TelemetryConfig(**(args.pop("telemetry", None) or {}))  # a mapping of TelemetryConfig fields
    config = EngineConfig(controller=ControllerConfig(**controller), telemetry=otel, **args)  # a bad field fails here, named
    host = ray.remote(EngineHost).options(
        name=f"moeray-engine-{serving.get('app_name', 'moeray')}", lifetime="detached", get_if_exists=True,
        num_cpus=0, max_concurrency=4).remote(config)
    state = ray.get(host.state.remote())
    return _ingress(state, serving.get("model_name"), serving.get("max_ongoing_requests", 256),
                    serving.get("max_queued_requests", 256), serving.get("chat_template"))
