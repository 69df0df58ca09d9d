"""Proto <-> engine types: the only place besides the ingress that touches generated ``*_pb2`` messages.

Every decoding error is an ``InvalidRequest`` naming the field, the value and the limit.
"""

from __future__ import annotations

import numpy as np

from moeray.request import InvalidRequest, SamplingParams
from moeray.serving.gen import generate_pb2, grpc_predict_v2_pb2 as kserve_pb2

FINISH_REASONS = {
    "stop": generate_pb2.FINISH_REASON_STOP,
    "length": generate_pb2.FINISH_REASON_LENGTH,
    "abort": generate_pb2.FINISH_REASON_ABORT,
}
# KServe v2 datatype -> (numpy dtype, InferTensorContents field)
_KSERVE_INTS = {"INT64": (np.int64, "int64_contents"), "INT32": (np.int32, "int_contents")}


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
        raise InvalidRequest(f"input '{tensor.name}' has datatype {tensor.datatype!r}; expected INT64 (or INT32)")
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
    unknown = sorted(set(names) - {"input_ids", "attention_mask"})
    if unknown:
        raise InvalidRequest(f"unknown inputs {unknown}; expected 'input_ids' and optionally 'attention_mask'")
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


def kserve_logits_response(request: kserve_pb2.ModelInferRequest, model_name: str,
                           logits_BTV: np.ndarray) -> kserve_pb2.ModelInferResponse:
    logits = np.ascontiguousarray(logits_BTV, dtype="<f4")
    response = kserve_pb2.ModelInferResponse(model_name=model_name, model_version="1", id=request.id)
    response.outputs.add(name="logits", datatype="FP32", shape=list(logits.shape))
    response.raw_output_contents.append(logits.tobytes())
    return response
