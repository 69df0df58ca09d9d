"""Proto <-> engine types: every gRPC response is built here (moeray.v1, KServe v2, grpc.health.v1), and the
requests' fields are decoded here.

Every decoding error is an ``InvalidRequest`` naming the field, the value and the limit.
"""

from __future__ import annotations

import collections
import json
from typing import TYPE_CHECKING

import numpy as np

from moeray.placement.algorithms.load import routing_gap_L
from moeray.request import InvalidRequest, SamplingParams, StreamChunk, StructuredOutput
from moeray.serving.errors import ResponseTooLarge, clip
from moeray.serving.gen import generate_pb2, placement_pb2

if TYPE_CHECKING:
    from moeray.model.architecture import ModelSpec
    from moeray.router.scheduler import KVStats
    from moeray.serving.gen import grpc_predict_v2_pb2 as kserve_pb2


def _kserve():
    # NOTE: imported on first use: KServe's messages cannot share protobuf's default pool with another copy of them
    # (tritonclient's) in one process, and only the KServe paths need ours.
    from moeray.serving.gen import grpc_predict_v2_pb2

    return grpc_predict_v2_pb2


FINISH_REASONS = {
    "stop": generate_pb2.FINISH_REASON_STOP,
    "length": generate_pb2.FINISH_REASON_LENGTH,
    "abort": generate_pb2.FINISH_REASON_ABORT,
}
# KServe v2 datatype -> (numpy dtype, InferTensorContents field)
_KSERVE_INTS = {"INT64": (np.int64, "int64_contents"), "INT32": (np.int32, "int_contents")}
KSERVE_INPUTS = ("input_ids", "attention_mask")
# logits: FP32 [B, T, V], every position; last_logits: FP32 [B, V], each row's last real position (attention_mask)
KSERVE_OUTPUTS = ("logits", "last_logits")


def sampling_from_proto(msg: generate_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=int(msg.max_new_tokens),
        temperature=float(msg.temperature),
        top_p=float(msg.top_p) if msg.top_p else 1.0,
        top_k=int(msg.top_k),
        seed=int(msg.seed) if msg.HasField("seed") else None,
        stop_token_ids=tuple(int(t) for t in msg.stop_token_ids),
        ignore_eos=bool(msg.ignore_eos),
        logprobs=int(msg.logprobs) if msg.HasField("logprobs") else None,
        presence_penalty=float(msg.presence_penalty), frequency_penalty=float(msg.frequency_penalty),
        repetition_penalty=float(msg.repetition_penalty) or 1.0, min_p=float(msg.min_p),
        min_tokens=int(msg.min_tokens), logit_bias=tuple((int(t), float(b)) for t, b in msg.logit_bias.items()),
        structured=structured_from_proto(msg.structured) if msg.HasField("structured") else None,
    )


def structured_from_proto(msg: generate_pb2.StructuredOutput) -> StructuredOutput | None:
    kind = msg.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not msg.json_object):
        return None
    if kind == "json_object":
        return StructuredOutput("json")
    if kind == "choice":
        return StructuredOutput("choice", choices=tuple(msg.choice.choices))
    return StructuredOutput(kind, getattr(msg, kind))


def add_logprobs(field, records, token_ids=None) -> None:
    """``records`` (TokenLogprob, or None for a prompt's first token, whose id is ``token_ids[0]``) into ``field``."""
    for k, r in enumerate(records):
        if r is None:
            field.add(token_id=token_ids[k])
            continue
        entry = field.add(token_id=r.token_id, logprob=r.logprob, rank=r.rank)
        for t, lp in r.top:
            entry.top.add(token_id=t, logprob=lp)


# -- moeray.v1.GenerateService ------------------------------------------------------------------------------
def prompt_ids(request: generate_pb2.GenerateRequest, tokenizer) -> list[int]:
    kind = request.WhichOneof("prompt")
    if kind == "prompt_ids":
        return [int(t) for t in request.prompt_ids.ids]
    if kind == "prompt_text":
        if tokenizer is None:
            raise InvalidRequest("prompt_text needs a checkpoint with a tokenizer; send prompt_ids")
        return tokenizer(request.prompt_text, add_special_tokens=False)["input_ids"]
    raise InvalidRequest("prompt is empty: set prompt_ids or prompt_text")


def generate_response(chunk: StreamChunk, text: str, finish_reason: str | None, prompt_tokens: int,
                      completion_tokens: int) -> generate_pb2.GenerateResponse:
    """One streamed chunk; the last (``finish_reason`` set: the router's, or "stop" for a stop string) with usage."""
    response = generate_pb2.GenerateResponse(request_id=chunk.request_id, token_ids=chunk.token_ids, text=text)
    if chunk.logprobs:
        add_logprobs(response.logprobs, chunk.logprobs)
    if finish_reason is not None:
        response.finish_reason = FINISH_REASONS[finish_reason]
        response.usage.prompt_tokens = prompt_tokens
        response.usage.completion_tokens = completion_tokens
    return response


def aborted_response(request_id: str) -> generate_pb2.GenerateResponse:
    return generate_pb2.GenerateResponse(request_id=request_id, finish_reason=FINISH_REASONS["abort"])


def abort_response(aborted: bool) -> generate_pb2.AbortResponse:
    return generate_pb2.AbortResponse(aborted=aborted)


def model_info(model_name: str, spec: ModelSpec, has_tokenizer: bool,
               kv_pool: KVStats | None = None) -> generate_pb2.GetModelInfoResponse:
    kv = {} if kv_pool is None else dict(kv_bytes_per_token=kv_pool.bytes_per_token, kv_block_size=kv_pool.block_size,
                                         kv_blocks=kv_pool.blocks_total)
    return generate_pb2.GetModelInfoResponse(
        model_name=model_name, architecture=spec.architecture, num_layers=spec.num_hidden_layers,
        num_moe_layers=len(spec.moe_layers), num_experts=spec.num_experts, top_k=spec.top_k,
        vocab_size=spec.vocab_size, max_positions=spec.max_positions, total_params=spec.total_params,
        active_params=spec.active_params, has_tokenizer=has_tokenizer, **kv)


# -- moeray.v1.PlacementService -----------------------------------------------------------------------------
def params_from_json(text: str) -> dict | None:
    """A request's ``params_json``: a JSON object of policy parameters, or None when empty."""
    if not text:
        return None
    try:
        params = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"params_json is not valid JSON: {e}") from None
    if not isinstance(params, dict):
        raise InvalidRequest(f"params_json must be a JSON object; got {type(params).__name__}")
    return params


def placement_response(state: dict, health: dict, info: list, routers: list = (),
                       topology: str = "") -> placement_pb2.GetPlacementResponse:
    """From the controller's ``describe`` and ``health``, each worker's info (an exception: a dead worker), each
    router's ``where`` (an exception: one that did not answer, restarting or gone) and the topology."""
    plan, workers = state["plan"], state["topology"]  # the controller's worker topology: slots, nodes
    response = placement_pb2.GetPlacementResponse(
        epoch=plan["epoch"], policy=state["policy"], slots_per_worker=workers["slots_per_worker"],
        redundant_slots=state["redundant"], rebalances=state["rebalances"], target_workers=health["target_workers"],
        live_workers=health["live_workers"], healing_state=health["state"], healing_error=health["error"],
        experts_available=health["serving"], topology=topology)
    for i, r in enumerate(routers):
        if isinstance(r, BaseException):
            response.routers.add(index=i, state=type(r).__name__ or "unreachable")
            continue
        response.routers.add(index=i, node_id=r["node_id"], gpu_ids=r["gpu_ids"], device=r["device"], state="alive",
                             running=r["running"], waiting=r["waiting"])
    for phy2log, slot_worker in zip(plan["phy2log"], plan["slot_worker"]):
        response.layers.add(phy2log=phy2log, slot_worker=slot_worker)
    for i, (w, node) in enumerate(zip(info, workers["worker_node"])):
        if isinstance(w, Exception):  # a dead worker: the controller has placed its experts elsewhere
            response.workers.add(index=i, device="dead", node=node)
            continue
        response.workers.add(index=w["worker"], node_id=w["node_id"], device=w["device"],
                             resident_bytes=w["resident_bytes"], node=node)
    return response


def _ratio(load_W) -> float:
    """max / mean; 1.0 (perfect) with no load."""
    return float(load_W.max() / load_W.mean()) if load_W.sum() else 1.0


def load_response(load: dict, top: list | None, tokenizer) -> placement_pb2.GetLoadResponse:
    """From the controller's ``window_load`` and ``top_tokens`` (per layer, per expert: (token id, count) pairs)."""
    response = placement_pb2.GetLoadResponse(window_steps=load["steps"])
    expected_LW = load["expected_LW"]  # None while the window was counted under another worker count
    gap_L = None if expected_LW is None else routing_gap_L(load["worker_LW"], expected_LW)
    for l, (e_E, w_W, t_E) in enumerate(zip(load["expert_LE"], load["worker_LW"], load["total_LE"])):
        layer = response.layers.add(expert_tokens=e_E.tolist(), worker_tokens=w_W.tolist(), imbalance=_ratio(w_W),
                                    expert_tokens_total=t_E.tolist())
        if expected_LW is not None:
            layer.expected_worker_tokens.extend(expected_LW[l].tolist())
            layer.routing_gap, layer.expected_imbalance = float(gap_L[l]), _ratio(expected_LW[l])
        for tokens in top[l] if top else ():
            ids = [t for t, _ in tokens]
            texts = [tokenizer.decode([t]) for t in ids] if tokenizer is not None else []
            layer.top_tokens.add(token_ids=ids, counts=[c for _, c in tokens], texts=texts)
    return response


def rebalance_response(record: dict) -> placement_pb2.RebalanceResponse:
    response = placement_pb2.RebalanceResponse(
        epoch=record["epoch"], imbalance_before=record["expected_imbalance_before"],
        imbalance_after=record["expected_imbalance_after"], applied=record["applied"],
        moved_slots=record["moved_slots"], moved_bytes=record["moved_bytes"], policy=record["policy"])
    for move in record["moves"]:
        load = move["action"] == "load"
        response.moves.add(layer=move["layer"], expert=move["expert"], from_worker=-1 if load else move["worker"],
                           to_worker=move["worker"] if load else -1)
    return response


def set_policy_response(policy: str) -> placement_pb2.SetPolicyResponse:
    return placement_pb2.SetPolicyResponse(policy=policy)


def scale_response(accepted: dict) -> placement_pb2.ScaleWorkersResponse:
    """A worker count accepted, not yet reached (GetPlacement shows how far it got)."""
    return placement_pb2.ScaleWorkersResponse(workers=accepted["target"], epoch=accepted["epoch"], applied=False)


# -- grpc.health.v1 -----------------------------------------------------------------------------------------
def health_response(serving: bool):
    from grpc_health.v1 import health_pb2

    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    return health_pb2.HealthCheckResponse(status=status)


# -- KServe v2 ----------------------------------------------------------------------------------------------
def server_live() -> kserve_pb2.ServerLiveResponse:
    return _kserve().ServerLiveResponse(live=True)


def server_ready(ready: bool) -> kserve_pb2.ServerReadyResponse:
    return _kserve().ServerReadyResponse(ready=ready)


def model_ready(ready: bool) -> kserve_pb2.ModelReadyResponse:
    return _kserve().ModelReadyResponse(ready=ready)


def server_metadata() -> kserve_pb2.ServerMetadataResponse:
    from moeray import __version__

    return _kserve().ServerMetadataResponse(name="moeray", version=__version__, extensions=[])


def model_metadata(model_name: str, vocab_size: int) -> kserve_pb2.ModelMetadataResponse:
    response = _kserve().ModelMetadataResponse(name=model_name, versions=["1"], platform="moeray")
    response.inputs.add(name="input_ids", datatype="INT64", shape=[-1, -1])
    response.inputs.add(name="attention_mask", datatype="INT64", shape=[-1, -1])
    response.outputs.add(name="logits", datatype="FP32", shape=[-1, -1, vocab_size])
    response.outputs.add(name="last_logits", datatype="FP32", shape=[-1, vocab_size])
    return response


def _int_tensor(request: kserve_pb2.ModelInferRequest, index: int) -> np.ndarray:
    tensor = request.inputs[index]
    if tensor.datatype not in _KSERVE_INTS:
        raise InvalidRequest(f"input '{tensor.name}' has datatype {clip(tensor.datatype)}; expected INT64 (or INT32)")
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) != 2 or min(shape) <= 0:
        raise InvalidRequest(f"input '{tensor.name}' has shape {list(shape)}; expected [batch, tokens], both > 0")
    dtype, field = _KSERVE_INTS[tensor.datatype]
    count = shape[0] * shape[1]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidRequest(f"raw_input_contents has {len(request.raw_input_contents)} entries for "
                                 f"{len(request.inputs)} inputs")
        raw = request.raw_input_contents[index]
        expected = count * np.dtype(dtype).itemsize
        if len(raw) != expected:
            raise InvalidRequest(f"input '{tensor.name}' raw contents hold {len(raw)} bytes; shape {list(shape)} of "
                                 f"{tensor.datatype} needs {expected}")
        values = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    else:
        values = np.asarray(getattr(tensor.contents, field), dtype=dtype)
        if values.size != count:
            raise InvalidRequest(f"input '{tensor.name}' has {values.size} {field}; shape {list(shape)} needs {count}")
    return values.astype(np.int64).reshape(shape)


def kserve_inputs(request: kserve_pb2.ModelInferRequest, vocab_size: int,
                  max_positions: int) -> tuple[np.ndarray, np.ndarray | None]:
    """input_ids [B, T] and the optional attention_mask [B, T] of a ModelInfer request, within the model's limits."""
    names = [t.name for t in request.inputs]
    unknown = [n for n in dict.fromkeys(names) if n not in KSERVE_INPUTS]
    if unknown:
        raise InvalidRequest(f"unknown input {clip(unknown[0])}; expected 'input_ids' and optionally "
                             "'attention_mask'")
    repeated = [n for n, count in collections.Counter(names).items() if count > 1]
    if repeated:
        raise InvalidRequest(f"input '{repeated[0]}' is given {names.count(repeated[0])} times; each input may "
                             "appear once")
    if "input_ids" not in names:
        raise InvalidRequest("input 'input_ids' (INT64 [batch, tokens]) is required")
    ids = _int_tensor(request, names.index("input_ids"))
    if ids.shape[1] > max_positions:
        raise InvalidRequest(f"input_ids has {ids.shape[1]} tokens; the model has {max_positions} positions")
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    mask = None
    if "attention_mask" in names:
        mask = _int_tensor(request, names.index("attention_mask"))
        if mask.shape != ids.shape:
            raise InvalidRequest(f"attention_mask shape {list(mask.shape)} differs from input_ids {list(ids.shape)}")
        if not np.isin(mask, (0, 1)).all() or (mask.sum(axis=1) == 0).any():
            raise InvalidRequest("attention_mask must hold 0 and 1 only, with at least one 1 per row")
    return ids, mask


def kserve_outputs(request: kserve_pb2.ModelInferRequest) -> tuple[str, ...]:
    """The outputs a ModelInfer request asks for, in its order; none named: ``logits`` alone."""
    names = [o.name for o in request.outputs]
    unknown = [n for n in dict.fromkeys(names) if n not in KSERVE_OUTPUTS]
    if unknown:
        raise InvalidRequest(f"unknown output {clip(unknown[0])}; this model has outputs 'logits' (FP32 "
                             "[batch, tokens, vocab]) and 'last_logits' (FP32 [batch, vocab])")
    repeated = [n for n, count in collections.Counter(names).items() if count > 1]
    if repeated:
        raise InvalidRequest(f"output '{repeated[0]}' is requested {names.count(repeated[0])} times; request each "
                             "output once")
    return tuple(names) or ("logits",)


def _output_shapes(outputs, batch: int, tokens: int, vocab: int) -> dict[str, list[int]]:
    return {name: [batch, tokens, vocab] if name == "logits" else [batch, vocab] for name in outputs}


def _response(request, model_name: str, shapes: dict[str, list[int]]) -> kserve_pb2.ModelInferResponse:
    response = _kserve().ModelInferResponse(model_name=model_name, model_version="1", id=request.id)
    for name, shape in shapes.items():
        response.outputs.add(name=name, datatype="FP32", shape=shape)
    return response


def check_response_size(request: kserve_pb2.ModelInferRequest, model_name: str, outputs, batch: int, tokens: int,
                        vocab: int, max_message_bytes: int) -> int:
    """The serialized size of the response (before computing it); ResponseTooLarge over ``max_message_bytes``."""
    shapes = _output_shapes(outputs, batch, tokens, vocab)
    payload = {name: 4 * int(np.prod(shape)) for name, shape in shapes.items()}
    # each raw_output_contents entry: a tag byte, a varint length (<= 10 bytes), the bytes
    size = _response(request, model_name, shapes).ByteSize() + sum(11 + n for n in payload.values())
    if size > max_message_bytes:
        parts = ", ".join(f"{name} {shapes[name]} FP32 is {n} bytes" for name, n in payload.items())
        hint = "; request only 'last_logits', or send fewer tokens" if "logits" in outputs else \
            "; send fewer rows"
        raise ResponseTooLarge(f"the response would be {size} bytes ({parts}), over the server's "
                               f"{max_message_bytes}-byte message limit{hint}")
    return size


def kserve_response(request: kserve_pb2.ModelInferRequest, model_name: str, outputs: tuple[str, ...],
                    scored: np.ndarray, mask_BT: np.ndarray | None) -> kserve_pb2.ModelInferResponse:
    """A ModelInfer response with each output asked for as raw little-endian FP32 bytes, in the order asked.
    ``scored``: the router's logits, [B, T, V], or [B, V] when only ``last_logits`` was asked for (``last_only``)."""
    if "logits" not in outputs:
        arrays = {"last_logits": scored}
    else:
        batch, tokens = scored.shape[:2]
        last = scored[np.arange(batch), last_positions(mask_BT, tokens, batch)]
        arrays = {name: scored if name == "logits" else last for name in outputs}
    arrays = {name: np.ascontiguousarray(a, dtype="<f4") for name, a in arrays.items()}
    response = _response(request, model_name, {name: list(a.shape) for name, a in arrays.items()})
    for a in arrays.values():
        response.raw_output_contents.append(a.tobytes())
    return response


def last_positions(mask_BT: np.ndarray | None, tokens: int, batch: int) -> np.ndarray:
    """Each row's last real position: the last 1 of its attention mask (right or left padding alike)."""
    if mask_BT is None:
        return np.full(batch, tokens - 1)
    return tokens - 1 - np.argmax(mask_BT[:, ::-1], axis=1)

