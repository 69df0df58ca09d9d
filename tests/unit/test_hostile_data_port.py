"""Hostile clients against real expert workers' data ports while the engine generates through them: the in-process
engine's router is moved onto the tcp path over loopback (the listeners a Ray worker starts on its node's IP,
started here on 127.0.0.1; no Ray). Pickles in the framings people use, random bytes, a truncated opening, a
declared length of 2^62 bytes after a valid opening, silent openings, more connections than the bound, an answer
replayed from a captured opening: no code runs, memory stays bounded, every bad connection is closed, and the
requests in flight finish with transformers' outputs."""

from __future__ import annotations

import pickle
import resource
import socket
import struct
import threading

import numpy as np
import pytest

from conftest import PROMPTS
from moeray import EngineConfig, LocalEngine, SamplingParams
from moeray.transport import frames, tcp
from moeray.transport.tcp import Listener, TcpTransport

GREEDY = SamplingParams(max_new_tokens=16)


class _Marker:
    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):  # unpickling it creates the file: proof that a worker parsed a pickle
        return (open, (self.path, "w"))


@pytest.fixture
def engine_on_tcp(checkpoints):
    engine = LocalEngine(EngineConfig(model=checkpoints["mixtral"], backend="local", workers=2))
    router = engine.routers[0]
    workers = list(router.dispatcher.transport.workers)
    listeners = [Listener(w, "127.0.0.1", max_call_bytes=w.max_call_bytes, open_timeout_s=1.0) for w in workers]
    transport = TcpTransport(workers)
    transport._addresses = {i: (*l.address, l.key) for i, l in enumerate(listeners)}  # what Ray would hand out
    router.dispatcher.transport = transport
    try:
        yield engine, listeners
    finally:
        engine.shutdown()
        transport.close()
        for listener in listeners:
            listener.sock.close()


def _challenge(conn: socket.socket) -> bytes:
    conn.settimeout(10)
    return tcp._CHALLENGE.unpack(frames.recv_exact(conn, tcp._CHALLENGE.size))[1]


def _closed(conn: socket.socket) -> bool:
    """The worker closes it: whatever it sent first (a challenge), then the end, within the opening's time."""
    conn.settimeout(10)
    try:
        while conn.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _attack(listener: Listener, marker) -> int:
    """Every hostile opening once; returns how many connections it made that the listener must refuse."""
    payload = pickle.dumps((_Marker(marker), "forward"))
    framings = [payload, struct.pack("!QI", len(payload), 0) + payload, struct.pack("!Q", len(payload)) + payload,
                struct.pack("!I", len(payload)) + payload, struct.pack("<I", len(payload)) + payload]
    with socket.create_connection(listener.address) as conn:  # a real opening, captured
        nonce = _challenge(conn)
        captured = tcp._ANSWER.pack(tcp.opening_mac(listener.key, nonce, 0), 0)
    refused = 1  # the captured connection closed unanswered counts too
    for opening in [*framings, np.random.default_rng(7).bytes(1 << 16), captured, b"\x01" * 5]:
        with socket.create_connection(listener.address) as conn:
            _challenge(conn)
            try:
                conn.sendall(opening)
                if len(opening) < tcp._ANSWER.size:  # a truncated answer, then the writer half-closes
                    conn.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert _closed(conn)
        refused += 1
    # many at once, silent: past the bound closed at once, the rest when their opening time is up
    crowd = [socket.create_connection(listener.address) for _ in range(tcp.MAX_CONNECTIONS + 6)]
    for conn in crowd:
        assert _closed(conn)
        conn.close()
    return refused + len(crowd)


def test_hostile_clients_change_nothing_for_requests_in_flight(engine_on_tcp, oracle, tmp_path):
    engine, listeners = engine_on_tcp
    ref = oracle("mixtral")
    expected = [ref.greedy(p) for p in PROMPTS]
    assert [r.output_ids for r in engine.generate(PROMPTS, GREEDY)] == expected  # on the tcp path
    assert all(l.connections > 0 for l in listeners)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outputs, stop = [], threading.Event()

    def serve() -> None:
        while not stop.is_set():
            outputs.append([r.output_ids for r in engine.generate(PROMPTS, GREEDY)])

    server = threading.Thread(target=serve)
    server.start()
    marker = tmp_path / "ran"
    try:
        for listener in listeners:
            refused_before = listener.refused
            assert _attack(listener, marker) == listener.refused - refused_before
            # a router's valid opening, then a call that declares 2^62 bytes: closed before anything is allocated
            with socket.create_connection(listener.address) as conn:
                nonce = _challenge(conn)
                conn.sendall(tcp._ANSWER.pack(tcp.opening_mac(listener.key, nonce, 0), 0))
                conn.sendall(frames._HEAD.pack(frames.CALL, 4, 0, 0) + frames._ARRAY.pack(1, 2, 1 << 60, 4)
                             + frames._ARRAY.pack(4, 1, 1, 1) * 2 + frames._ARRAY.pack(1, 1, 1, 1))
                assert _closed(conn)
    finally:
        stop.set()
        server.join(timeout=600)
    assert not marker.exists(), "a worker unpickled what a stranger sent"
    assert all(l.refused_messages == 1 for l in listeners)
    growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert growth_kib < 256 * 1024, f"the process grew by {growth_kib} KiB under attack"
    assert outputs and all(o == expected for o in outputs), "a request in flight changed under attack"
    assert [r.output_ids for r in engine.generate(PROMPTS, GREEDY)] == expected
