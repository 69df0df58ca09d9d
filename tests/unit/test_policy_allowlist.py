"""Which policies an admin may name over the API, and their parameters checked before anything changes (no Ray)."""

from __future__ import annotations

import asyncio
import sys
import uuid

import pytest

from moeray.placement.algorithms.policies import check_policy_allowed, check_policy_params
from moeray.placement.config import ControllerConfig
from test_controller import make

SENTINEL = '''
"""A policy module that records its import (its code runs on import: only an allowed module may be imported)."""
import pathlib

from moeray.placement.algorithms.balanced import greedy

pathlib.Path(__file__).with_suffix(".imported").write_text("imported")


def policy(load_LE, topology, current, budget, *, refine: bool = True):
    return greedy(load_LE, topology, current, budget, refine=refine)
'''


@pytest.fixture
def sentinel(tmp_path, monkeypatch):
    """(module name, marker file written when the module is imported)."""
    name = f"moeray_sentinel_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(SENTINEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, tmp_path / f"{name}.imported"
    sys.modules.pop(name, None)


def test_unlisted_modules_are_refused_without_being_imported(sentinel):
    name, marker = sentinel
    controller, ops = make()
    with pytest.raises(ValueError, match=r"'os:getcwd' is not allowed; allowed: the built-ins \(contiguous, .*"
                                         r"the startup policy 'test_controller:lpt'.*\(none; `moeray serve "
                                         r"--allow-policy-module MODULE` adds one\)"):
        controller.set_policy("os:getcwd")
    for path in (f"{name}:policy", f"{name}.policy"):
        with pytest.raises(ValueError, match=f"'{path}' is not allowed"):
            controller.set_policy(path)
        with pytest.raises(ValueError, match=f"'{path}' is not allowed"):
            controller.rebalance(policy=path)
        with pytest.raises(ValueError, match="is not allowed"):
            check_policy_allowed(path, allowed_modules=(f"{name}.sub", "other"))
    assert name not in sys.modules and not marker.exists(), "a module that is not allowed was imported"
    assert controller.policy == ("test_controller:lpt", {}) and ops.calls == []


def test_an_allowed_modules_function_is_accepted_and_used(sentinel):
    name, marker = sentinel
    controller, _ = make(ControllerConfig(policy="test_controller:lpt", allowed_policy_modules=(name,)))
    controller.set_policy(f"{name}:policy", {"refine": False})
    assert marker.exists() and controller.policy == (f"{name}:policy", {"refine": False})
    assert controller.rebalance(dry_run=True)["policy"] == f"{name}:policy"
    # the built-ins and the startup policy stay allowed
    controller.set_policy("greedy")
    controller.set_policy("test_controller:lpt")
    assert controller.rebalance(dry_run=True, policy="moeray.placement.algorithms.balanced:greedy")["policy"] == \
        "moeray.placement.algorithms.balanced:greedy"


def test_bad_params_are_refused_naming_them_and_the_policy_in_force_stays():
    controller, ops = make()
    controller.set_policy("greedy", {"refine": False})
    in_force = controller._policy
    refused = [("replicated", {"bogus": 1}, "'replicated' has no parameter 'bogus'; it accepts: refine, "
                                            "spread_nodes, relabel"),
               ("contiguous", {"refine": True}, "'contiguous' has no parameter 'refine'; it takes no parameters"),
               ("greedy", {"budget": 3}, "has no parameter 'budget'"),  # an input, not a parameter
               ("optimal", {"time_limit_s": "soon"}, "'time_limit_s' must be float; got 'soon' \\(str\\)"),
               ("greedy", {"refine": 1}, "'refine' must be bool; got 1"),
               ("replicated_hierarchical", {"num_groups": 1.5}, "'num_groups' must be int \\| None")]
    for name, params, message in refused:
        with pytest.raises(ValueError, match=message):
            controller.set_policy(name, params)
    assert controller.policy == ("greedy", {"refine": False}) and controller._policy is in_force
    controller.set_policy("optimal", {"time_limit_s": 2})  # an int where a float is annotated is fine
    controller.set_policy("replicated_hierarchical", {"num_groups": None})
    assert ops.calls == []
    with pytest.raises(ValueError, match="'greedy' has no parameter 'bogus'"):
        ControllerConfig(policy="greedy", policy_params={"bogus": 1})  # the startup policy's too, at start


def test_check_policy_params_needs_the_four_inputs_and_required_params():
    def needs(load_LE, topology, current, budget, *, k: int):
        return None

    def takes_any(load_LE, topology, current, budget, **params):
        return None

    with pytest.raises(ValueError, match="'p' needs parameter 'k'"):
        check_policy_params("p", needs, {})
    check_policy_params("p", needs, {"k": 3})
    check_policy_params("p", takes_any, {"anything": [1, 2]})
    with pytest.raises(ValueError, match="cannot be called as policy\\(load_LE, topology, current, budget"):
        check_policy_params("p", lambda load: None, {})


def test_rebalance_with_bad_params_changes_nothing_and_does_not_wait_for_a_switch():
    controller, ops = make()
    epoch = controller.plan.epoch
    assert controller._switching.acquire()  # a switch (a scale, say) is under way
    try:
        with pytest.raises(ValueError, match="'test_controller:lpt' has no parameter 'x'; it takes no parameters"):
            controller.rebalance(params={"x": 1})  # params alone: the active policy with these
        with pytest.raises(ValueError, match="'refine' must be bool"):
            controller.rebalance(policy="greedy", params={"refine": "yes"})
        with pytest.raises(ValueError, match="'os:getcwd' is not allowed"):
            controller.rebalance(policy="os:getcwd")
    finally:
        controller._switching.release()
    assert controller.plan.epoch == epoch and ops.calls == [] and controller.history == []
    record = controller.rebalance(dry_run=True, policy="greedy", params={"refine": False})
    assert record["policy"] == "greedy" and controller.policy == ("test_controller:lpt", {})


def test_config_allowed_policy_modules(tmp_path):
    assert ControllerConfig(allowed_policy_modules=["pkg.mod", "other"]).allowed_policy_modules == ("pkg.mod", "other")
    with pytest.raises(ValueError, match="must be a list of module names"):
        ControllerConfig(allowed_policy_modules="pkg.mod")
    with pytest.raises(ValueError, match="'pkg:fn' is not a module name"):
        ControllerConfig(allowed_policy_modules=["pkg:fn"])
    path = tmp_path / "placement.yaml"
    path.write_text("policy: greedy\nallowed_policy_modules: [pkg.mod]\nmax_workers: 4\n")
    config = ControllerConfig.from_file(str(path), max_workers=None)
    assert config.allowed_policy_modules == ("pkg.mod",) and config.max_workers == 4


@pytest.mark.ray  # `moeray serve` imports Serve before it checks its flags
def test_serve_flags(capsys):
    from moeray.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--allow-policy-module", "pkg.mod", "--allow-policy-module", "b",
                                      "--max-workers", "4"])
    assert args.allow_policy_module == ["pkg.mod", "b"] and args.max_workers == 4
    assert build_parser().parse_args(["serve"]).max_workers is None  # unset: bounded by the cluster only
    assert main(["serve", "--workers", "3", "--max-workers", "2"]) == 2
    assert "--max-workers 2 is below --workers 3" in capsys.readouterr().err
    assert main(["serve", "--allow-policy-module", "pkg:fn"]) == 2
    assert "'pkg:fn' is not a module name" in capsys.readouterr().err


# --- the admin servicer methods, against a fake controller handle --------------------------------------------------

class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args, **kwargs):
        async def call():
            return self.fn(*args, **kwargs)

        return call()


class _Handle:
    """What the ingress awaits: ``handle.method.remote(...)``; errors come wrapped as Ray wraps an actor's."""

    def __init__(self, **methods) -> None:
        for name, fn in methods.items():
            setattr(self, name, _Method(_wrapped(fn)))


def _wrapped(fn):
    from ray.exceptions import RayTaskError

    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            raise RayTaskError("ControllerActor.method", "Traceback (most recent call last):\n  ...\n"
                               f"ValueError: {e}", e).as_instanceof_cause() from None

    return call


class _Context:
    def __init__(self) -> None:
        self.code = self.details = None

    def invocation_metadata(self):
        return [("authorization", "Bearer t0ken")]

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


@pytest.fixture
def ingress():
    from moeray.serving import app
    from moeray.serving.gen import placement_pb2

    cls = app.Ingress.func_or_class
    server = cls.__new__(cls)
    server.credentials = app.auth.Credentials(admin_token="t0ken")
    return server, app, placement_pb2


@pytest.mark.ray  # the ingress class and Ray's wrapped errors
def test_scale_workers_answers_the_accepted_target_at_once(ingress):
    import grpc

    server, app, pb = ingress
    asked = []

    def request_scale(workers: int) -> dict:
        asked.append(workers)
        if workers > 4:
            raise ValueError(f"workers must lie in [1, 4] (what the cluster's resources hold); got {workers}")
        return {"target": workers, "epoch": 7, "accepted": True}

    server.engine = app.EngineHandle(routers=[], controller=_Handle(request_scale=request_scale))
    response = asyncio.run(server.ScaleWorkers(pb.ScaleWorkersRequest(workers=3), _Context()))
    assert (response.workers, response.epoch, response.applied) == (3, 7, False)  # accepted, in progress
    ctx = _Context()
    with pytest.raises(app.errors.Fail):
        asyncio.run(server.ScaleWorkers(pb.ScaleWorkersRequest(workers=1000), ctx))
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ctx.details == "workers must lie in [1, 4] (what the cluster's resources hold); got 1000"  # one line
    assert asked == [3, 1000]


@pytest.mark.ray  # the ingress class and Ray's wrapped errors
def test_set_policy_and_rebalance_refusals_are_invalid_argument(ingress):
    import grpc

    server, app, pb = ingress
    controller, _ = make()
    server.engine = app.EngineHandle(routers=[], controller=_Handle(set_policy=controller.set_policy,
                                                                    rebalance=controller.rebalance))
    for call, request, named in [
            (server.SetPolicy, pb.SetPolicyRequest(policy="os:getcwd"), "'os:getcwd' is not allowed"),
            (server.SetPolicy, pb.SetPolicyRequest(policy="greedy", params_json='{"bogus": 1}'),
             "has no parameter 'bogus'; it accepts: refine, relabel"),
            (server.Rebalance, pb.RebalanceRequest(params_json='{"bogus": 1}'), "has no parameter 'bogus'")]:
        ctx = _Context()
        with pytest.raises(app.errors.Fail):
            asyncio.run(call(request, ctx))
        assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and named in ctx.details and "Traceback" not in ctx.details
    assert controller.policy == ("test_controller:lpt", {})
    response = asyncio.run(server.Rebalance(pb.RebalanceRequest(dry_run=True), _Context()))
    assert response.policy == "test_controller:lpt" and not response.applied
