"""Load traces: what the offline simulator replays, read from JSON Lines files or synthesised from a seed.

Shape legend: N windows, L MoE layers, E logical experts.

The file format is JSON Lines with no header: every non-blank line is one window,

    {"window": 0, "load": [[tokens of expert 0, expert 1, ...], ...one list per MoE layer]}

``window`` (optional) is the window's index; ``load`` holds non-negative integers, with the same layer and expert
counts on every line: the ``[L, E]`` expert counts ``Engine.take_load()`` returns, one window per call.

The placement controller writes the same format (``trace_path`` in its config), one line per closed window, with
more keys the simulator reads back: ``time_s`` (seconds since the controller started, when the window closed; for
``rebalance_interval_s``), and what the controller decided on it: ``epoch`` (of the plan the window was judged
under), ``imbalance``, ``trigger`` (the reason, "" for none), ``applied``, and the routers' ``queue``.

Synthetic kinds (each deterministic for a seed; tokens are sampled multinomially, ``tokens x top_k`` (token,
expert) pairs per layer and window, so one token may count twice for one expert):

- ``zipf``: expert load ∝ rank^-s, the ranks randomly permuted per layer and fixed for the trace.
- ``drifting``: the same Zipf law, but every ``drift_every`` windows ``drift_experts`` experts of each layer's hot
  set (the top eighth of the ranks) swap ranks with random colder experts: the hot set drifts.
- ``bursty``: the Zipf law plus bursts: a window starts one with probability ``burst_prob``, and for
  ``burst_len`` windows ``burst_experts`` random experts of every layer get ``burst_factor`` times their weight.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch

KINDS = ("zipf", "drifting", "bursty")


class TraceError(ValueError):
    """A trace file that does not follow the format; the message names the file, the line and the bad value."""


def _check_count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceError(f"{where}: token count {value!r} is not an integer")
    if value < 0:
        raise TraceError(f"{where}: token count {value} is negative")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class TraceWindow:
    load_LE: torch.Tensor  # int64 tokens per (layer, expert)
    time_s: float | None = None  # when the window closed (controller traces)
    recorded: dict = dataclasses.field(default_factory=dict)  # the controller's decision keys, when it wrote it


def parse_window(line: str, *, where: str, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """One trace line -> ``load_LE`` (int64). ``shape``, when given, is the (layers, experts) it must have."""
    return parse_line(line, where=where, shape=shape).load_LE


def parse_line(line: str, *, where: str, shape: tuple[int, int] | None = None) -> TraceWindow:
    """One trace line -> its window, with the controller's keys when present."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or "load" not in obj:
        raise TraceError(f"{where}: expected an object with a 'load' key, got {line.strip()[:80]!r}")
    window = obj.get("window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise TraceError(f"{where}: 'window' {window!r} is not an integer")
    load = obj["load"]
    if not isinstance(load, list) or not load or not all(isinstance(row, list) for row in load):
        raise TraceError(f"{where}: 'load' must be a non-empty list of per-layer lists of token counts")
    num_experts = len(load[0])
    if num_experts == 0:
        raise TraceError(f"{where}: layer 0 has no experts")
    for l, row in enumerate(load):
        if len(row) != num_experts:
            raise TraceError(f"{where}: layer {l} has {len(row)} experts but layer 0 has {num_experts}")
        for e, value in enumerate(row):
            _check_count(value, f"{where}: layer {l}, expert {e}")
    if shape is not None and (len(load), num_experts) != shape:
        raise TraceError(f"{where}: {len(load)} layers x {num_experts} experts, but earlier lines have "
                         f"{shape[0]} layers x {shape[1]} experts")
    time_s = obj.get("time_s")
    if time_s is not None and (isinstance(time_s, bool) or not isinstance(time_s, (int, float)) or time_s < 0):
        raise TraceError(f"{where}: 'time_s' {time_s!r} is not a number of seconds >= 0")
    recorded = {k: v for k, v in obj.items() if k not in ("window", "load", "time_s")}
    return TraceWindow(load_LE=torch.tensor(load, dtype=torch.long), time_s=time_s, recorded=recorded)


def iter_trace_windows(path: str | os.PathLike) -> Iterator[TraceWindow]:
    """Yield each window as its line is read; raise ``TraceError`` naming the line."""
    shape = None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            window = parse_line(line, where=f"{path}, line {lineno}", shape=shape)
            shape = tuple(window.load_LE.shape)
            yield window


def iter_trace(path: str | os.PathLike) -> Iterator[torch.Tensor]:
    """Yield each window's ``load_LE`` (int64) as its line is read; raise ``TraceError`` naming the line."""
    for window in iter_trace_windows(path):
        yield window.load_LE


def read_trace_windows(path: str | os.PathLike) -> list[TraceWindow]:
    """Every window of a trace file with its time and recorded decision, validated; an empty file is an error."""
    windows = list(iter_trace_windows(path))
    if not windows:
        raise TraceError(f"{path}: the trace holds no window")
    return windows


def read_trace(path: str | os.PathLike) -> list[torch.Tensor]:
    """Every window's ``load_LE`` of a trace file, validated; an empty file is an error."""
    return [w.load_LE for w in read_trace_windows(path)]


def trace_line(window: int, load_LE, **extra) -> str:
    """One window as a trace line (with its newline); ``extra`` keys (``time_s``, the decision) are written too."""
    load = np.asarray(torch.as_tensor(load_LE).cpu()).tolist()
    return json.dumps({"window": window, "load": load, **extra}, separators=(",", ":")) + "\n"


def write_trace(path: str | os.PathLike, windows: Iterable) -> int:
    """Write ``[L, E]`` loads (tensors, arrays or nested lists), one line per window; return the window count."""
    count, shape = 0, None
    with open(path, "w", encoding="utf-8") as f:
        for i, load in enumerate(windows):
            load_LE = np.asarray(torch.as_tensor(load).cpu())
            if load_LE.ndim != 2 or (shape is not None and load_LE.shape != shape):
                raise TraceError(f"window {i}: load shape {load_LE.shape} is not [layers, experts] "
                                 f"{'' if shape is None else shape}")
            if not np.issubdtype(load_LE.dtype, np.integer) or (load_LE < 0).any():
                raise TraceError(f"window {i}: token counts must be non-negative integers")
            shape = load_LE.shape
            f.write(json.dumps({"window": i, "load": load_LE.tolist()}, separators=(",", ":")) + "\n")
            count += 1
    return count


def _zipf_weights(rng: np.random.Generator, num_layers: int, num_experts: int, s: float) -> np.ndarray:
    """[L, E] weights: expert e of layer l gets rank_l(e)^-s, rank_l a random permutation of 1..E."""
    law_E = np.arange(1, num_experts + 1, dtype=np.float64) ** -s
    return np.stack([law_E[rng.permutation(num_experts)] for _ in range(num_layers)])


def _sample(rng: np.random.Generator, weights_LE: np.ndarray, draws: int) -> np.ndarray:
    return rng.multinomial(draws, weights_LE / weights_LE.sum(axis=1, keepdims=True)).astype(np.int64)


def synthesize(
    kind: str,
    *,
    num_layers: int,
    num_experts: int,
    num_windows: int,
    tokens: int,
    top_k: int,
    seed: int = 0,
    s: float = 1.0,
    drift_every: int = 4,
    drift_experts: int = 2,
    burst_prob: float = 0.15,
    burst_len: int = 3,
    burst_experts: int = 4,
    burst_factor: float = 8.0,
) -> list[torch.Tensor]:
    """``num_windows`` loads ``[L, E]`` (int64) of the given kind (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"trace kind {kind!r} is not one of {KINDS}")
    for name, value in (("layers", num_layers), ("experts", num_experts), ("windows", num_windows),
                        ("tokens", tokens), ("top_k", top_k), ("drift_every", drift_every),
                        ("burst_len", burst_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    if top_k > num_experts:
        raise ValueError(f"top_k {top_k} exceeds the {num_experts} experts")
    if s < 0:
        raise ValueError(f"the Zipf exponent s must be >= 0; got {s}")
    if not 0 <= burst_prob <= 1:
        raise ValueError(f"burst_prob must lie in [0, 1]; got {burst_prob}")
    rng = np.random.default_rng(seed)
    draws = tokens * top_k
    # 1. The per-layer Zipf law (ranks permuted per layer).
    weights_LE = _zipf_weights(rng, num_layers, num_experts, s)
    hot = max(1, num_experts // 8)
    bursts: list[tuple[int, np.ndarray]] = []  # (last window of the burst, [L, burst_experts] expert ids)
    out = []
    for w in range(num_windows):
        window_LE = weights_LE
        # 2. Drift: a few hot experts trade ranks (weights) with colder ones, for good.
        if kind == "drifting" and w > 0 and w % drift_every == 0:
            for l in range(num_layers):
                order = np.argsort(-weights_LE[l], kind="stable")
                for _ in range(min(drift_experts, hot, num_experts - hot)):
                    a, b = order[rng.integers(hot)], order[hot + rng.integers(num_experts - hot)]
                    weights_LE[l, [a, b]] = weights_LE[l, [b, a]]
                    order = np.argsort(-weights_LE[l], kind="stable")
            window_LE = weights_LE
        # 3. Bursts: a random expert set gets a multiplier for a few windows.
        if kind == "bursty":
            if rng.random() < burst_prob:
                k = min(burst_experts, num_experts)
                bursts.append((w + burst_len - 1, np.stack([rng.choice(num_experts, k, replace=False)
                                                            for _ in range(num_layers)])))
            bursts = [(end, ids) for end, ids in bursts if end >= w]
            window_LE = weights_LE.copy()
            for _, ids_LK in bursts:
                np.put_along_axis(window_LE, ids_LK, np.take_along_axis(window_LE, ids_LK, 1) * burst_factor, 1)
        # 4. Tokens: tokens x top_k (token, expert) pairs per layer.
        out.append(torch.from_numpy(_sample(rng, window_LE, draws)))
    return out


def top_share(load_LE: torch.Tensor) -> float:
    """Mean over layers of the hottest expert's share of the layer's tokens."""
    load_LE = torch.as_tensor(load_LE, dtype=torch.float64)
    return float((load_LE.max(dim=1).values / load_LE.sum(dim=1).clamp(min=1)).mean())


def gate_choices(load_LE, tokens: int, top_k: int, seed: int = 0) -> np.ndarray:
    """``[L, tokens, top_k]`` expert ids as a gate would pick them from a layer's expert popularity ``load_LE``: each
    token's top-k of log-popularity plus Gumbel noise, in rank order, so a hot expert is most often a first choice (as in
    a trained router) and each expert's share of the pairs follows ``load_LE``. For pair-level replays of a trace
    (moeray.placement.offline.simulator.realized_load_LW), where the rank a pair has decides nothing only if the
    replica rule is right."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    L, E = load_LE.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must lie in [1, {E}]; got {top_k}")
    rng = np.random.default_rng(seed)
    out = np.empty((L, tokens, top_k), dtype=np.int64)
    for l in range(L):
        score_TE = np.log(np.maximum(load_LE[l], 1e-9)) + rng.gumbel(size=(tokens, E))
        top_TK = np.argpartition(-score_TE, top_k - 1, axis=1)[:, :top_k]
        rank_TK = np.argsort(-np.take_along_axis(score_TE, top_TK, 1), axis=1)
        out[l] = np.take_along_axis(top_TK, rank_TK, 1)
    return out
