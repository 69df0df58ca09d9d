"""``moeray bench layer``: one MoE layer through moeray's workers vs transformers' experts in one process.

For H=1024, I=2048, 16 experts, top-2, float32 (a Mixtral-style layer) at each token count it prints, in one run:
- moeray: dispatch -> 2 expert worker actors (8 experts each, one thread each) -> combine, tokens/s, over both
  data paths (``EngineConfig.transport``): the object store (an actor call per touched worker) and a Ray compiled
  graph over the workers (one execute per layer, shared-memory channels);
- transformers in-process: the same experts module with its eager loop and with every other registered
  implementation that runs on CPU (all the machine's threads), tokens/s;
- each path's floor: a bare round trip of the same payloads to the same actors on that path, no compute (object
  store: an ``echo`` call per worker; compiled graph: a graph of ``echo_compiled`` nodes; both methods of
  ``BenchWorker``, the expert worker this bench starts);
and the ratios the engine issue sets targets for: moeray / best in-process (>= 0.8 at T=2048), and moeray's
overhead above the in-process block / the bare round trip (<= 2 at T=16), for each path; and compiled graph vs
object store. Only one compiled graph is up at a time (an actor can be in one), none while the object store is timed.
- the collective path (``transport="collective"``): a gloo process group over this process and the workers, one
  layer as point-to-point transfers, beside its floor (the same calls echoed by ``round_trip_call``, no compute);
  timed with no compiled graph up; and the TCP path (``transport="tcp"``) with its floor, the same way.

For the token counts in ``breakdown_tokens`` (default: one token, routed to one expert on each worker) it also
prints where the fixed time of a layer goes on the object-store path (``fixed_costs``): the router's preparation
(pairs, buckets, the calls' arrays), submitting the actor calls, the wait, and the combine; inside the wait, each
worker's time in ``forward`` split into expert compute and its bookkeeping, and the rest (Ray: arguments and
result serialized and moved, scheduling); and beside it, bare round trips: a no-op call given the same six
arguments, and an echo of one argument (the floor).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np
import ray
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moeray.experts.worker import ExpertWorker
from moeray.kernels.api import grouped_experts
from moeray.model.backbone import inspect_checkpoint
from moeray.model.tiny import save_random_checkpoint
from moeray.placement.algorithms.policies import static_plan
from moeray.router.dispatch import ExpertDispatcher
from moeray.transport.base import Sent
from moeray.transport.collective import CollectiveTransport
from moeray.transport.compiled_graph import POLL_BACKOFF, CompiledGraphTransport
from moeray.transport.object_store import ObjectStoreTransport
from moeray.transport.tcp import TcpTransport
from moeray.transport.wire import WireTensor, WorkerCall, pack, pairs_on, unpack

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 1024, 2048, 16, 2
# Measured: a fresh graph's first ~10 executions are slower (page faults in its channels); then the poll backoff's
# estimate, inflated by them, takes a few more to shrink.
WARMUP_COMPILED = 20


class BenchWorker(ExpertWorker):
    """An expert worker with no-compute methods, for the floor of each data path, and timings of its forward."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._in_method: list[float] = []  # seconds inside each forward call, since the last take

    def forward(self, *call) -> WireTensor:
        started = time.perf_counter()
        try:
            return super().forward(*call)
        finally:
            self._in_method.append(time.perf_counter() - started)

    def take_in_method(self) -> list[float]:
        out, self._in_method = self._in_method, []
        return out

    def compute_only(self, call: tuple, repeats: int) -> float:
        """Median seconds of the grouped expert compute alone on ``call``'s inputs: no wire, no bookkeeping."""
        epoch, layer, x, *pairs = call
        x_TH, pairs = unpack(x, self.device), pairs_on(self.device, *pairs)
        weights = self._epochs[epoch][1][layer]
        return _timed(lambda: grouped_experts(x_TH, *pairs, weights, self.spec.activation), repeats)

    def noop(self, *call) -> None:
        """A WorkerCall's six arguments, deserialized and dropped: the round trip with forward's arguments."""
        return None

    def echo(self, payload: tuple) -> WireTensor:
        """The payload's x untouched: the object-store path's bare round trip."""
        return payload[0]

    def echo_compiled(self, call: tuple | None) -> WireTensor | None:
        """``echo`` for a compiled graph (``forward_compiled``'s payload: a WorkerCall's fields as a tuple)."""
        return None if call is None else WorkerCall(*call).x_TH


def _layer_checkpoint(path: str) -> str:
    config = transformers.MixtralConfig(vocab_size=256, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                        num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                                        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    save_random_checkpoint(config, path, seed=0)
    return path


def _timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _routing(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_TH = torch.randn(tokens, HIDDEN, generator=g)
    probs = torch.softmax(torch.randn(tokens, EXPERTS, generator=g), dim=-1)
    weights_TK, index_TK = torch.topk(probs, TOP_K, dim=-1)
    return x_TH, index_TK, weights_TK / weights_TK.sum(dim=-1, keepdim=True)


def run_layer_bench(tokens: list[int], workers: int = 2, repeats: int = 10,
                    breakdown_tokens: tuple[int, ...] = (1,)) -> list[dict]:
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = _layer_checkpoint(tmp)
        info = inspect_checkpoint(path)
        plan = static_plan("contiguous", num_layers=1, num_experts=EXPERTS, num_workers=workers)
        # NOTE: max_concurrency as the engine starts them: a compiled graph's loop runs on Ray's system thread.
        worker_cls = ray.remote(BenchWorker).options(num_cpus=0, max_concurrency=4)
        largest = max(*tokens, *breakdown_tokens)  # the data ports take calls of up to this many tokens
        actors = [worker_cls.remote(worker_index=w, checkpoint_path=path, spec=info.spec,
                                    sources=info.index.experts, experts_per_layer=plan.experts_of(w),
                                    dtype=torch.float32, num_threads=1, max_forward_tokens=largest)
                  for w in range(workers)]
        ray.get([a.ping.remote() for a in actors])
        dispatch = ExpertDispatcher(plan, ObjectStoreTransport(actors))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        experts = hf.model.layers[0].mlp.experts
        implementations = ["eager"] + [name for name in ALL_EXPERTS_FUNCTIONS if name != "moeray"]

        print(f"MoE layer H={HIDDEN} I={INTERMEDIATE} E={EXPERTS} top-{TOP_K} float32; moeray: {workers} workers x 1 "
              f"thread; transformers {transformers.__version__} in-process: {torch.get_num_threads()} threads")
        for t in breakdown_tokens:
            x_TH, index_TK, weights_TK = _routing(t, seed=t)
            if t == 1:  # one token, an expert on each of the first two workers: the case of part 3 of the issue
                index_TK = torch.tensor([[0, EXPERTS - 1]])
            costs = fixed_costs(dispatch, actors, x_TH, index_TK, weights_TK, repeats=max(50, 20 * repeats))
            rows.append({"tokens": t, "breakdown": costs})
            print_fixed_costs(t, costs)
        for t in tokens:
            x_TH, index_TK, weights_TK = _routing(t, seed=t)
            reps = max(2, repeats if t <= 256 else repeats // 3)
            moeray_s = _timed(lambda: dispatch(0, x_TH, index_TK, weights_TK), reps)
            in_process = {}
            with torch.no_grad():
                for name in implementations:
                    experts.config._experts_implementation = name
                    try:
                        in_process[name] = _timed(lambda: experts(x_TH, index_TK, weights_TK), reps)
                    except Exception as e:  # noqa: BLE001 - an implementation that needs a GPU or a hub kernel
                        print(f"  T={t}: transformers '{name}' unavailable on CPU ({type(e).__name__})")
            best_name = min(in_process, key=in_process.get)
            # The floor: the same per-worker payloads, echoed by the same actors, no compute.
            payloads = _payloads(dispatch, x_TH, index_TK)
            floor_s = _timed(lambda: ray.get([actors[w].echo.remote(p) for w, p in payloads]), reps)
            compiled_s, spinning_s, compiled_floor_s = _compiled_path(plan, actors, x_TH, index_TK, weights_TK, reps)
            collective_s, collective_floor_s = _socket_path(CollectiveTransport, plan, actors, x_TH, index_TK,
                                                            weights_TK, reps)
            tcp_s, tcp_floor_s = _socket_path(TcpTransport, plan, actors, x_TH, index_TK, weights_TK, reps)
            row = {
                "tokens": t,
                "moeray_tok_s": t / moeray_s,
                **{f"hf_{n}_tok_s": t / s for n, s in in_process.items()},
                "hf_best": best_name,
                "ratio_vs_best": in_process[best_name] / moeray_s,
                "ratio_vs_eager": in_process["eager"] / moeray_s,
                "floor_ms": floor_s * 1e3,
                "overhead_ms": (moeray_s - in_process[best_name]) * 1e3,
            }
            row["overhead_over_floor"] = row["overhead_ms"] / row["floor_ms"]
            row.update({
                "store_ms": moeray_s * 1e3,
                "store_x_floor": moeray_s / floor_s,
                "compiled_tok_s": t / compiled_s,
                "compiled_ms": compiled_s * 1e3,
                "compiled_floor_ms": compiled_floor_s * 1e3,
                "compiled_x_floor": compiled_s / compiled_floor_s,
                "compiled_overhead_ms": (compiled_s - in_process[best_name]) * 1e3,
                "compiled_vs_store": moeray_s / compiled_s,
                "compiled_spinning_ms": spinning_s * 1e3,
            })
            row["compiled_overhead_over_floor"] = row["compiled_overhead_ms"] / row["compiled_floor_ms"]
            row.update({"collective_tok_s": t / collective_s, "collective_ms": collective_s * 1e3,
                        "collective_floor_ms": collective_floor_s * 1e3,
                        "collective_x_floor": collective_s / collective_floor_s,
                        "collective_vs_store": moeray_s / collective_s})
            row.update({"tcp_tok_s": t / tcp_s, "tcp_ms": tcp_s * 1e3, "tcp_floor_ms": tcp_floor_s * 1e3,
                        "tcp_x_floor": tcp_s / tcp_floor_s, "tcp_vs_store": moeray_s / tcp_s})
            rows.append(row)
            hf_cols = "  ".join(f"hf[{n}] {t / s:9.0f}" for n, s in in_process.items())
            print(f"T={t:5d}  moeray {row['moeray_tok_s']:9.0f} tok/s  {hf_cols}  "
                  f"moeray/hf[{best_name}] {row['ratio_vs_best']:.2f}x  moeray/hf[eager] {row['ratio_vs_eager']:.2f}x  "
                  f"floor {row['floor_ms']:.2f} ms  overhead {row['overhead_ms']:.2f} ms "
                  f"({row['overhead_over_floor']:.2f}x floor)")
            print(f"         per layer: object store {row['store_ms']:.2f} ms = {row['store_x_floor']:.2f}x its floor "
                  f"{row['floor_ms']:.2f} ms | compiled graph {row['compiled_ms']:.2f} ms "
                  f"({row['compiled_tok_s']:.0f} tok/s) = {row['compiled_x_floor']:.2f}x its floor "
                  f"{row['compiled_floor_ms']:.2f} ms, overhead {row['compiled_overhead_ms']:.2f} ms "
                  f"({row['compiled_overhead_over_floor']:.2f}x floor) | compiled vs object store "
                  f"{row['compiled_vs_store']:.2f}x | compiled, spinning read (no poll backoff) "
                  f"{row['compiled_spinning_ms']:.2f} ms")
            print(f"         per layer: collective {row['collective_ms']:.2f} ms ({row['collective_tok_s']:.0f} tok/s) "
                  f"= {row['collective_x_floor']:.2f}x its floor {row['collective_floor_ms']:.2f} ms | collective vs "
                  f"object store {row['collective_vs_store']:.2f}x")
            print(f"         per layer: tcp {row['tcp_ms']:.2f} ms ({row['tcp_tok_s']:.0f} tok/s) = "
                  f"{row['tcp_x_floor']:.2f}x its floor {row['tcp_floor_ms']:.2f} ms | tcp vs object store "
                  f"{row['tcp_vs_store']:.2f}x")
        for a in actors:
            ray.kill(a)
    return rows


def _compiled_path(plan, actors: list, x_TH: torch.Tensor, index_TK: torch.Tensor, weights_TK: torch.Tensor,
                   reps: int) -> tuple[float, float, float]:
    """Seconds per layer through a compiled graph over the workers (as the engine runs it, and with the router
    spinning on the channel read instead of backing off first), and the floor: a compiled graph of ``echo_compiled``
    nodes sent the same per-worker payloads (the calls the dispatcher makes), read spinning (its fastest: there is
    no compute to steal cores from). One graph at a time; the first calls compile and fault in the channels' fresh
    shared memory, and the backoff's estimate settles after them, so each is warmed up for ``WARMUP_COMPILED``."""
    seconds = []
    for backoff in (POLL_BACKOFF, 0.0):
        dispatch = ExpertDispatcher(plan, CompiledGraphTransport(actors, poll_backoff=backoff))
        try:
            seconds.append(_timed(lambda: dispatch(0, x_TH, index_TK, weights_TK), reps, WARMUP_COMPILED))
        finally:
            dispatch.transport.close()
    echo = CompiledGraphTransport(actors, method="echo_compiled", poll_backoff=0.0)
    calls = _calls(dispatch, x_TH, index_TK, weights_TK)
    try:
        floor_s = _timed(lambda: echo.send(calls), reps, WARMUP_COMPILED)
    finally:
        echo.close()
    return seconds[0], seconds[1], floor_s


def _socket_path(transport_cls, plan, actors: list, x_TH: torch.Tensor, index_TK: torch.Tensor,
                 weights_TK: torch.Tensor, reps: int) -> tuple[float, float]:
    """Seconds per layer through ``transport_cls`` (``CollectiveTransport``: a gloo group over this process, rank
    0, and the workers; ``TcpTransport``: a connection from this process to each worker), and its floor: the same
    per-worker calls echoed (``round_trip_call``), no compute. The first send builds the group or opens the
    connections (its warmup)."""
    dispatch = ExpertDispatcher(plan, transport_cls(actors))
    try:
        seconds = _timed(lambda: dispatch(0, x_TH, index_TK, weights_TK), reps, warmup=2)
    finally:
        dispatch.transport.close()
    echo = transport_cls(actors, method="round_trip_call")
    calls = _calls(dispatch, x_TH, index_TK, weights_TK)
    try:
        floor_s = _timed(lambda: echo.send(calls), reps, warmup=2)
    finally:
        echo.close()
    return seconds, floor_s


def _calls(dispatch: ExpertDispatcher, x_TH: torch.Tensor, index_TK: torch.Tensor,
           weights_TK: torch.Tensor) -> dict[int, WorkerCall]:
    """The per-worker calls ``dispatch`` makes for this layer, captured on the way to a transport that only records."""
    captured: dict[int, WorkerCall] = {}

    class _Record:
        def send(self, calls):
            captured.update(calls)
            return Sent({w: pack(x_TH[: len(c.x_TH.array)]) for w, c in calls.items()})

    transport, dispatch.transport = dispatch.transport, _Record()
    try:
        dispatch(0, x_TH, index_TK, weights_TK)
    finally:
        dispatch.transport = transport
    return captured


def _payloads(dispatch: ExpertDispatcher, x_TH: torch.Tensor, index_TK: torch.Tensor) -> list[tuple[int, tuple]]:
    """Per touched worker, arrays of the sizes dispatch sends it (x rows and the pair arrays)."""
    worker_N = dispatch.plan.slot_worker_LP[0][dispatch.plan.log2phy_LER[0, index_TK.reshape(-1), 0]]
    token_N = torch.arange(x_TH.shape[0]).repeat_interleave(index_TK.shape[1])
    out = []
    for w in worker_N.unique().tolist():
        sel = worker_N == w
        rows = token_N[sel].unique()
        n = int(sel.sum())
        out.append((w, (pack(x_TH[rows]), np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.float32))))
    return out


def fixed_costs(dispatch: ExpertDispatcher, actors: list, x_TH: torch.Tensor, index_TK: torch.Tensor,
                weights_TK: torch.Tensor, repeats: int) -> dict[str, float]:
    """Milliseconds (medians over ``repeats`` layer calls) of each part of one layer on the object-store path; see
    the module docstring. The transport's share is the wait less the slowest worker's time in ``forward``."""
    transport: ObjectStoreTransport = dispatch.transport
    calls = _calls(dispatch, x_TH, index_TK, weights_TK)
    for _ in range(max(5, repeats // 10)):  # warm-up
        dispatch(0, x_TH, index_TK, weights_TK)
    ray.get([a.take_in_method.remote() for a in actors])
    parts: dict[str, list[float]] = {k: [] for k in ("layer", "prepare", "submit", "wait", "combine")}
    for _ in range(repeats):
        t0, s0, w0 = dispatch.times, transport.submit_s, transport.wait_s
        dispatch.times = type(t0)()
        started = time.perf_counter()
        dispatch(0, x_TH, index_TK, weights_TK)
        parts["layer"].append(time.perf_counter() - started)
        parts["prepare"].append(dispatch.times.prepare_s)
        parts["submit"].append(transport.submit_s - s0)
        parts["wait"].append(transport.wait_s - w0)
        parts["combine"].append(dispatch.times.combine_s)
    in_method = [statistics.median(ts) for ts in ray.get([actors[w].take_in_method.remote() for w in calls])]
    compute = ray.get([actors[w].compute_only.remote(tuple(c), repeats) for w, c in calls.items()])
    slowest = max(range(len(calls)), key=lambda i: in_method[i])
    noop_s = _timed(lambda: ray.get([actors[w].noop.remote(*c) for w, c in calls.items()]), repeats, 5)
    # the floor: the call as one argument, its x returned (echo_compiled's payload is a plain tuple, on any path)
    echo_s = _timed(lambda: ray.get([actors[w].echo_compiled.remote(tuple(c)) for w, c in calls.items()]), repeats,
                    5)
    med = {k: statistics.median(v) for k, v in parts.items()}
    out = {**med, "workers": len(calls), "worker_in_method": in_method[slowest],
           "worker_compute": compute[slowest], "worker_bookkeeping": in_method[slowest] - compute[slowest],
           "transport": med["wait"] + med["submit"] - in_method[slowest], "noop_six_args": noop_s, "floor": echo_s}
    return {k: (v if k == "workers" else v * 1e3) for k, v in out.items()}


def print_fixed_costs(tokens: int, c: dict[str, float]) -> None:
    print(f"T={tokens:5d}  fixed costs of one layer, object store, {c['workers']} workers touched (medians, ms):")
    print(f"         layer {c['layer']:.3f} = router prepare {c['prepare']:.3f} + submit {c['submit']:.3f} + wait "
          f"{c['wait']:.3f} + combine {c['combine']:.3f}")
    print(f"         submit + wait {c['submit'] + c['wait']:.3f} = slowest worker in forward "
          f"{c['worker_in_method']:.3f} (compute {c['worker_compute']:.3f}, bookkeeping "
          f"{c['worker_bookkeeping']:.3f}) + transport {c['transport']:.3f} (Ray: serialization, moves, scheduling)")
    print(f"         bare round trips: no-op with forward's six arguments {c['noop_six_args']:.3f}, echo of one "
          f"argument (floor) {c['floor']:.3f}; layer / floor {c['layer'] / c['floor']:.2f}x")
