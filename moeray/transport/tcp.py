"""The TCP transport: one MoE layer as one message each way over a socket the router holds to each worker.

    router ── frame(WorkerCall) ──▶ worker: a thread per connection: recv ─▶ forward ─▶ send
    router ◀── frame((OK, y_TH)) or frame((ERROR, message)) ────┘
    (every touched worker's call is sent before any result is read, so they compute at once)

Why it exists: on the object-store path a one-token layer's round trip costs ~1.4 ms of Ray (task submission,
scheduling, the result's object), against ~0.14 ms for the same payloads over a connected socket, and ~4.8 against
~0.8 ms at 256 tokens (``moeray bench layer``). A decode step pays that per MoE layer. The payloads are the wire
format's numpy arrays, pickled with protocol 5: the arrays travel out of band, written from their own memory by one
``sendmsg`` and read into fresh buffers, never copied into the pickle.

Connections: each worker listens on its node's IP (``ExpertWorker.tcp_address``, started on first use) and hands
the address and a random token to whoever asks through Ray; a connection that does not open with the token is
closed unread. The router keeps a pool of idle connections per worker: a send takes one per touched worker and
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

import hmac
import logging
import pickle
import secrets
import socket
import struct
import threading

from moeray.transport.base import Sent, call_each
from moeray.transport.wire import WireTensor, WorkerCall

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0  # opening a connection and sending its token
GET_TIMEOUT_S = 300.0  # one layer's result, as on the other paths: a loaded CPU machine is slow
PING_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 2  # a live worker whose connection broke gets its call again once, on a new connection
TOKEN_BYTES = 16
OK, ERROR = 0, 1

_HEAD = struct.Struct("!QI")  # the pickle's length, the number of out-of-band buffers
_SIZE = struct.Struct("!Q")


class WorkerFailed(RuntimeError):
    """A worker's ``forward`` raised (anything but its death): the router's step fails with its message."""


# -- frames: one pickled object, its numpy arrays out of band -----------------------------------------------
def encode_frame(obj) -> list[memoryview]:
    """``obj`` as the pieces of one frame: a head (sizes), the pickle, then each array's memory, uncopied."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = _HEAD.pack(len(data), len(raws)) + b"".join(_SIZE.pack(r.nbytes) for r in raws)
    return [memoryview(head), memoryview(data), *raws]


def send_frame(sock: socket.socket, obj) -> None:
    _send_all(sock, encode_frame(obj))


def recv_frame(sock: socket.socket):
    """The next frame's object; ``ConnectionError`` if the peer closed the connection."""
    size, count = _HEAD.unpack(_recv_exact(sock, _HEAD.size))
    sizes = struct.unpack(f"!{count}Q", _recv_exact(sock, _SIZE.size * count)) if count else ()
    data = _recv_exact(sock, size)
    return pickle.loads(data, buffers=[_recv_exact(sock, n) for n in sizes])


def _send_all(sock: socket.socket, views: list[memoryview]) -> None:
    views = [v.cast("B") for v in views if v.nbytes]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:  # NOTE: sendmsg may write part of what it was given
            sent -= views[0].nbytes
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the peer closed the connection")
        got += k
    return buf


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # NOTE: a small frame must not wait for an ACK
    return sock


# -- the worker's side ------------------------------------------------------------------------------------
class Listener:
    """A worker's listening socket: a thread accepts, one thread per connection serves it until it closes."""

    def __init__(self, worker, host: str) -> None:
        self.worker = worker
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.sock = socket.create_server((host, 0), backlog=64)
        self.address = (host, self.sock.getsockname()[1])
        self._lock = threading.Lock()
        self.connections = 0  # served now
        threading.Thread(target=self._accept, name="moeray-tcp-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(_nodelay(conn), peer), name=f"moeray-tcp:{peer}",
                             daemon=True).start()

    def _serve(self, conn: socket.socket, peer) -> None:
        """First the token and the method to run, then: call in, result (or error) out, until the router closes."""
        with conn:
            try:
                conn.settimeout(CONNECT_TIMEOUT_S)
                token, method_name = recv_frame(conn)
                if not hmac.compare_digest(token, self.token):
                    log.warning("tcp: a connection from %s did not present this worker's token; closed", peer)
                    return
                method = getattr(self.worker, method_name)
                conn.settimeout(None)  # NOTE: the wait for the next call has no limit: an idle router sends nothing
            except (OSError, ValueError, pickle.UnpicklingError) as e:
                log.warning("tcp: a connection from %s failed its opening (%s); closed", peer, e)
                return
            with self._lock:
                self.connections += 1
            try:
                while True:
                    call = recv_frame(conn)
                    try:
                        answer = (OK, method(*call))
                    except Exception as e:  # noqa: BLE001 - sent to the router, which raises it in its step
                        log.exception("tcp: a call from %s failed", peer)
                        answer = (ERROR, f"{type(e).__name__}: {e}")
                    send_frame(conn, answer)
            except OSError:  # the router closed the connection (or died)
                pass
            finally:
                with self._lock:
                    self.connections -= 1


def listen(worker) -> Listener:
    """The worker's listener, started on first use (kept on the worker object, so its ``__init__`` needs nothing)."""
    listener = vars(worker).get("_tcp_listener")
    if listener is None:
        import ray

        listener = worker._tcp_listener = Listener(worker, ray.util.get_node_ip_address())
        log.info("tcp: worker %s listens on %s:%d", worker.worker_index, *listener.address)
    return listener


# -- the router's side ------------------------------------------------------------------------------------
class TcpTransport:
    """Connections to the workers, pooled per worker; reopened as needed, never polled."""

    concurrent_sends = True  # each send takes its own connections from the pool (micro-batches; dispatch.py)

    def __init__(self, workers: list, *, method: str = "forward", get_timeout_s: float = GET_TIMEOUT_S) -> None:
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
        frames = {w: encode_frame(tuple(call)) for w, call in calls.items()}  # NOTE: all of them before any send
        for w, frame in frames.items():
            conn = None
            try:
                conn = self._checkout(w)
                _send_all(conn, frame)
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
                status, payload = recv_frame(conn)
            except OSError as e:  # closed, reset, or silent past the timeout
                log.info("tcp: worker %d's answer did not come: %s", w, e)
                conn.close()
                broken.add(w)
                continue
            self._checkin(w, conn, generation)
            if status == ERROR:
                errors.append((w, f"worker {w}: {payload}"))
            else:
                results[w] = payload
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
        host, port, token = address
        conn = _nodelay(socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S))
        try:
            send_frame(conn, (token, self.method))
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
