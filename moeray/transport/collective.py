"""The collective transport: a torch.distributed process group per router over its live workers, one MoE layer
as batched point-to-point transfers.

    router (rank 0) ── header_C, x_TH, pairs_3N ──▶ worker rank r: serving thread: recv ─▶ forward ─▶ send
    router (rank 0) ◀──────── result header_R, then y_TH (or an error message) ────────────────┘
    (only the layer's touched workers get anything; all of a layer's sends and result-header receives are posted
    before any wait, and each payload's receive as soon as its header is in)

Group: the router is rank 0 and hosts the rendezvous store (a ``TCPStore`` on its node's IP, a free port); each
live worker joins through a Ray call (``ExpertWorker.join_collective``) as rank 1 + its position among the live
workers, and serves the group on a thread of its own until the group goes away. Groups are built directly
(``ProcessGroupGloo`` / ``ProcessGroupNCCL`` over a ``PrefixStore`` named per build), never through
``init_process_group``: that makes one default group per process, and a worker serves one group per router.
The backend follows the router's device: gloo on CPU, NCCL when it is CUDA. NOTE: the NCCL path is written but
untested (no GPU here); there the payloads go host -> device -> host, since the dispatcher hands over host arrays.

Membership is fixed per group and the group is rebuilt lazily, at the next send, when it changes:
- a new worker list (the controller scaled): the old group is stopped (a STOP header to each member) and dropped;
- a worker that dies: its socket closes, so the router's pending receive fails at once (gloo: "Connection closed
  by peer"); a hung node is caught by the per-layer timeout instead. The group is dropped, the dead are found by
  a Ray ping and reported in ``Sent.lost``, and the live workers' calls go again over a group of the live ones;
- a router that restarts: its old sockets closed with its process, so the old group's serving threads exit, and
  the new incarnation builds its own group on a new store.
A plan switch alone keeps the group: the epoch travels in each header.

Why gloo timeouts are used with care: a gloo wait that times out poisons every pair of its group (gloo signals the
timeout to all of them, so no posted receive is left pointing at a freed buffer). So a worker waits for the next
header without a limit (``IDLE_WAIT``), and it leaves that wait when its router sends STOP or its socket closes
(dropping a group closes them; ``abort``/``shutdown`` do not, measured with torch 2.13). An idle group costs
nothing: the serving threads block on sockets (unlike a compiled graph's channel polling), so it is never
released for being idle.

Shape legend: T tokens sent to one worker, H hidden, N (token, slot) pairs, C call-header fields, R result-header
fields.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import threading
import uuid

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

from moeray.transport.base import PING_TIMEOUT_S, Sent, WorkerFailed, call_each
from moeray.transport.wire import WireTensor, WorkerCall, pack

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 60.0  # rendezvous of one group (store connect and every rank's connections)
GET_TIMEOUT_S = 300.0  # one layer's results, as for the compiled graph: a loaded CPU machine is slow
STOP_TIMEOUT_S = 5.0  # a STOP header to a live, idle member
MAX_ATTEMPTS = 3  # exchanges of one layer: a death found per attempt, then give up
IDLE_WAIT = datetime.timedelta(days=365)  # a worker's wait for the next header: "for ever" (see the docstring)
TAG = 0  # one ordered stream per (router, worker) pair: every message of the protocol uses it

# Call header: what the worker needs to size its receives, then the call's scalars.
CALL, STOP = 1, 0
CALL_FIELDS = ("kind", "epoch", "layer", "rows", "cols", "pairs", "dtype")
# Result header: the payload that follows (y_TH, or an error message of ``length`` UTF-8 bytes).
OK, ERROR = 0, 1
RESULT_FIELDS = ("status", "rows", "cols", "dtype", "length")
# Wire dtype names (WireTensor.dtype) by code; a payload travels as its wire array's raw bits.
DTYPES = ("float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "float8_e8m0fnu", "uint8", "int32")


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """What one rank needs to join one group; the router sends it to each worker (``join_collective``)."""

    name: str  # unique per build: the store prefix, and the worker's serving thread's name
    host: str  # the router's node IP, where the rendezvous store listens
    port: int
    rank: int  # 0: the router; 1..world-1: the members in worker-index order
    world: int
    backend: str  # "gloo" or "nccl"
    join_timeout_s: float  # the rendezvous's limit
    timeout_s: float  # one layer's transfers' limit (never the idle wait for the next header)
    method: str = "forward"  # the worker method each call runs (``moeray bench layer``'s floor: an echo)


@functools.lru_cache(maxsize=None)
def _raw_dtype(name: str) -> torch.dtype:
    """The dtype a wire array of torch dtype ``name`` travels as (raw bits of the same width where numpy lacks it)."""
    return torch.from_numpy(pack(torch.empty(0, dtype=getattr(torch, name))).array).dtype


def _dtype_code(name: str) -> int:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} cannot travel on the collective transport; it carries {DTYPES}")
    return DTYPES.index(name)


def _raw(wire: WireTensor, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(wire.array)).to(device)


def _wire(raw: torch.Tensor, code: int) -> WireTensor:
    return WireTensor(raw.cpu().numpy(), DTYPES[code])


def open_group(spec: GroupSpec, store: TCPStore | None = None):
    """This process's rank of the group ``spec`` (blocks until every rank has joined or ``join_timeout_s`` passed).
    Every wait on it names its own limit; the group's default is the rendezvous's."""
    timeout = datetime.timedelta(seconds=spec.join_timeout_s)
    if store is None:  # a worker: a client of the router's store
        store = TCPStore(spec.host, spec.port, None, False, timeout=timeout)
    prefixed = PrefixStore(spec.name, store)
    if spec.backend == "gloo":
        options = ProcessGroupGloo._Options()
        options._timeout = timeout
        # NOTE: bound to this node's Ray IP: gloo's default resolves the hostname, which in containers may be loopback.
        options._devices = [ProcessGroupGloo.create_device(hostname=ray.util.get_node_ip_address())]
        return ProcessGroupGloo(prefixed, spec.rank, spec.world, options)
    if spec.backend == "nccl":  # NOTE: untested here (no GPU); CPU-only torch builds lack ProcessGroupNCCL
        from torch.distributed import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        # NOTE: NCCL's watchdog aborts any operation older than this, a worker's idle wait for a header included.
        options._timeout = IDLE_WAIT if spec.rank > 0 else timeout
        return ProcessGroupNCCL(prefixed, spec.rank, spec.world, options)
    raise ValueError(f"backend {spec.backend!r} is not one of ('gloo', 'nccl')")


# -- the worker's side ------------------------------------------------------------------------------------
def _threads(worker) -> dict[str, threading.Thread]:
    # NOTE: kept on the worker object, created on first use, so ExpertWorker.__init__ needs no change.
    return vars(worker).setdefault("_collective_threads", {})


def join_group(worker, spec: GroupSpec) -> str:
    """Join ``spec``'s group and serve it on a new daemon thread; returns the group's name once joined."""
    device = worker.device if spec.backend == "nccl" else torch.device("cpu")
    if spec.backend == "nccl" and device.type != "cuda":
        raise ValueError(f"worker {worker.worker_index} runs on {device}; NCCL group {spec.name} needs every member "
                         "on CUDA (a router on CUDA with CPU workers has no NCCL path)")
    group = open_group(spec)
    thread = threading.Thread(target=_serve, args=(worker, group, spec, device), name=f"collective:{spec.name}",
                              daemon=True)
    _threads(worker)[spec.name] = thread
    thread.start()
    return spec.name


def served_groups(worker) -> list[str]:
    return sorted(name for name, thread in list(_threads(worker).items()) if thread.is_alive())


def _serve(worker, group, spec: GroupSpec, device: torch.device) -> None:
    """Loop: receive a header (waiting for ever), its payloads, run the call, send the result; until STOP or the
    group's sockets close (the router dropped the group, or died)."""
    method = getattr(worker, spec.method)
    timeout = datetime.timedelta(seconds=spec.timeout_s)
    header_C = torch.empty(len(CALL_FIELDS), dtype=torch.long, device=device)
    try:
        while True:
            group.recv([header_C], 0, TAG).wait(IDLE_WAIT)
            kind, epoch, layer, rows, cols, pairs, code = header_C.tolist()
            if kind == STOP:
                log.info("collective group %s: stopped by its router", spec.name)
                return
            x_TH = torch.empty(rows, cols, dtype=_raw_dtype(DTYPES[code]), device=device)
            pairs_3N = torch.empty(3, pairs, dtype=torch.int32, device=device)
            for work in [group.recv([x_TH], 0, TAG), group.recv([pairs_3N], 0, TAG)]:
                work.wait(timeout)
            pairs_3N = pairs_3N.cpu()
            try:
                out: WireTensor = method(epoch, layer, _wire(x_TH, code), pairs_3N[0].numpy(), pairs_3N[1].numpy(),
                                         pairs_3N[2].view(torch.float32).numpy())
                payload = _raw(out, device)
                header_R = [OK, *payload.shape, _dtype_code(out.dtype), 0]
            except Exception as e:  # noqa: BLE001 - sent to the router, which raises it in its step
                log.exception("collective group %s: MoE layer %d failed", spec.name, layer)
                payload = torch.tensor(list(f"{type(e).__name__}: {e}".encode()), dtype=torch.uint8, device=device)
                header_R = [ERROR, 0, 0, 0, len(payload)]
            result = torch.tensor(header_R, dtype=torch.long, device=device)
            for work in [group.send([result], 0, TAG), group.send([payload], 0, TAG)]:
                work.wait(timeout)
    except RuntimeError as e:  # gloo: the router dropped the group or died (its sockets closed)
        log.info("collective group %s: left (%s)", spec.name, str(e).splitlines()[0][:200])
    finally:
        _threads(worker).pop(spec.name, None)
        del group  # NOTE: dropping the last reference closes this rank's sockets


# -- the router's side ------------------------------------------------------------------------------------
def _call_tensors(call: WorkerCall, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A call as it travels: header_C (sizes and scalars), x_TH's raw bits, pairs_3N (token, slot, weight bits)."""
    x_TH = _raw(call.x_TH, device)
    pairs_3N = torch.stack([torch.from_numpy(call.pair_token_N), torch.from_numpy(call.pair_slot_N),
                            torch.from_numpy(call.pair_weight_N).view(torch.int32)]).to(device)
    header_C = torch.tensor([CALL, call.epoch, call.layer, *x_TH.shape, pairs_3N.shape[1],
                             _dtype_code(call.x_TH.dtype)], dtype=torch.long, device=device)
    return header_C, x_TH, pairs_3N


def _actor_ids(workers: list) -> list:
    return [getattr(w, "_actor_id", id(w)) for w in workers]


class CollectiveTransport:
    """One process group over the router and its live workers; rebuilt only when membership changes."""

    # NOTE: one ordered stream per worker: two layers' messages must not interleave, so the dispatcher sends its
    # micro-batches through one at a time (moeray.router.dispatch).
    concurrent_sends = False

    def __init__(self, workers: list, *, get_timeout_s: float = GET_TIMEOUT_S, join_timeout_s: float = JOIN_TIMEOUT_S,
                 method: str = "forward") -> None:
        self.workers = list(workers)
        self.get_timeout_s, self.join_timeout_s, self.method = get_timeout_s, join_timeout_s, method
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as the router's own
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.dead: set[int] = set()
        self.group = None
        self.members: list[int] = []  # worker indices in the group; worker members[i] is rank i + 1
        self._rank: dict[int, int] = {}
        self._store: TCPStore | None = None
        self._host = ""
        self._id = uuid.uuid4().hex[:12]
        # NOTE: named as the compiled graph's counters, so the router's stats report both (graph_compiles: builds).
        self.compiles = self.idle_releases = 0

    def set_workers(self, workers: list) -> None:
        if _actor_ids(workers) == _actor_ids(self.workers):
            return
        self._teardown(stop=True)
        self.workers, self.dead = list(workers), set()

    def send(self, calls: dict[int, WorkerCall]) -> Sent:
        lost = {w for w in calls if w in self.dead}
        for attempt in range(MAX_ATTEMPTS):
            if self.group is None:
                lost |= self._build()
            pending = {w: call for w, call in calls.items() if w not in self.dead}
            lost |= set(calls) - set(pending)
            if not pending:
                return Sent({}, frozenset(lost))
            try:
                return Sent(self._exchange(pending), frozenset(lost))
            except WorkerFailed:
                raise  # the streams are in step (the error was the answer): the group stays
            except RuntimeError as e:  # gloo's errors: a socket closed (a member died) or a wait timed out
                members = self.members
                self._teardown(stop=False)  # its streams are out of step: drop it, closing every member's socket
                dead = self._call_each(members, "ping")
                if not dead and attempt > 0:
                    raise
                log.warning("collective exchange failed (%s); workers %s dead; rebuilding over the others",
                            str(e).splitlines()[0][:200], sorted(dead))
                self.dead |= dead
                lost |= dead
        raise RuntimeError(f"the collective exchange failed {MAX_ATTEMPTS} times in a row")

    def release_if_idle(self) -> bool:
        return False  # an idle group blocks on sockets; nothing polls

    def close(self) -> None:
        self._teardown(stop=True)
        self._store = None

    # -- one layer ---------------------------------------------------------------------------------------
    def _exchange(self, calls: dict[int, WorkerCall]) -> dict[int, WireTensor]:
        """Post every call's sends and every result header's receive, then each payload's receive as its header
        arrives; a worker's error is raised after all results are in (so the streams stay in step)."""
        group, timeout, device = self.group, datetime.timedelta(seconds=self.get_timeout_s), self.device
        # 1. Every call's tensors first: anything that raises here (a dtype the wire lacks) has sent nothing yet.
        outgoing = {w: _call_tensors(call, device) for w, call in calls.items()}
        # 2. Post every send and every result header's receive; only then wait.
        in_flight: list = []  # (work, tensor): a tensor must outlive its transfer
        headers_R: dict[int, tuple] = {}
        for w, tensors in outgoing.items():
            rank = self._rank[w]
            for t in tensors:
                in_flight.append((group.send([t], rank, TAG), t))
            header_R = torch.empty(len(RESULT_FIELDS), dtype=torch.long, device=device)
            headers_R[w] = (group.recv([header_R], rank, TAG), header_R)
        # 3. Each payload's receive as its header arrives (its shape and dtype are in the header).
        payloads = {}
        for w, (work, header_R) in headers_R.items():
            work.wait(timeout)
            status, rows, cols, code, length = header_R.tolist()
            shape, dtype = ((length,), torch.uint8) if status == ERROR else ((rows, cols), _raw_dtype(DTYPES[code]))
            payload = torch.empty(shape, dtype=dtype, device=device)
            payloads[w] = (group.recv([payload], self._rank[w], TAG), payload, status, code)
        for work, _ in in_flight:
            work.wait(timeout)
        results, errors = {}, []
        for w, (work, payload, status, code) in payloads.items():
            work.wait(timeout)
            if status == ERROR:
                errors.append(f"worker {w}: {bytes(payload.cpu().tolist()).decode(errors='replace')}")
            else:
                results[w] = _wire(payload, code)
        if errors:
            raise WorkerFailed(f"MoE layer {next(iter(calls.values())).layer} failed on {len(errors)} expert "
                               f"worker(s): " + "; ".join(errors))
        return results

    # -- the group ---------------------------------------------------------------------------------------
    def _build(self) -> set[int]:
        """A group over the live workers; returns the workers found dead on the way (added to ``self.dead``)."""
        found: set[int] = set()
        while True:
            dead = self._call_each([w for w in range(len(self.workers)) if w not in self.dead], "ping")
            self.dead |= dead
            found |= dead
            members = [w for w in range(len(self.workers)) if w not in self.dead]
            if not members:
                return found
            self.compiles += 1
            name = f"moeray-collective/{self._id}/{self.compiles}"
            store = self._rendezvous_store()
            spec = GroupSpec(name=name, host=self._host, port=store.port, rank=0, world=len(members) + 1,
                             backend=self.backend, join_timeout_s=self.join_timeout_s, timeout_s=self.get_timeout_s,
                             method=self.method)
            # Workers join first (each blocks in its own rendezvous), then this rank completes it.
            joins = [self.workers[w].join_collective.remote(dataclasses.replace(spec, rank=i + 1))
                     for i, w in enumerate(members)]
            try:
                group = open_group(spec, store)
                ray.get(joins, timeout=self.join_timeout_s)
            except (RuntimeError, RayActorError, GetTimeoutError) as e:
                group = None
                dead = self._call_each(members, "ping")
                if not dead:
                    ready, _ = ray.wait(joins, num_returns=len(joins), timeout=0)
                    ray.get(ready)  # a worker's own error (a RayTaskError) names the cause better than the timeout
                    raise RuntimeError(f"collective group {name} over workers {members} did not form within "
                                       f"join_timeout_s={self.join_timeout_s}s and none of them is dead") from e
                log.warning("collective group %s did not form: workers %s dead", name, sorted(dead))
                self.dead |= dead
                found |= dead
                continue
            self.group, self.members = group, members
            self._rank = {w: i + 1 for i, w in enumerate(members)}
            log.info("collective group %s (%s) over workers %s", name, self.backend, members)
            return found

    def _rendezvous_store(self) -> TCPStore:
        """The store every group of this transport rendezvouses through (one per router process)."""
        if self._store is None:
            self._host = ray.util.get_node_ip_address()
            # NOTE: port 0: the store binds a free port itself, so there is no race for one
            self._store = TCPStore(self._host, 0, None, True, timeout=datetime.timedelta(seconds=self.join_timeout_s),
                                   wait_for_workers=False)
        return self._store

    def _teardown(self, *, stop: bool) -> None:
        """Drop the group; with ``stop``, first tell each live member (its serving thread exits cleanly). Without,
        the members see their sockets close and exit too."""
        group, members, self.group, self.members, self._rank = self.group, self.members, None, [], {}
        if group is None:
            return
        if stop:
            header_C = torch.zeros(len(CALL_FIELDS), dtype=torch.long, device=self.device)  # kind STOP
            for rank, w in enumerate(members, start=1):
                if w in self.dead:
                    continue
                try:
                    group.send([header_C], rank, TAG).wait(datetime.timedelta(seconds=STOP_TIMEOUT_S))
                except RuntimeError as e:  # gone meanwhile: closing the sockets below frees it anyway
                    log.info("collective group: STOP to worker %d failed (%s)", w, str(e).splitlines()[0][:200])
        del group  # NOTE: dropping the last reference closes the sockets (abort and shutdown do not)

    def _call_each(self, members: list[int], method: str) -> set[int]:
        return call_each(self.workers, members, method, PING_TIMEOUT_S)
