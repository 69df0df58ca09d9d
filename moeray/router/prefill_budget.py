"""The automatic prefill budget: how many prompt tokens a step may add beside the running streams' next tokens.

A step's prompt tokens delay every running stream's next token by the time they take. The rule measures that,
as the router runs, and keeps it under a target: a step with prefill may take at most ``target_ratio`` times a
decode step. From the recent steps it knows

- ``t_decode``: the median duration of recent decode-only steps, what a stream's gap is when nothing arrives;
- ``b``: the seconds each prompt token adds to a step, the least-squares slope (through the origin) of the prefill
  steps' extra time over ``t_decode`` against their prompt tokens (the chunks within 4x of the largest measured);

and allows ``(target_ratio - 1) * t_decode / b`` prompt tokens, within ``[floor, ceiling]``. The floor keeps a long
prompt moving however busy the batch is; the ceiling is what one forward may carry. With no stream running there
is nothing to stall and a prompt gets the ceiling; before a prefill step has been measured, ``start``, small, so the
first measurement costs the streams little. It never grows past twice the largest chunk measured beside streams, so
it reaches a large budget by doubling, each step measured, rather than by extrapolating a slope fitted on small
ones. Pure: the scheduler tells it each step (``observe``) and asks it
before each (``budget``); `--max-prefill-tokens` replaces it with a fixed number.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics


FLOOR = 16  # prompt tokens a step may always carry: a long prompt moves however busy the batch is


@dataclasses.dataclass
class PrefillBudget:
    ceiling: int  # the most prompt tokens one step may carry (max_forward_tokens less the batch's decode tokens)
    target_ratio: float = 2.0  # a step with prefill may take this many decode steps' time
    floor: int = FLOOR
    start: int = 64
    window: int = 64  # steps remembered, of each kind

    def __post_init__(self) -> None:
        if not 1 <= self.floor <= self.ceiling:
            raise ValueError(f"prefill budget floor {self.floor} must lie in [1, ceiling {self.ceiling}]")
        if self.target_ratio <= 1:
            raise ValueError(f"target_ratio {self.target_ratio} must be above 1 (a prefill step costs something)")
        self._decode_s: collections.deque[float] = collections.deque(maxlen=self.window)
        self._prefill: collections.deque[tuple[int, float]] = collections.deque(maxlen=self.window)

    def observe(self, decodes: int, prompt_tokens: int, seconds: float) -> None:
        """One step: its running streams' tokens, its prompt tokens, and how long it took."""
        if prompt_tokens == 0:
            if decodes:
                self._decode_s.append(seconds)
        elif decodes:  # a prefill beside running streams: what it cost them (alone, it stalled no one)
            self._prefill.append((prompt_tokens, seconds))

    def seconds_per_token(self) -> float | None:
        """``b``: what one prompt token adds to a step; None until a prefill step beside streams is measured, 0 when
        the prefill steps measured took no longer than decode steps (noise hides their cost)."""
        if not self._decode_s or not self._prefill:
            return None
        t_decode = statistics.median(self._decode_s)
        largest = max(p for p, _ in self._prefill)
        # the chunks within 4x of the largest: a small chunk's extra time is mostly noise
        fit = [(p, t) for p, t in self._prefill if 4 * p >= largest]
        num = sum(p * (t - t_decode) for p, t in fit)
        den = sum(p * p for p, _ in fit)
        return max(num / den, 0.0)

    def budget(self, decoding: int) -> int:
        """Prompt tokens the next step may carry beside ``decoding`` running streams."""
        if decoding == 0:
            return self.ceiling
        per_token = self.seconds_per_token()
        if per_token is None:
            allowed = self.start
        else:
            # NOTE: never past twice the largest prompt chunk measured: a slope fitted on small chunks is mostly
            # noise, and extrapolated it let a whole 768-token prompt into one step (7.5x the decode gap, measured)
            grown = 2 * max(p for p, _ in self._prefill)
            allowed = grown if per_token == 0 else \
                min((self.target_ratio - 1) * statistics.median(self._decode_s) / per_token, grown)
        return int(min(max(allowed, self.floor), self.ceiling))
