"""The bad-input catalogue against a real server (Serve's gRPC proxy on 127.0.0.1, admission 2 running + 2 queued):
every case answers its status code with one clean line (no traceback, pid, IP or path), and the next normal
request is still correct. Then duplicate ids in flight, exact admission, last_logits, and a fuzz of both APIs.

KServe messages come from tritonclient's own stubs (same wire format): ours cannot share protobuf's default pool
with tritonclient's, which tests/serving/test_grpc.py loads in the same pytest process.
"""

import re
import threading

import grpc
import numpy as np
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve
from tritonclient.grpc import service_pb2 as kserve_pb2, service_pb2_grpc as kserve_pb2_grpc

from conftest import PROMPTS, Oracle, _ray_start, assert_logits_close
from moeray.serving.ports import free_port
from moeray import Engine, EngineConfig
from moeray.model.tiny import ARCHITECTURES, save_tiny_checkpoint
from moeray.serving.app import start_serving
from moeray.serving.serve_env import set_serving_env
from moeray.serving.gen import generate_pb2, generate_pb2_grpc

pytestmark = pytest.mark.ray
C = grpc.StatusCode
MAX_MESSAGE_BYTES = 2**20
POSITIONS = 8192  # long streams hold their admission slots for as long as a test needs (they are cancelled)
CAP = 8000  # max_new_tokens cap
LONG = 7000
APP = "moeray"



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import os

    path = str(save_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("long") / "mixtral-long",
                                    seed=ARCHITECTURES.index("mixtral"), max_position_embeddings=POSITIONS))
    set_serving_env(MAX_MESSAGE_BYTES)  # as `moeray serve --max-message-bytes` does
    try:
        with _ray_start():
            engine = Engine(EngineConfig(model=path, workers=2, routers=2, max_new_tokens_cap=CAP))
            port = free_port()
            model = start_serving(engine, grpc_port=port, http_port=free_port(), app_name=APP,
                                  max_ongoing_requests=2, max_queued_requests=2)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            grpc.channel_ready_future(channel).result(timeout=60)
            oracle = Oracle(path)
            yield {"channel": channel, "model": model, "engine": engine, "oracle": oracle,
                   "expected": oracle.greedy(PROMPTS[0], 4),
                   "generate": generate_pb2_grpc.GenerateServiceStub(channel),
                   "kserve": kserve_pb2_grpc.GRPCInferenceServiceStub(channel)}
            channel.close()
            serve.shutdown()
            engine.shutdown()
    finally:
        os.environ.pop("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", None)
        set_serving_env()  # the default limits again


# -- helpers -----------------------------------------------------------------------------------------------
_LEAKS = [re.compile(p) for p in (r"Traceback", r"\bpid\b", r"\b\d{1,3}(\.\d{1,3}){3}\b", r"(/[\w.-]+){2,}",
                                  r"\.py\b", r"actor_?id", r"\x1b\[", r"ray::")]


def assert_clean(details: str) -> None:
    assert details and "\n" not in details and len(details) <= 1024, details
    for leak in _LEAKS:
        assert not leak.search(details), (leak.pattern, details)


def _request(prompt=(5, 6, 7), request_id="", max_new_tokens=4, **sampling):
    request = generate_pb2.GenerateRequest(request_id=request_id,
                                           sampling=generate_pb2.SamplingParams(max_new_tokens=max_new_tokens,
                                                                                **sampling))
    if prompt is not None:
        request.prompt_ids.ids.extend(prompt)  # sets the oneof even when empty
    return request


def _generate(server, request, **kw) -> list[int]:
    return [t for c in server["generate"].Generate(request, timeout=30, **kw) for t in c.token_ids]


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def _infer_request(server, ids=((1, 2, 3),), outputs=("logits",), inputs=("input_ids",), model=None, **kw):
    request = kserve_pb2.ModelInferRequest(model_name=server["model"] if model is None else model, **kw)
    ids = np.asarray(ids, dtype=np.int64)
    for name in inputs:
        request.inputs.add(name=name, datatype="INT64", shape=list(ids.shape))
        request.raw_input_contents.append(ids.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def _scores(server) -> int:
    return sum(ray.get(r.stats.remote())["scores"] for r in server["engine"].routers)


def _admission(server) -> dict:
    return serve.get_app_handle(APP).admission_stats.remote().result(timeout_s=30)


def _still_correct(server) -> None:
    assert _generate(server, _request(PROMPTS[0])) == server["expected"]


# -- the catalogue -----------------------------------------------------------------------------------------
GENERATE_CASES = {
    "temperature inf": (_request(temperature=float("inf")), C.INVALID_ARGUMENT, "temperature must be 0 (greedy) or"
                                                                               " a finite number >= 1e-05; got inf"),
    "temperature nan": (_request(temperature=float("nan")), C.INVALID_ARGUMENT, "got nan"),
    "temperature denormal": (_request(temperature=1e-40), C.INVALID_ARGUMENT, "temperature must be 0 (greedy)"),
    "top_p above 1": (_request(temperature=1.0, top_p=1.5), C.INVALID_ARGUMENT, "top_p must lie in (0, 1]; got 1.5"),
    "top_p negative": (_request(temperature=1.0, top_p=-0.5), C.INVALID_ARGUMENT, "top_p must lie in (0, 1]"),
    "max_new_tokens 0": (_request(max_new_tokens=0), C.INVALID_ARGUMENT, "max_new_tokens must be a positive integer;"
                                                                         " got 0"),
    "max_new_tokens above cap": (_request(max_new_tokens=CAP + 1), C.INVALID_ARGUMENT,
                                 f"max_new_tokens {CAP + 1} is above the cap {CAP}"),
    "token outside vocab": (_request(prompt=[1, 10**6]), C.INVALID_ARGUMENT, "token id 1000000 is outside the "
                                                                             "vocabulary [0, 131)"),
    "negative token": (_request(prompt=[-1]), C.INVALID_ARGUMENT, "token id -1 is outside"),
    "stop token outside vocab": (_request(stop_token_ids=[131]), C.INVALID_ARGUMENT, "stop token id 131"),
    "empty prompt": (_request(prompt=[]), C.INVALID_ARGUMENT, "prompt is empty; it needs at least 1 token"),
    "no prompt": (_request(prompt=None), C.INVALID_ARGUMENT, "prompt is empty: set prompt_ids or prompt_text"),
    "prompt_text without tokenizer": (generate_pb2.GenerateRequest(
        prompt_text="hi", sampling=generate_pb2.SamplingParams(max_new_tokens=4)), C.INVALID_ARGUMENT,
                                      "prompt_text needs a checkpoint with a tokenizer"),
    "1 MB request_id": (_request(request_id="r" * 10**6), C.INVALID_ARGUMENT,
                        "request_id must be 1 to 128 printable ASCII characters; got 1000000 characters"),
    "request_id with a newline": (_request(request_id="a\nb"), C.INVALID_ARGUMENT, "character 1 is '\\n'"),
    "request_id not ASCII": (_request(request_id="caf\u00e9"), C.INVALID_ARGUMENT, "character 3 is '\\xe9'"),
}


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_generate_bad_input(server, case):
    request, code, message = GENERATE_CASES[case]
    err = _error(lambda: _generate(server, request))
    assert err.code() == code and message in err.details(), err.details()
    assert_clean(err.details())
    _still_correct(server)


KSERVE_CASES = {
    "unknown output": (dict(outputs=("probs",)), C.INVALID_ARGUMENT, "unknown output 'probs'; this model has "
                                                                     "outputs 'logits'"),
    "duplicate output": (dict(outputs=("logits", "logits")), C.INVALID_ARGUMENT, "output 'logits' is requested 2 "
                                                                                 "times"),
    "duplicate input": (dict(inputs=("input_ids", "input_ids")), C.INVALID_ARGUMENT,
                        "input 'input_ids' is given 2 times; each input may appear once"),
    "unknown input": (dict(inputs=("input_ids", "x" * 10**5)), C.INVALID_ARGUMENT, "unknown input 'xxxx"),
    "token outside vocab": (dict(ids=[[1, 500]]), C.INVALID_ARGUMENT, "token id 500 is outside the vocabulary"),
    "1 MB id": (dict(id="i" * 10**6), C.INVALID_ARGUMENT, "id must be 1 to 128 printable ASCII characters"),
    "unknown model": (dict(model="nope"), C.NOT_FOUND, "model 'nope' is not served here; this server serves "
                                                       "'mixtral-long'"),
    "huge unknown model name": (dict(model="m" * 10**5), C.NOT_FOUND, "(100000 characters) is not served here"),
}


@pytest.mark.parametrize("case", KSERVE_CASES)
def test_model_infer_bad_input(server, case):
    kwargs, code, message = KSERVE_CASES[case]
    err = _error(lambda: server["kserve"].ModelInfer(_infer_request(server, **kwargs), timeout=30))
    assert err.code() == code and message in err.details(), err.details()
    assert_clean(err.details())
    _still_correct(server)


def test_model_metadata_unknown_model_and_last_logits_advertised(server):
    err = _error(lambda: server["kserve"].ModelMetadata(kserve_pb2.ModelMetadataRequest(name="nope"), timeout=30))
    assert err.code() == C.NOT_FOUND and "model 'nope' is not served here" in err.details()
    meta = server["kserve"].ModelMetadata(kserve_pb2.ModelMetadataRequest(name=server["model"]), timeout=30)
    assert {o.name: list(o.shape) for o in meta.outputs} == {"logits": [-1, -1, 131], "last_logits": [-1, 131]}


def test_an_oversized_response_is_refused_before_any_compute(server):
    ids = np.ones((1, 2100), dtype=np.int64)  # 2100 x 131 x 4 bytes of logits: over 1 MiB; the request is 17 kB
    before = _scores(server)
    err = _error(lambda: server["kserve"].ModelInfer(_infer_request(server, ids=ids), timeout=30))
    assert err.code() == C.RESOURCE_EXHAUSTED, err.details()
    assert f"over the server's {MAX_MESSAGE_BYTES}-byte message limit; request only 'last_logits'" in err.details()
    assert "logits [1, 2100, 131] FP32 is 1100400 bytes" in err.details()
    assert_clean(err.details())
    assert _scores(server) == before, "nothing was computed"
    # the same input, asking for the last position only: computed, and small
    result = server["kserve"].ModelInfer(_infer_request(server, ids=ids, outputs=("last_logits",)), timeout=60)
    assert [o.name for o in result.outputs] == ["last_logits"] and list(result.outputs[0].shape) == [1, 131]
    assert _scores(server) == before + 1


def test_last_logits_follow_each_rows_attention_mask(server):
    oracle = server["oracle"]
    a, b = PROMPTS[1], PROMPTS[3]
    ids = np.zeros((2, len(a)), dtype=np.int64)
    mask = np.zeros_like(ids)
    ids[0], mask[0] = a, 1
    ids[1, : len(b)], mask[1, : len(b)] = b, 1  # right padded: its last real position is len(b) - 1
    request = _infer_request(server, ids=ids, outputs=("last_logits", "logits"))
    request.inputs.add(name="attention_mask", datatype="INT64", shape=list(mask.shape))
    request.raw_input_contents.append(mask.tobytes())
    result = server["kserve"].ModelInfer(request, timeout=60)
    out = {o.name: np.frombuffer(raw, "<f4").reshape(o.shape) for o, raw in zip(result.outputs,
                                                                                  result.raw_output_contents)}
    assert list(out) == ["last_logits", "logits"]
    assert_logits_close(out["last_logits"][0], oracle.logits(a)[-1])
    assert_logits_close(out["last_logits"][1], oracle.logits(b)[-1])
    assert np.array_equal(out["last_logits"][1], out["logits"][1, len(b) - 1])


@pytest.mark.parametrize("method,payload", [
    ("/moeray.v1.GenerateService/Generate", b"\xff\xff\xff"),
    ("/moeray.v1.GenerateService/Generate", b"\x0a\x02\xff\xfe"),  # request_id: invalid UTF-8
    ("/moeray.v1.GenerateService/Abort", b"\x0a\x80"),  # truncated
    ("/inference.GRPCInferenceService/ModelInfer", b"\x2a\xff\xff\xff\xff\x0f"),
    ("/inference.GRPCInferenceService/ModelMetadata", b"\xff"),
    ("/moeray.v1.PlacementService/Rebalance", b"\x00"),
    ("/grpc.health.v1.Health/Check", b"\x0a\x01"),
])
def test_malformed_protobuf_is_invalid_argument(server, method, payload):
    stream = method.endswith("/Generate")
    factory = server["channel"].unary_stream if stream else server["channel"].unary_unary
    call = factory(method, request_serializer=None, response_deserializer=None)
    err = _error(lambda: list(call(payload, timeout=30)) if stream else call(payload, timeout=30))
    assert err.code() == C.INVALID_ARGUMENT, (err.code(), err.details())
    assert f"the request ({len(payload)} bytes) does not decode as a" in err.details()
    assert_clean(err.details())
    _still_correct(server)


# -- request ids in flight -----------------------------------------------------------------------------------
def _long(request_id=""):
    return _request(PROMPTS[0], request_id=request_id, max_new_tokens=LONG, ignore_eos=True)


def test_a_request_id_in_flight_is_refused_already_exists(server):
    stub = server["generate"]
    first = stub.Generate(_long("dup-1"), timeout=120)
    assert next(first).request_id == "dup-1"  # running
    err = _error(lambda: _generate(server, _request(request_id="dup-1")))
    assert err.code() == C.ALREADY_EXISTS and "request_id 'dup-1' is already in flight" in err.details()
    assert_clean(err.details())
    assert stub.Abort(generate_pb2.AbortRequest(request_id="dup-1"), timeout=30).aborted
    assert list(first)[-1].finish_reason == generate_pb2.FINISH_REASON_ABORT
    assert _generate(server, _request(PROMPTS[0], request_id="dup-1")) == server["expected"]  # free again
    assert not stub.Abort(generate_pb2.AbortRequest(request_id="x" * 10**5), timeout=30).aborted


def test_server_chosen_request_ids_are_random(server):
    ids = {next(iter(server["generate"].Generate(_request(max_new_tokens=1), timeout=30))).request_id
           for _ in range(3)}
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


# -- admission -----------------------------------------------------------------------------------------------
def test_admission_is_exact(server):
    """max_ongoing 2 + max_queued 2: four long streams are all admitted (two run, two wait), the fifth request
    (Generate or ModelInfer) is refused at once; once they are gone, new requests are admitted again."""
    from ray._private.test_utils import wait_for_condition

    stub = server["generate"]
    calls = [stub.Generate(_long(f"adm-{i}"), timeout=120) for i in range(4)]
    try:
        wait_for_condition(lambda: _admission(server)["admitted"] == 4, timeout=60)
        assert _admission(server) | {"max_ongoing": 2, "max_queued": 2} == {
            "running": 2, "waiting": 2, "admitted": 4, "max_ongoing": 2, "max_queued": 2}
        err = _error(lambda: _generate(server, _request()))
        assert err.code() == C.RESOURCE_EXHAUSTED, err.details()
        assert "2 requests running (max 2) and 2 waiting (max 2)" in err.details()
        assert_clean(err.details())
        err = _error(lambda: server["kserve"].ModelInfer(_infer_request(server), timeout=30))
        assert err.code() == C.RESOURCE_EXHAUSTED
        assert server["kserve"].ModelMetadata(kserve_pb2.ModelMetadataRequest(name=server["model"]), timeout=30), \
            "metadata is not admission-controlled"
        assert all(not c.done() for c in calls), "none of the four was refused"
    finally:
        for call in calls:
            call.cancel()
    wait_for_condition(lambda: _admission(server)["admitted"] == 0, timeout=60)
    results = [None] * 4

    def run(i):
        results[i] = _generate(server, _request(PROMPTS[0]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [server["expected"]] * 4  # 4 at once: 2 run, 2 wait, none refused


# -- fuzz ----------------------------------------------------------------------------------------------------
# A valid request, then up to two faults, each setting one field to anything (often invalid, never a valid value
# that would run long): every check meets both clean and combined faults, and some requests run for real.
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=128)
_int64 = st.integers(-(2**63), 2**63 - 1)
_float32 = st.floats(width=32)
_vocab_ids = st.lists(st.integers(0, 130), min_size=1, max_size=8)


def _set(field, strategy, message="sampling"):
    def fault(draw, request):
        setattr(getattr(request, message) if message else request, field, draw(strategy))
    return fault


def _prompt_ids(draw, request):
    request.prompt_ids.ClearField("ids")
    request.prompt_ids.ids.extend(draw(st.lists(st.one_of(st.integers(0, 140), _int64), max_size=8)))


GENERATE_FAULTS = {
    "request_id": _set("request_id", st.one_of(_text, _text.map(lambda t: "r" * 129 + t)), None),
    "prompt_ids": _prompt_ids,
    "prompt_text": _set("prompt_text", _text, None),
    "no prompt": lambda draw, request: request.ClearField("prompt"),
    "max_new_tokens": _set("max_new_tokens", st.one_of(st.just(0), st.integers(CAP + 1, 2**32 - 1))),
    "temperature": _set("temperature", _float32),
    "top_p": _set("top_p", _float32),
    "top_k": _set("top_k", st.integers(0, 2**32 - 1)),
    "stop_token_ids": lambda draw, request: request.sampling.stop_token_ids.extend(draw(st.lists(_int64,
                                                                                                  max_size=3))),
}


@st.composite
def generate_requests(draw):
    sampling = generate_pb2.SamplingParams(
        max_new_tokens=draw(st.integers(1, 4)), temperature=draw(st.one_of(st.just(0.0), st.floats(0.01, 10))),
        top_p=draw(st.one_of(st.just(0.0), st.floats(0.01, 1))), top_k=draw(st.integers(0, 200)),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**64 - 1))), ignore_eos=draw(st.booleans()),
        stop_token_ids=draw(st.lists(st.integers(0, 130), max_size=3)))
    request = generate_pb2.GenerateRequest(request_id=draw(st.one_of(st.just(""), _printable)), sampling=sampling)
    request.prompt_ids.ids.extend(draw(_vocab_ids))
    for fault in draw(st.lists(st.sampled_from(sorted(GENERATE_FAULTS)), max_size=2)):
        GENERATE_FAULTS[fault](draw, request)
    return request


def _random_tensor(draw, request):
    values = draw(st.one_of(st.binary(max_size=96), st.lists(st.one_of(st.integers(0, 140), _int64), max_size=12)))
    tensor = request.inputs.add(name=draw(st.sampled_from(["input_ids", "attention_mask", "x", ""])),
                                datatype=draw(st.sampled_from(["INT64", "INT32", "FP32", "BYTES", ""])),
                                shape=draw(st.lists(st.one_of(st.integers(-1, 4), st.just(2**40)), max_size=3)))
    if draw(st.booleans()):
        request.raw_input_contents.append(values if isinstance(values, bytes) else
                                          np.asarray(values, dtype=np.int64).tobytes())
    elif not isinstance(values, bytes):
        tensor.contents.int64_contents.extend(values)


def _input_values(draw, request):
    values = draw(st.lists(st.one_of(st.integers(0, 140), _int64), max_size=12))
    tensor = request.inputs[0]
    tensor.contents.ClearField("int64_contents")
    tensor.contents.int64_contents.extend(values)
    if request.raw_input_contents:
        request.raw_input_contents[0] = np.asarray(values, dtype=np.int64).tobytes()


def _long_input(draw, request):  # over the message limit as logits, not as last_logits
    tokens = draw(st.integers(1000, 3000))
    del request.inputs[:]
    request.ClearField("raw_input_contents")
    request.inputs.add(name="input_ids", datatype="INT64", shape=[1, tokens])
    request.raw_input_contents.append(np.ones(tokens, dtype=np.int64).tobytes())


KSERVE_FAULTS = {
    "model_name": _set("model_name", st.one_of(st.sampled_from(["", "x", "mixtral"]), _text), None),
    "id": _set("id", st.one_of(_text, _text.map(lambda t: "i" * 129 + t)), None),
    "extra tensor": _random_tensor,
    "input values": _input_values,
    "input shape": lambda draw, request: request.inputs[0].shape.extend(draw(st.lists(st.integers(-1, 3),
                                                                                       max_size=2))),
    "input datatype": _set("datatype", st.one_of(st.sampled_from(["INT32", "FP32", "BYTES", ""]), _text), None),
    "outputs": lambda draw, request: [request.outputs.add(name=n) for n in draw(
        st.lists(st.sampled_from(["logits", "last_logits", "probs", ""]), min_size=1, max_size=3))],
    "raw count": lambda draw, request: request.raw_input_contents.append(draw(st.binary(max_size=16))),
    "long input": _long_input,
}


@st.composite
def infer_requests(draw):
    request = kserve_pb2.ModelInferRequest(model_name="mixtral-long", id=draw(st.one_of(st.just(""), _printable)))
    batch, tokens = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    ids = np.asarray(draw(st.lists(st.integers(0, 130), min_size=batch * tokens, max_size=batch * tokens)))
    inputs = {"input_ids": ids.reshape(batch, tokens)}
    if draw(st.booleans()):  # any 0/1 pattern with a 1 in every row
        mask = np.asarray(draw(st.lists(st.integers(0, 1), min_size=batch * tokens, max_size=batch * tokens)))
        mask = mask.reshape(batch, tokens)
        mask[np.arange(batch), draw(st.lists(st.integers(0, tokens - 1), min_size=batch, max_size=batch))] = 1
        inputs["attention_mask"] = mask
    raw = draw(st.booleans())
    for name, array in inputs.items():
        tensor = request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
        if raw:
            request.raw_input_contents.append(array.astype(np.int64).tobytes())
        else:
            tensor.contents.int64_contents.extend(array.reshape(-1).tolist())
    for name in draw(st.lists(st.sampled_from(["logits", "last_logits"]), unique=True)):
        request.outputs.add(name=name)
    for fault in draw(st.lists(st.sampled_from(sorted(KSERVE_FAULTS)), max_size=2)):
        target = request.inputs[0] if fault == "input datatype" else request
        KSERVE_FAULTS[fault](draw, target)
    return request


def _check_answer(call) -> None:
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() not in (C.INTERNAL, C.UNKNOWN, C.DEADLINE_EXCEEDED), (e.code(), e.details())
        assert_clean(e.details())


_FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@_FUZZ
@given(request=generate_requests())
def test_fuzz_generate_never_internal_or_hanging(server, request):
    _check_answer(lambda: list(server["generate"].Generate(request, timeout=30)))


@_FUZZ
@given(request=infer_requests())
def test_fuzz_model_infer_never_internal_or_hanging(server, request):
    _check_answer(lambda: server["kserve"].ModelInfer(request, timeout=30))
