"""The wire format every transport path shares: tensors of every dtype a worker sends or receives come back bit for
bit, and a worker call carries the dtypes the worker reads."""

import pickle

import numpy as np
import pytest
import torch

from moeray.transport import TRANSPORTS, make_transport
from moeray.transport.wire import WireTensor, WorkerCall, pack, pairs_on, unpack


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
                                   torch.float8_e8m0fnu, torch.int64])
def test_pack_unpack_keeps_every_bit(dtype):
    t = (torch.randn(33, 5) * 4).to(dtype)
    wire = pickle.loads(pickle.dumps(pack(t[:, 1:4])))  # a strided view; through a pickle, as Ray sends it
    assert isinstance(wire, WireTensor) and isinstance(wire.array, np.ndarray)
    assert wire.dtype == str(dtype).removeprefix("torch.")
    back = unpack(wire)
    assert back.dtype == dtype and back.shape == (33, 3)
    bits = torch.int16 if dtype.itemsize == 2 else torch.uint8 if dtype.itemsize == 1 else dtype
    assert torch.equal(back.view(bits), t[:, 1:4].contiguous().view(bits))


def test_a_worker_call_carries_int32_indices_and_float32_weights():
    call = WorkerCall.of(3, 1, torch.randn(4, 8, dtype=torch.bfloat16), torch.tensor([0, 1, 1, 3]),
                         torch.tensor([2, 0, 1, 2]), torch.tensor([0.5, 0.25, 0.75, 1.0], dtype=torch.float64))
    call = pickle.loads(pickle.dumps(call))
    assert (call.epoch, call.layer, call.x_TH.dtype) == (3, 1, "bfloat16")
    assert [a.dtype for a in call[3:]] == [np.int32, np.int32, np.float32]
    token_N, slot_N, weight_N = pairs_on(torch.device("cpu"), *call[3:])
    assert token_N.dtype == slot_N.dtype == torch.long and weight_N.dtype == torch.float32
    assert token_N.tolist() == [0, 1, 1, 3] and weight_N.tolist() == [0.5, 0.25, 0.75, 1.0]


@pytest.mark.ray  # the object-store transport's module imports Ray
def test_make_transport_makes_the_object_store_path():
    assert make_transport("object_store", ["w0"]).workers == ["w0"]


def test_make_transport_names_the_choices():
    assert TRANSPORTS[:2] == ("object_store", "compiled_graph") and "direct" in TRANSPORTS
    assert make_transport("direct", ["w0"]).workers == ["w0"]
    with pytest.raises(ValueError, match=r"transport 'nccl' is not one of \('object_store', 'compiled_graph', "):
        make_transport("nccl", [])
