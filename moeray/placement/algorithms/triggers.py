"""Triggers: when to rebalance and when to scale, as pure functions ``(state, observation, config) -> (decision,
state)`` over frozen records, as Ray Serve writes its autoscaling policy.

The live controller and the offline simulator call the same functions with the same observations, so a trace the
controller recorded replays to the same decisions at the same windows. Nothing here reads a clock or calls Ray:
the caller measures, these decide.

Rebalance, once per closed load window (``window_steps`` steps of load; ``decide_rebalance``):

    1. cool-down   for ``cooldown_windows`` windows after an applied rebalance, nothing triggers
    2. threshold   the plan's expected imbalance on the window stays above ``imbalance_threshold`` for
                   ``consecutive_windows`` windows in a row (hysteresis: one hot window is not enough)
    3. schedule    ``rebalance_every_windows`` windows, or ``rebalance_interval_s`` seconds, since the last one

and once the policy has proposed a layout, whether to apply it (``decide_apply``): only if the expected imbalance
drops by ``min_gain`` and some slot moves. An applied rebalance (automatic or manual) restarts the counts
(``after_rebalance``).

Scale, once per poll of the routers (``decide_autoscale``): one worker more after ``autoscale_polls`` polls in a
row with more than ``scale_out_queue`` requests waiting, one fewer after as many polls with none waiting and the
running requests below ``scale_in_utilisation`` of the batch capacity; within [min_workers, max_workers].
"""

from __future__ import annotations

import dataclasses

from moeray.placement.config import ControllerConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class RebalanceState:
    hot_windows: int = 0  # consecutive windows above the threshold so far
    cooldown_left: int = 0  # windows still to pass before anything may trigger
    windows_since: int = 0  # windows since the last rebalance (applied) or scheduled trigger
    last_rebalance_s: float = 0.0  # controller time of the last rebalance (applied) or scheduled trigger


@dataclasses.dataclass(frozen=True, kw_only=True)
class WindowObservation:
    window: int  # index of the closed window, counted from the controller's start
    time_s: float | None  # seconds since the controller's start when it closed (None: unknown, as in old traces)
    imbalance: float  # the plan in force's expected imbalance on the window's load (mean over layers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RebalanceDecision:
    rebalance: bool
    reason: str = ""  # why, for the rebalance record ("imbalance 2.1 > 1.5 for 3 windows", "schedule")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Proposal:
    time_s: float | None  # when the triggering window closed
    imbalance_before: float  # expected imbalance of the plan in force on the window's load
    imbalance_after: float  # ... of the policy's layout
    moved_slots: int  # slots the layout loads that the plan in force does not hold


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApplyDecision:
    apply: bool
    reason: str = ""  # why not, when not


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoscaleState:
    busy_polls: int = 0  # consecutive polls with a queue
    idle_polls: int = 0  # consecutive polls nearly idle


@dataclasses.dataclass(frozen=True, kw_only=True)
class QueueObservation:
    waiting: int  # requests waiting in the routers
    running: int  # requests in the routers' batches
    capacity: int  # the routers' batch capacity
    live_workers: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaleDecision:
    target_workers: int | None = None  # None: stay


def decide_rebalance(state: RebalanceState, obs: WindowObservation,
                     config: ControllerConfig) -> tuple[RebalanceDecision, RebalanceState]:
    """Whether the window just closed calls for a rebalance (see the module docstring)."""
    no = RebalanceDecision(rebalance=False)
    # 1. Cool-down: the windows right after a switch neither trigger nor count toward the hysteresis.
    if state.cooldown_left > 0:
        return no, dataclasses.replace(state, cooldown_left=state.cooldown_left - 1, hot_windows=0,
                                       windows_since=state.windows_since + 1)
    state = dataclasses.replace(state, windows_since=state.windows_since + 1)
    # 2. Threshold, with hysteresis.
    threshold = config.imbalance_threshold
    if threshold is not None:
        hot = state.hot_windows + 1 if obs.imbalance > threshold else 0
        state = dataclasses.replace(state, hot_windows=hot)
        if hot >= config.consecutive_windows:
            reason = f"imbalance {obs.imbalance:.3f} > {threshold} for {config.consecutive_windows} windows"
            return RebalanceDecision(rebalance=True, reason=reason), dataclasses.replace(state, hot_windows=0)
    # 3. Schedule, in windows or in seconds; the schedule restarts whether or not the rebalance then pays off.
    every = config.rebalance_every_windows
    interval = config.rebalance_interval_s
    if interval is not None and obs.time_s is None:
        raise ValueError(f"rebalance_interval_s ({interval}) needs the time each window closed; window "
                         f"{obs.window} has none (record the trace with the controller's trace_path)")
    if (every is not None and state.windows_since >= every) or \
            (interval is not None and obs.time_s - state.last_rebalance_s >= interval):
        return RebalanceDecision(rebalance=True, reason="schedule"), dataclasses.replace(
            state, windows_since=0, last_rebalance_s=state.last_rebalance_s if obs.time_s is None else obs.time_s)
    return no, state


def decide_apply(state: RebalanceState, proposal: Proposal,
                 config: ControllerConfig) -> tuple[ApplyDecision, RebalanceState]:
    """Whether an automatic rebalance's layout pays for its moves: the expected imbalance must drop by
    ``min_gain`` (a fraction) and some slot must move. Applying restarts the counts (``after_rebalance``)."""
    if proposal.moved_slots == 0:
        return ApplyDecision(apply=False, reason="no slot moves"), state
    goal = proposal.imbalance_before * (1 - config.min_gain)
    if proposal.imbalance_after > goal:
        return ApplyDecision(apply=False, reason=f"expected imbalance {proposal.imbalance_before:.3f} -> "
                             f"{proposal.imbalance_after:.3f} misses min_gain {config.min_gain}"), state
    return ApplyDecision(apply=True), after_rebalance(state, proposal.time_s, config)


def after_rebalance(state: RebalanceState, time_s: float | None, config: ControllerConfig) -> RebalanceState:
    """The state once a rebalance (automatic or manual) is applied at ``time_s``: the hysteresis and the schedule
    start over, and the cool-down begins."""
    return RebalanceState(hot_windows=0, cooldown_left=config.cooldown_windows, windows_since=0,
                          last_rebalance_s=state.last_rebalance_s if time_s is None else time_s)


def decide_autoscale(state: AutoscaleState, obs: QueueObservation,
                     config: ControllerConfig) -> tuple[ScaleDecision, AutoscaleState]:
    """One worker more or fewer after ``autoscale_polls`` polls in a row agree (see the module docstring)."""
    c = config
    busy = c.scale_out_queue is not None and obs.waiting > c.scale_out_queue and (
        c.max_workers is None or obs.live_workers < c.max_workers)
    idle = c.scale_in_utilisation is not None and obs.waiting == 0 and obs.live_workers > c.min_workers and \
        obs.running < c.scale_in_utilisation * max(1, obs.capacity)
    state = AutoscaleState(busy_polls=state.busy_polls + 1 if busy else 0,
                           idle_polls=state.idle_polls + 1 if idle else 0)
    if state.busy_polls >= c.autoscale_polls or state.idle_polls >= c.autoscale_polls:
        return ScaleDecision(target_workers=obs.live_workers + (1 if busy else -1)), AutoscaleState()
    return ScaleDecision(), state
