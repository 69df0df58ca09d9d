"""The TCP transport's message layout (moeray/transport/frames.py): what it carries arrives bit for bit, and any
bytes at all are either a message it allows or a clean refusal."""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeray.transport import frames
from moeray.transport.frames import FrameError
from moeray.transport.wire import WireTensor, WorkerCall, pack, unpack

LIMIT = 64 * 2**20


def _through(messages: list[list[memoryview]], max_bytes: int = LIMIT) -> list:
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=lambda: [frames.send_all(a, m) for m in messages])
        sender.start()
        got = [frames.recv(b, max_bytes) for _ in messages]
        sender.join()
    return got


def test_calls_results_and_errors_arrive_bit_for_bit():
    rng = np.random.default_rng(0)
    big = rng.standard_normal((1024, 1024)).astype(np.float32)  # 4 MiB: many partial sends
    call = WorkerCall.of(7, 3, torch.randn(5, 33, dtype=torch.bfloat16), torch.arange(9) % 5, torch.arange(9) % 4,
                         torch.rand(9))
    got = _through([frames.encode_call(call), frames.encode(frames.RESULT, 7, 3, [WireTensor(big, "float32")]),
                    frames.encode(frames.RESULT, 1, 2, [pack(torch.zeros(0, 4, dtype=torch.float16))]),
                    frames.encode_error("ValueError: no layer 99 – ünïcode")])
    kind, epoch, layer, arrays = got[0]
    back = frames.call_of(epoch, layer, arrays)
    assert (kind, back.epoch, back.layer) == (frames.CALL, 7, 3)
    assert torch.equal(unpack(back.x_TH), unpack(call.x_TH)) and back.x_TH.dtype == "bfloat16"
    for name in ("pair_token_N", "pair_slot_N", "pair_weight_N"):
        assert np.array_equal(getattr(back, name), getattr(call, name))
        assert getattr(back, name).dtype == getattr(call, name).dtype
    assert got[1][0] == frames.RESULT and np.array_equal(got[1][3][0].array, big)
    assert got[2][3][0].array.shape == (0, 4) and got[2][3][0].dtype == "float16"
    assert got[3][0] == frames.ERROR and frames.error_text(got[3][3]) == "ValueError: no layer 99 – ünïcode"


def test_arrays_travel_from_their_own_memory():
    x = np.ones((256, 1024), np.float32)
    pieces = frames.encode(frames.RESULT, 0, 0, [WireTensor(x, "float32")])
    assert pieces[1].nbytes == x.nbytes and pieces[1].obj is not None and pieces[0].nbytes < 64


def _heads(kind, count, arrays) -> tuple[bytes, bytes]:
    return (struct.pack("!BBQI", kind, count, 0, 0),
            b"".join(struct.pack("!BBQQ", code, ndim, d0, d1) for code, ndim, d0, d1 in arrays))


@pytest.mark.parametrize("kind, count, arrays, match", [
    (9, 1, [(1, 2, 1, 1)], "kind 9 with 1 arrays"),
    (frames.RESULT, 2, [(1, 2, 1, 1)] * 2, "kind 2 with 2 arrays"),
    (frames.RESULT, 1, [(42, 2, 1, 1)], "dtype code 42"),
    (frames.RESULT, 1, [(1, 3, 1, 1)], "with 3 dims"),
    (frames.RESULT, 1, [(1, 1, 4, 5)], "with 1 dims"),  # a dim past ndim that is not 1
    (frames.RESULT, 1, [(1, 2, 2**62, 2**62)], "over 67108864 bytes"),  # huge: refused before any allocation
    (frames.CALL, 4, [(1, 2, 2, 4), (4, 1, 3, 1), (4, 1, 2, 1), (1, 1, 3, 1)], "one length"),
    (frames.CALL, 4, [(1, 1, 8, 1), (4, 1, 3, 1), (4, 1, 3, 1), (1, 1, 3, 1)], "x_TH 2-D"),
    (frames.CALL, 4, [(1, 2, 2, 4), (1, 1, 3, 1), (4, 1, 3, 1), (1, 1, 3, 1)], "int32, int32 and float32"),
    (frames.ERROR, 1, [(1, 1, 3, 1)], "one uint8 array"),
])
def test_heads_outside_the_layout_are_refused_naming_why(kind, count, arrays, match):
    with pytest.raises(FrameError, match=match):
        frames.parse_heads(*_heads(kind, count, arrays), LIMIT)


def test_a_huge_declared_message_reads_no_further_than_its_heads():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"".join(_heads(frames.RESULT, 1, [(1, 2, 2**40, 8)])))
        with pytest.raises(FrameError, match="over 67108864 bytes"):
            frames.recv(b, LIMIT)
        a.sendall(struct.pack("!BBQI", frames.CALL, 200, 0, 0))
        with pytest.raises(FrameError, match="a message of 200 arrays"):
            frames.recv(b, LIMIT)


def test_a_closed_peer_is_a_connection_error():
    a, b = socket.socketpair()
    a.close()
    with b, pytest.raises(ConnectionError, match="closed"):
        frames.recv(b, LIMIT)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_are_a_message_or_a_clean_refusal(data):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        b.settimeout(5)
        try:
            kind, _, _, arrays = frames.recv(b, LIMIT)
        except (FrameError, ConnectionError):
            return
        assert kind in frames.KINDS and len(arrays) == frames.KINDS[kind]
        assert sum(w.array.nbytes for w in arrays) <= len(data)
