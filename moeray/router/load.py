"""The router's load counter: tokens per (MoE layer, logical expert) and per (layer, worker), step by step.

Dispatch counts into the open step; the end of each forward closes it into a step record. The placement
controller pulls the closed records in batches (``take``), so counting never waits on the controller. Optionally
(``track_tokens``) it also counts which token ids each expert receives, for ``moeray placement inspect``.

Shape legend: L MoE layers, E logical experts, W workers, N (token, expert) pairs.
"""

from __future__ import annotations

import collections
import threading

import numpy as np

MAX_PENDING_STEPS = 4096  # beyond this, unpulled step records are merged pairwise (totals stay exact)


class LoadCounter:
    def __init__(self, *, num_layers: int, num_experts: int, num_workers: int, track_tokens: bool = False) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        self.track_tokens = track_tokens
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[np.ndarray, np.ndarray]] = collections.deque()
        self._token_counts: collections.Counter[tuple[int, int, int]] = collections.Counter()
        # step records closed so far: once the controller has pulled them all it counts as many (fewer only if more
        # than MAX_PENDING_STEPS waited unpulled and were merged)
        self.closed_steps = 0
        self.resize(num_workers)

    def resize(self, num_workers: int) -> None:
        """The plan's worker count changed: close the open step, count into new per-worker rows."""
        with self._lock:
            self._close()
            self.num_workers = num_workers
            self._expert_LE = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
            self._worker_LW = np.zeros((self.num_layers, num_workers), dtype=np.int64)

    def count(self, layer: int, pair_expert_N: np.ndarray, pair_worker_N: np.ndarray,
              pair_token_id_N: np.ndarray | None = None) -> None:
        with self._lock:
            self._expert_LE[layer] += np.bincount(pair_expert_N, minlength=self.num_experts)
            self._worker_LW[layer] += np.bincount(pair_worker_N, minlength=self.num_workers)
            if self.track_tokens and pair_token_id_N is not None:
                keys_N, counts_N = np.unique(pair_expert_N.astype(np.int64) * (1 << 32) + pair_token_id_N,
                                             return_counts=True)
                for key, n in zip(keys_N.tolist(), counts_N.tolist()):
                    self._token_counts[(layer, key >> 32, key & 0xFFFFFFFF)] += n

    def end_step(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if hasattr(self, "_expert_LE") and self._expert_LE.any():
            self._pending.append((self._expert_LE.copy(), self._worker_LW.copy()))
            self.closed_steps += 1
            self._expert_LE[:] = 0
            self._worker_LW[:] = 0
            if len(self._pending) > MAX_PENDING_STEPS:
                (e0, w0), (e1, w1) = self._pending.popleft(), self._pending.popleft()
                # NOTE: across a resize the older record's worker rows no longer line up; its expert rows still do.
                self._pending.appendleft((e0 + e1, w0 + w1 if w0.shape == w1.shape else w1))

    def take(self) -> dict:
        """The closed step records since the last take, oldest first, as numpy ``(expert_LE, worker_LW)`` pairs
        under ``steps``, and the token-id counts as an [M, 4] array of (layer, expert, token id, count)."""
        with self._lock:
            pending, self._pending = list(self._pending), collections.deque()
            tokens, self._token_counts = self._token_counts, collections.Counter()
        token_M4 = np.array([(*k, n) for k, n in tokens.items()], dtype=np.int64).reshape(-1, 4)
        return {"steps": pending, "tokens": token_M4}
