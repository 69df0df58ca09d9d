"""The TCP transport's opening, a worker's listener and the router's connection pool, on loopback with in-process
workers (no Ray: the addresses are set where a Ray call would fetch them). The messages' layout: test_frames.py;
the Ray engine on this path, worker deaths and several routers: tests/integration/test_tcp.py."""

from __future__ import annotations

import pickle
import socket
import struct
import threading
import time

import numpy as np
import pytest
import torch

from moeray.transport import frames, tcp
from moeray.transport.tcp import Listener, TcpTransport, WorkerFailed
from moeray.transport.wire import WorkerCall, pack, unpack


class _Worker:
    """Stands in for an ExpertWorker: ``forward`` echoes x times 2, or raises for layer 99; slow for layer 7."""

    worker_index = 0

    def __init__(self) -> None:
        self.calls = 0
        self.threads: set[str] = set()

    def forward(self, epoch, layer, x_TH, *pairs):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        if layer == 99:
            raise ValueError(f"no layer {layer}")
        if layer == 7:
            time.sleep(0.3)
        return pack(unpack(x_TH) * 2)


def _call(layer: int = 0, rows: int = 3) -> WorkerCall:
    token_N = torch.arange(rows)
    return WorkerCall.of(5, layer, torch.full((rows, 4), float(layer)), token_N, token_N, torch.ones(rows))


@pytest.fixture
def served():
    """Two in-process workers, each listening on loopback, and a transport whose addresses point at them."""
    workers = [_Worker(), _Worker()]
    listeners = [Listener(w, "127.0.0.1", max_call_bytes=frames.call_limit(4, 2, 8)) for w in workers]
    transport = TcpTransport(["w0", "w1"])
    transport._addresses = {i: (*l.address, l.key) for i, l in enumerate(listeners)}
    yield transport, workers, listeners
    transport.close()
    for listener in listeners:
        listener.sock.close()


def _wait(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_calls_and_answers_over_pooled_connections(served):
    transport, workers, listeners = served
    for _ in range(3):
        sent = transport.send({0: _call(1), 1: _call(2, rows=1)})
        assert sent.lost == frozenset()
        assert torch.equal(unpack(sent.results[0]), torch.full((3, 4), 2.0))
        assert torch.equal(unpack(sent.results[1]), torch.full((1, 4), 4.0))
    assert transport.compiles == 2, "one connection per worker, reused"
    assert [w.calls for w in workers] == [3, 3] and [l.connections for l in listeners] == [1, 1]
    only_one = transport.send({1: _call(3)})
    assert list(only_one.results) == [1] and workers[0].calls == 3, "an untouched worker gets nothing"


def test_a_worker_error_names_the_worker_and_keeps_the_connections_in_step(served):
    transport, workers, _ = served
    with pytest.raises(WorkerFailed, match=r"MoE layer 99 failed on 1 expert worker\(s\): worker 1: ValueError: "
                                           r"no layer 99"):
        transport.send({0: _call(1), 1: _call(99)})
    again = transport.send({0: _call(1), 1: _call(2)})
    assert torch.equal(unpack(again.results[1]), torch.full((3, 4), 4.0)) and transport.compiles == 2


def test_sends_from_several_threads_each_take_their_own_connection(served):
    transport, workers, listeners = served
    results = {}

    def send(i: int) -> None:
        results[i] = transport.send({0: _call(7), 1: _call(7)})  # 0.3 s in each worker: the sends overlap

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(unpack(r.results[w]), torch.full((3, 4), 14.0)) for r in results.values() for w in (0, 1))
    assert [l.connections for l in listeners] == [3, 3] and transport.compiles == 6
    assert all(len(w.threads) == 3 for w in workers), "each connection is served on its own thread"


def test_a_new_worker_list_closes_the_old_connections(served):
    transport, _, listeners = served
    addresses = dict(transport._addresses)
    transport.send({0: _call(), 1: _call()})
    transport.set_workers(["w0", "w1"])
    _wait(lambda: [l.connections for l in listeners] == [0, 0])
    assert transport._addresses == {} and transport.dead == set()
    transport._addresses = addresses
    assert sorted(transport.send({0: _call(), 1: _call()}).results) == [0, 1] and transport.compiles == 4


def _challenge(conn: socket.socket) -> bytes:
    conn.settimeout(5)
    magic, nonce = tcp._CHALLENGE.unpack(frames.recv_exact(conn, tcp._CHALLENGE.size))
    assert magic == tcp._MAGIC
    return nonce


def _closed(conn: socket.socket) -> bool:
    conn.settimeout(5)
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


class _Marker:
    """Unpickling this creates ``path``: proof that the worker parsed a pickle it was sent."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_connection_without_the_key_is_closed_unread(served, tmp_path):
    """A wrong answer, a pickle in place of the answer (in the old opening's framing too), random bytes, an answer
    replayed from another connection's opening, a method outside the table: each closed, nothing parsed or run."""
    transport, workers, listeners = served
    listener = listeners[0]
    marker = tmp_path / "ran"
    payload = pickle.dumps((_Marker(marker), "forward"))
    pickled = struct.pack("!QI", len(payload), 0) + payload  # the framing the listener once unpickled unread
    # a real opening, captured: its answer is for that connection's nonce only
    with socket.create_connection(listener.address) as conn:
        nonce = _challenge(conn)
        captured = tcp._ANSWER.pack(tcp.opening_mac(listener.key, nonce, 0), 0)
    openings = [b"\0" * tcp._ANSWER.size, pickled, np.random.default_rng(0).bytes(4096), captured,
                tcp._ANSWER.pack(tcp.opening_mac(listener.key, b"\0" * 32, 0), 0),
                tcp._ANSWER.pack(tcp.opening_mac(b"k" * 32, b"\0" * 32, 0), 0)]
    for opening in openings:
        with socket.create_connection(listener.address) as conn:
            nonce = _challenge(conn)
            conn.sendall(opening)
            assert _closed(conn)
    with socket.create_connection(listener.address) as conn:  # a right MAC for a method outside the table
        nonce = _challenge(conn)
        conn.sendall(tcp._ANSWER.pack(tcp.opening_mac(listener.key, nonce, len(tcp.METHODS)), len(tcp.METHODS)))
        assert _closed(conn)
    _wait(lambda: listener.held == 0)
    assert not marker.exists() and workers[0].calls == 0 and listener.connections == 0
    assert listener.refused == 1 + len(openings) + 1  # the captured one closed unanswered counts too
    # the worker still serves the router that holds the key
    assert np.array_equal(unpack(transport.send({0: _call(2)}).results[0]), np.full((3, 4), 4.0))
    assert workers[0].calls == 1


def test_a_silent_opening_and_connections_past_the_bound_are_closed(served):
    _, workers, _ = served
    listener = Listener(workers[0], "127.0.0.1", max_call_bytes=1024, open_timeout_s=0.3, max_connections=3)
    try:
        silent = [socket.create_connection(listener.address) for _ in range(3)]
        for conn in silent:
            _challenge(conn)
        with socket.create_connection(listener.address) as extra:  # the fourth: refused at once, unchallenged
            assert _closed(extra)
        for conn in silent:  # each closed once its opening time is up
            assert _closed(conn)
            conn.close()
        _wait(lambda: listener.held == 0)
        assert listener.refused == 4 and listener.connections == 0
    finally:
        listener.sock.close()


def test_the_method_is_one_of_the_table():
    with pytest.raises(ValueError, match=r"method 'export_experts' is not one a worker serves over tcp"):
        TcpTransport([], method="export_experts")

def test_a_call_over_the_models_limit_is_refused_and_the_worker_serves_on(served):
    """The listeners take 8 tokens of hidden size 4 and top-2 (frames.call_limit): a router holding the key that
    sends 9 finds its connection closed before the arrays are read, and is told so; 8 pass."""
    transport, workers, listeners = served
    assert frames.call_limit(4, 2, 8) == 8 * (4 * 4 + 2 * 12)
    with socket.create_connection(listeners[0].address) as conn:
        nonce = _challenge(conn)
        conn.sendall(tcp._ANSWER.pack(tcp.opening_mac(listeners[0].key, nonce, 0), 0))
        token_N = torch.arange(9).repeat(2)  # 9 tokens, 18 pairs: 9 * 16 + 18 * 12 bytes
        frames.send_all(conn, frames.encode_call(WorkerCall.of(0, 0, torch.ones(9, 4), token_N, token_N,
                                                               torch.ones(18))))
        assert _closed(conn)
    _wait(lambda: listeners[0].refused_messages == 1)
    assert workers[0].calls == 0
    token_N = torch.arange(8).repeat(2)
    sent = transport.send({0: WorkerCall.of(0, 0, torch.ones(8, 4), token_N, token_N, torch.ones(16))})
    assert torch.equal(unpack(sent.results[0]), torch.full((8, 4), 2.0)) and workers[0].calls == 1


def test_an_answer_is_bounded_by_its_call():
    call = _call(rows=3)
    assert frames.result_limit(call) == frames.MAX_ERROR_BYTES  # 3 x 4 float32 rows: below the error bound
    wide = WorkerCall.of(0, 0, torch.ones(5000, 16), torch.arange(1), torch.arange(1), torch.ones(1))
    assert frames.result_limit(wide) == 5000 * 16 * 4
    long_error = frames.encode_error("x" * (2 * frames.MAX_ERROR_BYTES))
    assert sum(v.nbytes for v in long_error[1:]) == frames.MAX_ERROR_BYTES
