"""The placement controller's settings: policy, load window, rebalance triggers, budgets, worker bounds and the
autoscaler. ``moeray serve --placement-config FILE`` reads them from YAML or JSON, and ``moeray placement simulate
--config FILE`` replays a trace under the same ones (moeray.placement.algorithms.triggers decides for both)."""

from __future__ import annotations

import dataclasses

from moeray.placement.algorithms.policies import resolve_policy


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    policy: str = "replicated"  # a built-in name or an import path 'package.module:function'
    policy_params: dict = dataclasses.field(default_factory=dict)
    # Modules whose functions SetPolicy / Rebalance may name, besides the built-ins and ``policy`` itself
    # (``moeray serve --allow-policy-module``); no other module is ever imported on a client's say-so.
    allowed_policy_modules: tuple[str, ...] = ()
    window_steps: int = 64  # the load window: the last N step records of all routers; triggers decide per window
    poll_interval_s: float = 0.5  # how often load is pulled from the routers
    imbalance_threshold: float | None = None  # rebalance when the plan's expected imbalance stays above this ...
    consecutive_windows: int = 3  # ... for this many consecutive full windows (None threshold: never)
    rebalance_interval_s: float | None = None  # also rebalance on this schedule, checked as windows close (None: never)
    rebalance_every_windows: int | None = None  # also rebalance every N windows (None: never)
    cooldown_windows: int = 0  # after an applied rebalance, this many windows pass before anything triggers again
    min_gain: float = 0.05  # automatic rebalances apply only if expected imbalance drops by this fraction
    # Append every closed window (its load, when it closed, the decision on it) to this JSON Lines trace, which
    # ``moeray placement simulate --config`` replays to the same decisions (None: no trace). On the controller's node.
    trace_path: str | None = None
    weight_source: str = "peer"  # 'peer': fetch a slot from a worker holding it; 'checkpoint': always re-read
    # How dispatch splits a replicated expert's pairs over its replicas in each call (routing.py): 'even' (equal
    # shares within one pair), or 'least_loaded' (moved toward the workers that call loads least; better balanced
    # steps, more router time per layer: BENCHMARKS.md, replica rules). The load model and the triggers follow it.
    replica_rule: str = "even"
    max_moved_slots: int | None = None  # per rebalance, for policies that honour a budget (migration_aware)
    max_moved_bytes: int | None = None
    min_workers: int = 1  # bounds for ScaleWorkers and the autoscaler
    max_workers: int | None = None
    scale_out_queue: float | None = None  # autoscaler: add a worker when requests waiting in routers stay above
    scale_in_utilisation: float | None = None  # ... remove one when running / batch capacity stays below this
    autoscale_polls: int = 5  # ... for this many consecutive polls (hysteresis)
    # A step that needs a lost expert waits this long for its restore (replacement workers placed and loaded)
    # before its requests fail with UNAVAILABLE; healing goes on in the background either way.
    restore_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.window_steps < 1 or self.consecutive_windows < 1:
            raise ValueError(f"window_steps ({self.window_steps}) and consecutive_windows "
                             f"({self.consecutive_windows}) must be >= 1")
        if self.poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0; got {self.poll_interval_s}")
        if self.imbalance_threshold is not None and self.imbalance_threshold < 1.0:
            raise ValueError(f"imbalance_threshold must be >= 1.0 (1.0 is perfect balance); "
                             f"got {self.imbalance_threshold}")
        if self.rebalance_interval_s is not None and self.rebalance_interval_s <= 0:
            raise ValueError(f"rebalance_interval_s must be > 0 or None; got {self.rebalance_interval_s}")
        if self.rebalance_every_windows is not None and self.rebalance_every_windows < 1:
            raise ValueError(f"rebalance_every_windows must be >= 1 or None; got {self.rebalance_every_windows}")
        if self.cooldown_windows < 0:
            raise ValueError(f"cooldown_windows must be >= 0; got {self.cooldown_windows}")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError(f"min_gain must lie in [0, 1) (a fraction of the expected imbalance); got {self.min_gain}")
        if self.min_workers < 1 or (self.max_workers is not None and self.max_workers < self.min_workers):
            raise ValueError(f"worker bounds [{self.min_workers}, {self.max_workers}] need 1 <= min <= max")
        if self.restore_timeout_s <= 0:
            raise ValueError(f"restore_timeout_s must be > 0; got {self.restore_timeout_s}")
        if self.autoscale_polls < 1:
            raise ValueError(f"autoscale_polls must be >= 1; got {self.autoscale_polls}")
        from moeray.placement.algorithms.routing import RULES

        if self.replica_rule not in RULES:
            raise ValueError(f"replica_rule {self.replica_rule!r} is not one of {tuple(RULES)}")
        if self.weight_source not in ("peer", "checkpoint"):
            raise ValueError(f"weight_source {self.weight_source!r} is not one of ('peer', 'checkpoint')")
        if not isinstance(self.policy_params, dict):
            raise ValueError(f"policy_params must be a mapping of parameter names to values; "
                             f"got {self.policy_params!r}")
        modules = self.allowed_policy_modules
        if isinstance(modules, str) or not all(isinstance(m, str) for m in modules):
            raise ValueError(f"allowed_policy_modules must be a list of module names; got {modules!r}")
        bad = [m for m in modules if not m or not all(part.isidentifier() for part in m.split("."))]
        if bad:
            raise ValueError(f"allowed_policy_modules: {bad[0]!r} is not a module name like 'package.module'")
        object.__setattr__(self, "allowed_policy_modules", tuple(modules))  # a YAML list becomes a tuple
        # Fail now, naming the policy or parameter, rather than at the first rebalance.
        resolve_policy(self.policy, self.policy_params)

    @classmethod
    def from_file(cls, path: str | None, **overrides) -> ControllerConfig:
        """Fields from a YAML or JSON file (``policy``, ``policy_params``, ``window_steps``, ...), then the
        ``overrides`` that are not None."""
        import yaml  # YAML is a superset of JSON

        fields = {}
        if path:
            with open(path) as f:
                fields = yaml.safe_load(f) or {}
            if not isinstance(fields, dict):
                raise ValueError(f"placement config {path} must be a mapping of settings; got {type(fields).__name__}")
            unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"placement config {path}: unknown settings {unknown}; known: "
                                 f"{sorted(f.name for f in dataclasses.fields(cls))}")
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)
