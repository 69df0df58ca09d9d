"""Proto <-> engine types: the only place besides the ingress that touches generated ``*_pb2`` messages.

Every decoding error is an ``InvalidRequest`` naming the field, the value and the limit.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import numpy as np

from moeray.request import InvalidRequest, SamplingParams
from moeray.serving.errors import ResponseTooLarge, clip
from moeray.serving.gen import generate_pb2

if TYPE_CHECKING:
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
    )


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


def kserve_inputs(request: kserve_pb2.ModelInferRequest) -> tuple[np.ndarray, np.ndarray | None]:
    """input_ids [B, T] and the optional attention_mask [B, T] of a ModelInfer request."""
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


def kserve_response(request: kserve_pb2.ModelInferRequest, model_name: str,
                    arrays: dict[str, np.ndarray]) -> kserve_pb2.ModelInferResponse:
    """A ModelInfer response with each named FP32 output as raw little-endian bytes, in the order given."""
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

