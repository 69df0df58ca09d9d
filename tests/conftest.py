"""Shared fixtures: tiny checkpoints of every architecture, transformers as the oracle, and Ray clusters.

Ray fixtures follow Ray's own conftest: one ``_ray_start(**kwargs)`` and a module-scoped shared cluster.
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from moeray.model.tiny import ARCHITECTURES, save_tiny_checkpoint

# NOTE: the fast tier (`make test-fast`: `--tier fast`) is the unit and kernel tests without the `ray` and `slow`
# markers. It never imports Ray: a test that needs Ray, even only its exception types, is marked `ray` and imports
# it inside the test (collection imports every module, deselected or not), or lives outside tests/unit and
# tests/kernels.
TIERS = {"fast": "not ray and not slow", "all": ""}


def pytest_addoption(parser):
    parser.addoption("--tier", choices=sorted(TIERS), default="all",
                     help="fast: no Ray, no servers (the unit and kernel tests, `make test-fast`); all: everything")


def pytest_configure(config):
    tier = config.getoption("--tier")
    if TIERS[tier]:
        config.option.markexpr = " and ".join(f"({e})" for e in (config.option.markexpr, TIERS[tier]) if e)
    # Triton kernels run on CPU tensors through Triton's interpreter when there is no GPU. NOTE: set before any
    # test module imports triton, which collection does.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # Ray's and Serve's processes read these when they start: every test's cluster runs as under `moeray serve`.
    from moeray.serving.serve_env import set_serving_env

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    set_serving_env()
    torch.set_num_threads(2)


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("--tier") == "fast" and "ray" in sys.modules and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nthe fast tier imported Ray: mark the test that needs it `ray` (tests/conftest.py)", file=sys.stderr)
    session.config.stash[_EXIT_STATUS] = int(session.exitstatus)


_EXIT_STATUS = pytest.StashKey[int]()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # NOTE: the run's verdict is in; leave without the interpreter's finalization. The native libraries this process
    # loaded (Ray's core worker, grpc, xgrammar, torch, tokenizers) tearing down their threads in whatever order once
    # crashed it with a segfault after a green summary (a fresh-clone run, 1692 passed), turning the exit status red.
    status = config.stash.get(_EXIT_STATUS, None)
    if status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


@contextlib.contextmanager
def _ray_start(**kwargs):
    # NOTE: always address="local": a stale cluster file in Ray's temp folder otherwise breaks the next init.
    import ray

    kwargs = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False, **kwargs}
    ray.init(address="local", **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local():
    with _ray_start():
        yield


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch -> directory of a tiny seeded checkpoint, created on first use."""
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, str] = {}

    class _Lazy(dict):
        def __missing__(self, arch):
            made[arch] = str(save_tiny_checkpoint(arch, root / arch, seed=ARCHITECTURES.index(arch)))
            self[arch] = made[arch]
            return made[arch]

    return _Lazy()


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """A MOERAY_HOME holding the demo checkpoint, built once per session (training it takes ~25 s)."""
    from moeray.model import demo

    home = tmp_path_factory.mktemp("moeray-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOERAY_HOME", str(home))
        demo.ensure_demo_checkpoint()
    return home


class Oracle:
    """transformers running a checkpoint in this process: the correctness reference."""

    def __init__(self, path: str):
        from moeray.model.quant import reference_load_kwargs

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                          **reference_load_kwargs(path)).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set(eos or [])

    @torch.no_grad()
    def logits(self, prompt: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([prompt])).logits[0]

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_new_tokens: int = 16) -> list[int]:
        out = self.model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, len(prompt):].tolist()
        # generate pads after EOS; moeray stops there (finish_reason "stop")
        for i, t in enumerate(new):
            if t in self.eos:
                return new[: i + 1]
        return new


@pytest.fixture(scope="session")
def oracle(checkpoints):
    cache: dict[str, Oracle] = {}

    def get(arch: str) -> Oracle:
        if arch not in cache:
            cache[arch] = Oracle(checkpoints[arch])
        return cache[arch]

    return get


def assert_logits_close(actual, expected, rel: float = 1e-4) -> None:
    """max |a - b| <= rel * max |b|: 'within 1e-4 relative' for a whole logits tensor."""
    actual = (actual if isinstance(actual, torch.Tensor) else torch.from_numpy(np.array(actual))).float()
    expected = expected.float()
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel} * {scale:.3e}"


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25], [30], [40, 41, 42, 43, 44, 45, 46]]


def held_bytes_per_expert(layer, itemsize: int = 4) -> int:
    """What a worker holds per expert of ``layer`` (a MoELayerSpec): packed on a CPU where the C kernels run."""
    from moeray.kernels import cpu_rows
    from moeray.kernels.api import PackedExpertWeights

    if cpu_rows.available():
        return PackedExpertWeights.bytes_per_expert(layer.hidden_size, layer.intermediate_size, layer.has_bias,
                                                    itemsize)
    return layer.params_per_expert * itemsize


def layer_calls(engine, epoch: int, tokens: int = 5) -> dict:
    """One ``WorkerCall`` per worker of a Ray engine for MoE layer 0: random tokens, each pair on one of the
    worker's slots (a transport's outputs compared with another's, bit for bit)."""
    from moeray.transport import WorkerCall

    plan, hidden = engine.plan, engine.spec.moe_layers[0].hidden_size
    g = torch.Generator().manual_seed(epoch)
    calls = {}
    for w in range(plan.num_workers):
        slots = len(plan.experts_of(w)[0])
        token_N = torch.arange(tokens).repeat_interleave(2)
        slot_N = torch.randint(slots, token_N.shape, generator=g)
        calls[w] = WorkerCall.of(epoch, 0, torch.randn(tokens, hidden, generator=g), token_N, slot_N,
                                 torch.rand(token_N.shape, generator=g))
    return calls


def router_outputs(engine, sampling, router: int = 0) -> list[list[int]]:
    """Every prompt of ``PROMPTS`` through one router of a Ray engine, at once: the output ids in order."""
    import ray

    return [r.output_ids for r in ray.get([engine.submit(p, sampling, router=router) for p in PROMPTS], timeout=300)]
