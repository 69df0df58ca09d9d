"""How a router's KV cache is sized and used: one typed record from the CLI or serve config to every router."""

from __future__ import annotations

import dataclasses

import torch

from moeray.placement.algorithms.topology import parse_bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCacheConfig:
    # The KV pool's size: bytes ('8GiB', '512MB', an integer), or a fraction 0 < f <= 1 of the device's free memory
    # once the router's weights are loaded (a GPU's, or on a CPU the node's available memory). None: room for
    # DEFAULT_TOKENS_PER_SEQUENCE tokens per batch slot.
    memory: str | int | float | None = None
    block_size: int = 16  # token positions per KV block
    # Prompt tokens a step may prefill beside its running sequences' next tokens. None: chosen each step from measured
    # step costs, so that no running stream's gap passes twice a decode step (moeray/router/prefill_budget.py).
    max_prefill_tokens: int | None = None
    prefix_caching: bool = True  # share full blocks between sequences with the same prefix

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"kv block_size must be >= 1; got {self.block_size}")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1; got {self.max_prefill_tokens}")
        fraction = self._fraction()
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"kv cache memory fraction {self.memory!r} must be in (0, 1]")
        if fraction is None and self.memory is not None and parse_bytes(self.memory) <= 0:
            raise ValueError(f"kv cache memory {self.memory!r} must be positive")

    def _fraction(self) -> float | None:
        """The memory setting as a fraction, or None when it is a size in bytes (or unset)."""
        if isinstance(self.memory, float) or (isinstance(self.memory, str) and "." in self.memory
                                              and not any(c.isalpha() for c in self.memory)):
            return float(self.memory)
        return None

    def fixed_bytes(self) -> int | None:
        """The pool's size when it is given in bytes; None when it is a fraction or unset."""
        if self.memory is None or self._fraction() is not None:
            return None
        return parse_bytes(self.memory)

    def pool_bytes(self, device: torch.device) -> int | None:
        """The pool's size in bytes on ``device`` (None: the scheduler's default)."""
        fraction = self._fraction()
        if fraction is None:
            return self.fixed_bytes()
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
        else:
            free = _available_host_memory()
        return int(free * fraction)


def _available_host_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line: give kv cache memory in bytes on this host")
