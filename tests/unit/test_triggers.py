"""The rebalance and autoscale triggers as pure functions: hysteresis, schedules, cool-down, min_gain, scaling up and
down (no controller, no fakes: plain observations in, decisions and states out)."""

from __future__ import annotations

import dataclasses

import pytest

from moeray.placement.algorithms.triggers import (ApplyDecision, AutoscaleState, Proposal, QueueObservation,
                                                  RebalanceState, ScaleDecision, WindowObservation, after_rebalance,
                                                  decide_apply, decide_autoscale, decide_rebalance)
from moeray.placement.config import ControllerConfig


def run(config: ControllerConfig, imbalances: list[float], times: list[float] | None = None,
        state: RebalanceState | None = None) -> tuple[list[str], RebalanceState]:
    """The trigger over a run of windows; the reason per window ("" where it did not trigger)."""
    state = state or RebalanceState()
    reasons = []
    for i, imbalance in enumerate(imbalances):
        observation = WindowObservation(window=i, time_s=None if times is None else times[i], imbalance=imbalance)
        decision, state = decide_rebalance(state, observation, config)
        assert decision.rebalance == bool(decision.reason)
        reasons.append(decision.reason)
    return reasons, state


def test_hysteresis_needs_consecutive_hot_windows():
    config = ControllerConfig(imbalance_threshold=1.5, consecutive_windows=3)
    reasons, state = run(config, [2.0, 2.0, 1.2, 2.0, 2.0, 2.5, 2.0])
    assert [bool(r) for r in reasons] == [False, False, False, False, False, True, False]
    assert reasons[5] == "imbalance 2.500 > 1.5 for 3 windows"
    assert state.hot_windows == 1, "the count starts over after a trigger"
    # At the threshold is not above it.
    assert run(config, [1.5] * 5)[0] == [""] * 5


def test_no_threshold_and_no_schedule_never_trigger():
    assert run(ControllerConfig(), [9.0] * 10)[0] == [""] * 10


def test_schedule_in_windows_restarts_after_each_trigger_and_each_applied_rebalance():
    config = ControllerConfig(rebalance_every_windows=3)
    reasons, state = run(config, [1.0] * 7)
    assert [i for i, r in enumerate(reasons) if r] == [2, 5] and reasons[2] == "schedule"
    state = after_rebalance(state, None, config)  # e.g. a manual rebalance after window 6
    assert [i for i, r in enumerate(run(config, [1.0] * 4, state=state)[0]) if r] == [2]


def test_schedule_in_seconds_uses_the_window_times():
    config = ControllerConfig(rebalance_interval_s=10.0)
    reasons, state = run(config, [1.0] * 5, times=[4.0, 9.9, 10.0, 19.0, 20.5])
    assert [i for i, r in enumerate(reasons) if r] == [2, 4]
    assert state.last_rebalance_s == 20.5
    with pytest.raises(ValueError, match=r"rebalance_interval_s \(10.0\) needs the time each window closed; "
                                         r"window 0 has none"):
        run(config, [1.0])


def test_min_gain_and_moves_decide_whether_a_layout_is_applied():
    config = ControllerConfig(min_gain=0.05, cooldown_windows=2)
    state = RebalanceState(hot_windows=0, windows_since=4, last_rebalance_s=1.0)

    def proposal(after: float, moved: int = 3) -> Proposal:
        return Proposal(time_s=30.0, imbalance_before=2.0, imbalance_after=after, moved_slots=moved)

    verdict, same = decide_apply(state, proposal(1.95), config)
    assert verdict == ApplyDecision(apply=False, reason="expected imbalance 2.000 -> 1.950 misses min_gain 0.05")
    assert same is state, "a rebalance not applied changes nothing"
    verdict, same = decide_apply(state, proposal(1.0, moved=0), config)
    assert not verdict.apply and verdict.reason == "no slot moves" and same is state
    verdict, applied = decide_apply(state, proposal(1.9), config)  # exactly 5% better
    assert verdict.apply
    assert applied == RebalanceState(hot_windows=0, cooldown_left=2, windows_since=0, last_rebalance_s=30.0)


def test_cooldown_blocks_triggers_and_the_hysteresis_count():
    config = ControllerConfig(imbalance_threshold=1.5, consecutive_windows=2, cooldown_windows=3)
    state = after_rebalance(RebalanceState(hot_windows=1), 5.0, config)
    reasons, state = run(config, [3.0, 3.0, 3.0, 3.0, 3.0], state=state)
    # Three windows of cool-down (hot ones do not count), then two hot windows in a row.
    assert [bool(r) for r in reasons] == [False, False, False, False, True]
    no_cooldown = after_rebalance(RebalanceState(), 5.0, dataclasses.replace(config, cooldown_windows=0))
    assert [bool(r) for r in run(config, [3.0, 3.0], state=no_cooldown)[0]] == [False, True]


def test_cooldown_also_delays_the_schedule():
    config = ControllerConfig(rebalance_every_windows=2, cooldown_windows=3)
    reasons, _ = run(config, [1.0] * 6, state=after_rebalance(RebalanceState(), None, config))
    assert [i for i, r in enumerate(reasons) if r] == [3, 5], "due at window 1, held until the cool-down ends"


def scale(config: ControllerConfig, polls: list[tuple[int, int, int]], live: int) -> list[int | None]:
    """The autoscaler over polls of (waiting, running, capacity), applying each decision; targets per poll."""
    state, out = AutoscaleState(), []
    for waiting, running, capacity in polls:
        decision, state = decide_autoscale(state, QueueObservation(waiting=waiting, running=running,
                                                                   capacity=capacity, live_workers=live), config)
        out.append(decision.target_workers)
        live = decision.target_workers or live
    return out


def test_autoscale_up_after_consecutive_busy_polls_within_max_workers():
    config = ControllerConfig(scale_out_queue=4, autoscale_polls=3, max_workers=4)
    busy, calm = (10, 32, 32), (2, 32, 32)
    assert scale(config, [busy, busy, calm, busy, busy, busy], live=2) == [None] * 5 + [3]
    assert scale(config, [busy] * 6, live=3) == [None, None, 4, None, None, None], "never above max_workers"
    assert scale(dataclasses.replace(config, scale_out_queue=None), [busy] * 5, live=2) == [None] * 5


def test_autoscale_down_when_nearly_idle_within_min_workers():
    config = ControllerConfig(scale_in_utilisation=0.25, autoscale_polls=2, min_workers=2)
    idle, waiting, working = (0, 1, 32), (1, 1, 32), (0, 8, 32)  # 8 of 32 is not below 0.25
    assert scale(config, [idle, waiting, idle, working, idle, idle], live=4) == [None] * 5 + [3]
    assert scale(config, [idle] * 6, live=3) == [None, 2, None, None, None, None], "never below min_workers"


def test_decisions_are_pure_and_states_frozen():
    config = ControllerConfig(imbalance_threshold=1.1, consecutive_windows=1)
    state, observation = RebalanceState(), WindowObservation(window=0, time_s=0.0, imbalance=2.0)
    assert decide_rebalance(state, observation, config) == decide_rebalance(state, observation, config)
    assert state == RebalanceState(), "the input state is not changed"
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.hot_windows = 3
    assert decide_autoscale(AutoscaleState(), QueueObservation(waiting=0, running=0, capacity=1, live_workers=1),
                            config) == (ScaleDecision(), AutoscaleState())
