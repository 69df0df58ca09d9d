"""The bytes of a layer's messages on a socket: a fixed binary layout, parsed with bounds checks, never unpickled.

    message = head, then each array's head, then each array's bytes
    head    = kind (u8) · array count (u8) · epoch (u64) · layer (u32)            network byte order
    array   = dtype code (u8) · ndim (u8) · dims (2 x u64; unused ones 1)

    CALL    router → worker: x_TH, pair_token_N (int32), pair_slot_N (int32), pair_weight_N (float32)
    RESULT  worker → router: y_TH
    ERROR   worker → router: the message, utf-8 bytes (uint8)

What is refused (``FrameError``, and the connection is closed): a kind outside ``KINDS``, an array count or a dtype
code that kind does not take, more than two dims, a call whose pair arrays differ in length or whose x_TH is not two
dimensional, and any message whose arrays would exceed the reader's ``max_bytes``, checked before a byte of them is
allocated. The array bytes travel from their own memory (one ``sendmsg``) and are read into fresh buffers.

The limits come from the model: a worker takes calls of at most ``call_limit`` bytes (the engine's largest forward,
``max_forward_tokens``, of hidden-size rows and top-k pairs each), and a router reads an answer of at most
``result_limit`` for the call it sent.
"""

from __future__ import annotations

import socket
import struct

import numpy as np

from moeray.transport.wire import WireTensor, WorkerCall

CALL, RESULT, ERROR = 1, 2, 3
KINDS = {CALL: 4, RESULT: 1, ERROR: 1}  # kind -> its array count
_HEAD = struct.Struct("!BBQI")
_ARRAY = struct.Struct("!BBQQ")
MAX_DIMS = 2

# dtype code -> (the wire dtype name, the numpy dtype its bytes are read as): the allow-list
DTYPES = {1: ("float32", np.float32), 2: ("bfloat16", np.int16), 3: ("float16", np.int16), 4: ("int32", np.int32),
          5: ("uint8", np.uint8)}
_CODES = {name: code for code, (name, _) in DTYPES.items()}
_ITEMSIZE = {code: np.dtype(np_dtype).itemsize for code, (_, np_dtype) in DTYPES.items()}
_WIDEST = max(_ITEMSIZE.values())  # x_TH's dtype is the engine's: bound it by the widest the list allows
_PAIR_BYTES = 4 + 4 + 4  # token, slot, weight
MAX_ERROR_BYTES = 64 * 1024  # a worker's error message is clipped to this


def call_limit(hidden_size: int, top_k: int, max_tokens: int) -> int:
    """The most array bytes a call may carry to a worker of this model: ``max_tokens`` rows of x_TH and at most
    top-k pairs for each (a worker sees each token once, with its pairs on that worker)."""
    return max_tokens * (hidden_size * _WIDEST + top_k * _PAIR_BYTES)


def result_limit(call: WorkerCall) -> int:
    """The most array bytes the answer to ``call`` may carry: y_TH has its x_TH's rows, or an error message."""
    rows, hidden = call.x_TH.array.shape
    return max(rows * hidden * _WIDEST, MAX_ERROR_BYTES)


class FrameError(ValueError):
    """Bytes that are not a message this side takes: the connection they came on is closed."""


def encode(kind: int, epoch: int, layer: int, arrays: list[WireTensor]) -> list[memoryview]:
    """A message as the pieces one ``sendmsg`` writes: the heads, then each array's memory, uncopied."""
    heads, bodies = [_HEAD.pack(kind, len(arrays), epoch, layer)], []
    for wire in arrays:
        array = np.ascontiguousarray(wire.array)
        if array.ndim > MAX_DIMS:
            raise FrameError(f"a {array.ndim}-dimensional array; messages carry at most {MAX_DIMS}")
        dims = (*array.shape, 1, 1)[:MAX_DIMS]
        heads.append(_ARRAY.pack(_CODES[wire.dtype], array.ndim, *dims))
        bodies.append(memoryview(array.reshape(-1).view(np.uint8)))  # NOTE: flat bytes, empty arrays too
    return [memoryview(b"".join(heads)), *bodies]


def encode_call(call: WorkerCall) -> list[memoryview]:
    return encode(CALL, call.epoch, call.layer, [call.x_TH, WireTensor(call.pair_token_N, "int32"),
                                                 WireTensor(call.pair_slot_N, "int32"),
                                                 WireTensor(call.pair_weight_N, "float32")])


def encode_error(message: str) -> list[memoryview]:
    data = message.encode()[:MAX_ERROR_BYTES]  # NOTE: may cut a character; error_text replaces it
    return encode(ERROR, 0, 0, [WireTensor(np.frombuffer(data, np.uint8), "uint8")])


def parse_heads(head: bytes, array_heads: bytes, max_bytes: int) -> tuple[int, int, int, list[tuple]]:
    """Check a message's heads: (kind, epoch, layer, [(code, shape, nbytes)]). Pure, so it is fuzzed alone."""
    kind, count, epoch, layer = _HEAD.unpack(head)
    if KINDS.get(kind) != count:
        raise FrameError(f"message kind {kind} with {count} arrays is not one of {sorted(KINDS.items())}")
    specs, total = [], 0
    for i in range(count):
        code, ndim, *dims = _ARRAY.unpack_from(array_heads, i * _ARRAY.size)
        if code not in DTYPES or not 1 <= ndim <= MAX_DIMS or any(d != 1 for d in dims[ndim:]):
            raise FrameError(f"array {i}: dtype code {code} with {ndim} dims is not allowed ({sorted(DTYPES)}, "
                             f"1 to {MAX_DIMS} dims)")
        shape = tuple(dims[:ndim])
        nbytes = int(np.prod(shape, dtype=object)) * _ITEMSIZE[code]
        total += nbytes
        if total > max_bytes:
            raise FrameError(f"a message of over {max_bytes} bytes of arrays is over this side's limit")
        specs.append((code, shape, nbytes))
    _check_kind(kind, specs)
    return kind, epoch, layer, specs


def _check_kind(kind: int, specs: list[tuple]) -> None:
    codes = [DTYPES[code][0] for code, _, _ in specs]
    if kind == CALL:
        (_, x_shape, _), *pairs = specs
        if len(x_shape) != 2 or codes[1:] != ["int32", "int32", "float32"] or \
                any(len(shape) != 1 or shape != pairs[0][1] for _, shape, _ in pairs):
            raise FrameError(f"a call of arrays {codes} shaped {[s for _, s, _ in specs]}: x_TH 2-D, then int32, "
                             f"int32 and float32 pair arrays of one length")
    elif kind == ERROR and (codes != ["uint8"] or len(specs[0][1]) != 1):
        raise FrameError("an error message is one uint8 array")


def recv(sock: socket.socket, max_bytes: int) -> tuple[int, int, int, list[WireTensor]]:
    """The next message: (kind, epoch, layer, arrays). ``ConnectionError`` if the peer closed the connection,
    ``FrameError`` for anything else than a message this layout allows (nothing past its heads read)."""
    head = recv_exact(sock, _HEAD.size)
    count = head[1]
    if count > max(KINDS.values()):
        raise FrameError(f"a message of {count} arrays is not one of {sorted(KINDS.items())}")
    kind, epoch, layer, specs = parse_heads(bytes(head), bytes(recv_exact(sock, _ARRAY.size * count)), max_bytes)
    arrays = []
    for code, shape, nbytes in specs:
        name, np_dtype = DTYPES[code]
        arrays.append(WireTensor(np.frombuffer(recv_exact(sock, nbytes), np_dtype).reshape(shape), name))
    return kind, epoch, layer, arrays


def call_of(epoch: int, layer: int, arrays: list[WireTensor]) -> WorkerCall:
    x, token, slot, weight = arrays
    return WorkerCall(epoch, layer, x, token.array, slot.array, weight.array)


def error_text(arrays: list[WireTensor]) -> str:
    return arrays[0].array.tobytes().decode("utf-8", errors="replace")


def send_all(sock: socket.socket, views: list[memoryview]) -> None:
    views = [v.cast("B") for v in views if v.nbytes]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:  # NOTE: sendmsg may write part of what it was given
            sent -= views[0].nbytes
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the peer closed the connection")
        got += k
    return buf
