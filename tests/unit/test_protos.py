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


def test_kserve_field_numbers_match_the_published_protocol():
    from moeray.serving.gen import grpc_predict_v2_pb2 as pb

    fields = lambda message: {f.name: f.number for f in message.DESCRIPTOR.fields}
    assert fields(pb.ModelInferRequest) == {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4,
                                            "inputs": 5, "outputs": 6, "raw_input_contents": 7}
    assert fields(pb.ModelInferResponse) == {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4,
                                             "outputs": 5, "raw_output_contents": 6}
    assert fields(pb.ModelInferRequest.InferInputTensor) == {"name": 1, "datatype": 2, "shape": 3, "parameters": 4,
                                                             "contents": 5}
    assert fields(pb.InferTensorContents)["int64_contents"] == 3 and fields(pb.InferTensorContents)["fp32_contents"] == 6
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert pb.DESCRIPTOR.package == "inference"
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"} <= \
        set(service.methods_by_name)
