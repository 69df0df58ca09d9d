"""The public contract: generated stubs match protos/, and KServe v2 keeps the published field numbers."""

import filecmp
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools is not installed")
def test_generated_stubs_are_in_sync(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gen_protos import generate
    finally:
        sys.path.pop(0)
    generate(tmp_path)
    committed = ROOT / "moeray" / "serving" / "gen"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.name != "__pycache__")
    mismatch = [n for n in names if not filecmp.cmp(tmp_path / n, committed / n, shallow=False)]
    assert not mismatch, f"run scripts/gen_protos.py: {mismatch} differ from protos/"


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools is not installed")
def test_kserve_field_numbers_match_the_published_protocol(tmp_path):
    # Read the compiled descriptor rather than importing the stubs: tritonclient (in the serving tests of the same
    # process) registers its own copy of these messages in protobuf's default pool.
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "kserve.pb"
    assert protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"--descriptor_set_out={out}",
                        "inference/grpc_predict_v2.proto"]) == 0
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    messages = {m.name: m for m in file.message_type}
    fields = lambda message: {f.name: f.number for f in message.field}
    nested = lambda message, name: next(n for n in message.nested_type if n.name == name)
    assert fields(messages["ModelInferRequest"]) == {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4,
                                                     "inputs": 5, "outputs": 6, "raw_input_contents": 7}
    assert fields(messages["ModelInferResponse"]) == {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4,
                                                      "outputs": 5, "raw_output_contents": 6}
    assert fields(nested(messages["ModelInferRequest"], "InferInputTensor")) == {
        "name": 1, "datatype": 2, "shape": 3, "parameters": 4, "contents": 5}
    contents = fields(messages["InferTensorContents"])
    assert contents["int64_contents"] == 3 and contents["fp32_contents"] == 6
    assert file.package == "inference"
    (service,) = file.service
    assert service.name == "GRPCInferenceService"
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"} <= \
        {m.name for m in service.method}
