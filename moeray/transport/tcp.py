"""The TCP transport: one MoE layer as one message each way over a socket the router holds to each worker.

    router ── frame(WorkerCall) ──▶ worker: a thread per connection: recv ─▶ forward ─▶ send
    router ◀── frame((OK, y_TH)) or frame((ERROR, message)) ────┘
    (every touched worker's call is sent before any result is read, so they compute at once)

Why it exists: on the object-store path a one-token layer's round trip costs ~1.4 ms of Ray (task submission,
scheduling, the result's object), against ~0.14 ms for the same payloads over a connected socket, and ~4.8 against
~0.8 ms at 256 tokens (``moeray bench layer``). A decode step pays that per MoE layer. The payloads are the wire
format's numpy arrays in a fixed binary layout (moeray/transport/frames.py: nothing a socket delivers is unpickled),
written from their own memory by one ``sendmsg`` and read into fresh buffers.

Connections: each worker listens on its node's IP (``ExpertWorker.tcp_address``, started on first use) and hands
the address and a random key to whoever asks through Ray. The key never crosses the socket: a connection opens with
the worker's fresh nonce, answered by HMAC-SHA256(key, nonce, method) within ``OPEN_TIMEOUT_S``, and nothing the
peer sends is parsed before that answer checks out; the method is an index into ``METHODS``, never a name the peer
sends. A wrong, late or replayed opening is closed (counted in ``Listener.refused``, logged once per peer host), so
is every connection past ``MAX_CONNECTIONS``, and so is one whose message the layout refuses (its size is checked
before anything is allocated). The router keeps a pool of idle connections per worker: a send takes one per touched worker and
gives it back after its answer, so sends from several threads at once (micro-batches) each use their own
connection, and the worker serves each on its own thread (``forward`` takes concurrent calls). Any number of
routers; nothing polls, so an idle connection costs nothing.

Failures: a connection that breaks (the worker's process died: the kernel closes its sockets), refuses, or stays
silent past ``get_timeout_s`` is dropped, and the worker is pinged through Ray: dead, it is reported in
``Sent.lost``; alive (e.g. restarted), its call goes again over a new connection, once. A worker's own error in
``forward`` comes back as a message and raises ``WorkerFailed`` after every result is in (the connections stay in
step and go back to the pool). A plan switch changes nothing here: the epoch travels in each call.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import socket
import struct
import threading

from moeray.transport import frames
from moeray.transport.base import PING_TIMEOUT_S, Sent, WorkerFailed, call_each
from moeray.transport.frames import FrameError
from moeray.transport.wire import WireTensor, WorkerCall

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0  # the router's wait to connect and be challenged
OPEN_TIMEOUT_S = 5.0  # the worker's wait for a new connection's answer to its challenge
MAX_CONNECTIONS = 64  # per worker, opening or open: routers x concurrent micro-batch sends, with room
GET_TIMEOUT_S = 300.0  # one layer's result, as on the other paths: a loaded CPU machine is slow
MAX_ATTEMPTS = 2  # a live worker whose connection broke gets its call again once, on a new connection
KEY_BYTES = NONCE_BYTES = 32
METHODS = ("forward", "round_trip_call")  # what a connection may run (the second: moeray bench layer's floor)
_MAGIC = b"MRY1"
_CHALLENGE = struct.Struct(f"!4s{NONCE_BYTES}s")  # the worker's: magic, a fresh nonce
_ANSWER = struct.Struct("!32sB")  # the router's: HMAC-SHA256(key, magic + nonce + method index), the method index


def opening_mac(key: bytes, nonce: bytes, method_index: int) -> bytes:
    return hmac.new(key, _MAGIC + nonce + bytes([method_index]), hashlib.sha256).digest()


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # NOTE: a small frame must not wait for an ACK
    return sock


# -- the worker's side ------------------------------------------------------------------------------------
class Listener:
    """A worker's listening socket: a thread accepts, one thread per connection serves it until it closes."""

    def __init__(self, worker, host: str, *, max_call_bytes: int, open_timeout_s: float = OPEN_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.worker = worker
        self.max_call_bytes = max_call_bytes  # a call's arrays (frames.call_limit: the model's largest forward)
        self.key = secrets.token_bytes(KEY_BYTES)
        self.open_timeout_s, self.max_connections = open_timeout_s, max_connections
        self.sock = socket.create_server((host, 0), backlog=64)
        self.address = (host, self.sock.getsockname()[1])
        self._lock = threading.Lock()
        self.connections = 0  # served now, past their opening
        self.held = 0  # opening or served: what MAX_CONNECTIONS bounds
        self.refused = 0  # connections closed for a bad, late or replayed opening, or past the bound
        self.refused_messages = 0  # connections closed, after their opening, for a message the layout refuses
        self._warned: set[str] = set()
        threading.Thread(target=self._accept, name="moeray-tcp-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:  # closed
                return
            with self._lock:
                full = self.held >= self.max_connections
                self.held += not full
            if full:
                self._refuse(conn, peer, f"over {self.max_connections} connections")
                continue
            threading.Thread(target=self._serve, args=(_nodelay(conn), peer), name=f"moeray-tcp:{peer}",
                             daemon=True).start()

    def _refuse(self, conn: socket.socket, peer, why: str, held: bool = False) -> None:
        # NOTE: counted (and its place given up) before the close, so a peer that sees the close finds it counted
        with self._lock:
            self.refused += 1
            self.held -= held
            first = peer[0] not in self._warned
            self._warned.add(peer[0])
        conn.close()
        if first:  # NOTE: once per peer host: a stranger's retries must not flood the log
            log.warning("tcp: refused a connection from %s (%s); further refusals of that host are not logged",
                        peer[0], why)

    def _open(self, conn: socket.socket):
        """The challenge and its answer: the method the connection may run, or None. Nothing else is read."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        conn.settimeout(self.open_timeout_s)
        conn.sendall(_CHALLENGE.pack(_MAGIC, nonce))
        mac, index = _ANSWER.unpack(frames.recv_exact(conn, _ANSWER.size))
        if index >= len(METHODS) or not hmac.compare_digest(mac, opening_mac(self.key, nonce, index)):
            return None
        conn.settimeout(None)  # NOTE: the wait for the next call has no limit: an idle router sends nothing
        return getattr(self.worker, METHODS[index])

    def _serve(self, conn: socket.socket, peer) -> None:
        """The opening, then: call in, result (or error) out, until the router closes."""
        try:
            method = self._open(conn)
        except OSError as e:  # silent past the timeout, or closed mid-opening
            method, why = None, f"no answer to the challenge: {e}"
        else:
            why = "a wrong answer to the challenge"
        if method is None:
            self._refuse(conn, peer, why, held=True)
            return
        try:
            with conn:
                self._run(conn, peer, method)
        finally:
            with self._lock:
                self.held -= 1

    def _run(self, conn: socket.socket, peer, method) -> None:
        with self._lock:
            self.connections += 1
        try:
            while True:
                kind, epoch, layer, arrays = frames.recv(conn, self.max_call_bytes)
                if kind != frames.CALL:
                    raise FrameError(f"a worker takes calls (kind {frames.CALL}); got kind {kind}")
                try:
                    answer = frames.encode(frames.RESULT, epoch, layer, [method(*frames.call_of(epoch, layer,
                                                                                                arrays))])
                except Exception as e:  # noqa: BLE001 - sent to the router, which raises it in its step
                    log.exception("tcp: a call from %s failed", peer)
                    answer = frames.encode_error(f"{type(e).__name__}: {e}")
                frames.send_all(conn, answer)
        except OSError:  # the router closed the connection (or died)
            pass
        except FrameError as e:  # closed before anything past the message's heads was read
            with self._lock:
                self.refused_messages += 1
            log.warning("tcp: closed a connection from %s: %s", peer, e)
        finally:
            with self._lock:
                self.connections -= 1


def listen(worker) -> Listener:
    """The worker's listener, started on first use (kept on the worker object, so its ``__init__`` needs nothing)."""
    listener = vars(worker).get("_tcp_listener")
    if listener is None:
        import ray

        listener = worker._tcp_listener = Listener(worker, ray.util.get_node_ip_address(),
                                                      max_call_bytes=worker.max_call_bytes)
        log.info("tcp: worker %s listens on %s:%d", worker.worker_index, *listener.address)
    return listener


# -- the router's side ------------------------------------------------------------------------------------
class TcpTransport:
    """Connections to the workers, pooled per worker; reopened as needed, never polled."""

    concurrent_sends = True  # each send takes its own connections from the pool (micro-batches; dispatch.py)

    def __init__(self, workers: list, *, method: str = "forward", get_timeout_s: float = GET_TIMEOUT_S) -> None:
        if method not in METHODS:
            raise ValueError(f"method {method!r} is not one a worker serves over tcp: {METHODS}")
        self.workers = list(workers)
        self.method, self.get_timeout_s = method, get_timeout_s
        self.dead: set[int] = set()
        self._lock = threading.Lock()
        self._addresses: dict[int, tuple[str, int, bytes]] = {}
        self._idle: dict[int, list[socket.socket]] = {}
        self._generation = 0  # bumped by a new worker list: connections of an older one are closed, not pooled
        # NOTE: named as the compiled graph's counters, so the router's stats report them (graph_compiles: opened).
        self.compiles = self.idle_releases = 0

    def set_workers(self, workers: list) -> None:
        with self._lock:
            idle, self._idle, self._addresses = self._idle, {}, {}
            self.workers, self.dead = list(workers), set()
            self._generation += 1
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def send(self, calls: dict[int, WorkerCall]) -> Sent:
        lost = {w for w in calls if w in self.dead}
        pending = {w: call for w, call in calls.items() if w not in self.dead}
        results: dict[int, WireTensor] = {}
        for attempt in range(MAX_ATTEMPTS):
            got, broken = self._exchange(pending)
            results.update(got)
            if not broken:
                return Sent(results, frozenset(lost))
            dead = call_each(self.workers, sorted(broken), "ping", PING_TIMEOUT_S)
            log.warning("tcp: connections to workers %s broke; dead: %s", sorted(broken), sorted(dead))
            self.dead |= dead
            lost |= dead
            pending = {w: pending[w] for w in sorted(broken - dead)}
            if not pending:
                return Sent(results, frozenset(lost))
        raise RuntimeError(f"tcp: the connections to live workers {sorted(pending)} broke {MAX_ATTEMPTS} times in a "
                           f"row")

    def release_if_idle(self) -> bool:
        return False  # an idle connection blocks on its socket; nothing polls

    def close(self) -> None:
        self.set_workers(self.workers)

    # -- one layer ---------------------------------------------------------------------------------------
    def _exchange(self, calls: dict[int, WorkerCall]) -> tuple[dict[int, WireTensor], set[int]]:
        """Every call out, then every answer in; returns the results and the workers whose connection broke. A
        worker's error is raised once every answer is in."""
        generation, conns, broken = self._generation, {}, set()
        messages = {w: frames.encode_call(call) for w, call in calls.items()}  # NOTE: all of them before any send
        for w, message in messages.items():
            conn = None
            try:
                conn = self._checkout(w)
                frames.send_all(conn, message)
                conns[w] = conn
            except Exception as e:  # noqa: BLE001 - narrowed below
                # a socket error, or the address's Ray call found the actor gone or stuck
                if not isinstance(e, OSError) and not _ray_error(e):
                    for sent in conns.values():  # out of step now: their answers will never be read
                        sent.close()
                    raise
                log.info("tcp: sending to worker %d failed: %s", w, e)
                if conn is not None:
                    conn.close()
                broken.add(w)
        results, errors = {}, []
        for w, conn in conns.items():
            try:
                kind, _, _, arrays = frames.recv(conn, frames.result_limit(calls[w]))
            except (OSError, FrameError) as e:  # closed, reset, silent past the timeout, or not an answer
                log.info("tcp: worker %d's answer did not come: %s", w, e)
                conn.close()
                broken.add(w)
                continue
            self._checkin(w, conn, generation)
            if kind == frames.ERROR:
                errors.append((w, f"worker {w}: {frames.error_text(arrays)}"))
            else:
                results[w] = arrays[0]
        for w in broken:
            with self._lock:
                self._addresses.pop(w, None)  # NOTE: a restarted worker listens elsewhere
                for conn in self._idle.pop(w, []) if self._generation == generation else []:
                    conn.close()
        if errors:
            raise WorkerFailed(f"MoE layer {calls[errors[0][0]].layer} failed on {len(errors)} expert worker(s): "
                               + "; ".join(message for _, message in errors))
        return results, broken

    # -- connections -------------------------------------------------------------------------------------
    def _checkout(self, w: int) -> socket.socket:
        with self._lock:
            idle = self._idle.get(w)
            if idle:
                return idle.pop()
            address = self._addresses.get(w)
            worker = self.workers[w]
        if address is None:
            import ray

            address = tuple(ray.get(worker.tcp_address.remote(), timeout=CONNECT_TIMEOUT_S))
            with self._lock:
                self._addresses[w] = address
        host, port, key = address
        conn = _nodelay(socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S))
        try:
            magic, nonce = _CHALLENGE.unpack(frames.recv_exact(conn, _CHALLENGE.size))
            if magic != _MAGIC:
                raise ConnectionError(f"worker {w} at {host}:{port} did not open with moeray's challenge")
            index = METHODS.index(self.method)
            conn.sendall(_ANSWER.pack(opening_mac(key, nonce, index), index))
        except OSError:
            conn.close()
            raise
        conn.settimeout(self.get_timeout_s)
        self.compiles += 1
        return conn

    def _checkin(self, w: int, conn: socket.socket, generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self._idle.setdefault(w, []).append(conn)
                return
        conn.close()


def _ray_error(e: Exception) -> bool:
    from ray.exceptions import GetTimeoutError, RayActorError

    return isinstance(e, (RayActorError, GetTimeoutError))
