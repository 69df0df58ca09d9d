"""The automatic prefill budget (moeray/router/prefill_budget.py), over step costs recorded from a model of this
machine's medium checkpoint (issue 32's measurement: a 106 ms decode step at 16 streams, 735 ms with a 768-token
prompt in it, so 0.82 ms a prompt token), with noise; and a closed loop where each step's cost follows the budget."""

from __future__ import annotations

import random

import pytest

from moeray.router.prefill_budget import PrefillBudget

DECODE_S, PER_TOKEN_S = 0.106, (0.735 - 0.106) / 768


def step_s(prompt_tokens: int, rng: random.Random) -> float:
    return (DECODE_S + PER_TOKEN_S * prompt_tokens) * rng.uniform(0.9, 1.1)


def test_the_budget_holds_a_step_to_twice_a_decode_step():
    rng, rule = random.Random(0), PrefillBudget(ceiling=8000)
    for _ in range(20):
        rule.observe(16, 0, step_s(0, rng))
    assert rule.budget(16) == rule.start, "nothing measured yet: a small first chunk"
    worst = 0.0
    for _ in range(60):  # a long prompt arrives, chunk by chunk at the rule's budget, between decode steps
        chunk = rule.budget(16)
        took = step_s(chunk, rng)
        rule.observe(16, chunk, took)
        rule.observe(16, 0, step_s(0, rng))
        worst = max(worst, took)
    ideal = DECODE_S / PER_TOKEN_S  # (2 - 1) * t_decode / b
    assert 0.8 * ideal < rule.budget(16) < 1.2 * ideal, (rule.budget(16), ideal)
    assert worst <= 2.0 * 1.1 * 1.1 * DECODE_S, "no step past twice a decode step (and the noise)"


def test_nothing_running_gets_the_ceiling_and_the_floor_always_moves_a_prompt():
    rule = PrefillBudget(ceiling=2048, floor=16)
    assert rule.budget(0) == 2048, "no stream to stall"
    for _ in range(10):
        rule.observe(16, 0, 0.010)
        rule.observe(16, 64, 0.010 + 64 * 0.01)  # a prompt token costs a whole decode step: 1 token allowed
    assert rule.budget(16) == 16, "the floor"
    rule.observe(0, 2048, 5.0)  # a prefill with nothing running stalled no one: not a measurement of the cost
    assert rule.budget(16) == 16 and rule.seconds_per_token() == pytest.approx(0.01)


def test_free_looking_prefill_grows_the_budget_until_it_shows_a_cost():
    rule = PrefillBudget(ceiling=4096, start=64)
    for _ in range(5):
        rule.observe(8, 0, 0.020)
    budgets = []
    for _ in range(8):
        chunk = rule.budget(8)
        budgets.append(chunk)
        rule.observe(8, chunk, 0.020 if chunk < 1000 else 0.020 + chunk * 1e-4)
    assert budgets[:5] == [64, 128, 256, 512, 1024], budgets
    assert budgets[-1] < 1024, "then the cost shows and the slope decides"


@pytest.mark.parametrize("kwargs,message", [({"ceiling": 8, "floor": 16}, "floor 16 must lie in"),
                                            ({"ceiling": 100, "target_ratio": 1.0}, "target_ratio 1.0 must be above 1")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefillBudget(**kwargs)


def test_a_slope_from_small_chunks_is_not_extrapolated_to_a_whole_prompt():
    """Streams that arrived 16 prompt tokens at a time give a noisy slope; the long prompt after them is let in by
    doubling from what was measured, never in one step."""
    rng, rule = random.Random(2), PrefillBudget(ceiling=8000)
    for _ in range(20):
        rule.observe(16, 0, step_s(0, rng))
        rule.observe(16, 16, step_s(0, rng))  # 16 tokens' cost is within the noise: the slope says ~free
    assert rule.budget(16) == 32
    chunks = []
    for _ in range(4):
        chunks.append(rule.budget(16))
        rule.observe(16, chunks[-1], step_s(chunks[-1], rng))
    assert chunks[:3] == [32, 64, 128] and chunks[3] < 160, chunks
