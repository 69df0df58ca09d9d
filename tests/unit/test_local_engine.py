"""The in-process engine (``EngineConfig(backend="local")``) against transformers in one process, and against the Ray
engine: greedy ids, logits, streams, aborts, bad input, placement, quantized experts, and a run with Ray blocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import PROMPTS, Oracle, assert_logits_close
from moeray import EngineConfig, InvalidRequest, LocalEngine, SamplingParams
from moeray.model.checkpoint import CheckpointError
from moeray.model.tiny import ARCHITECTURES, save_fp8_checkpoint, save_tiny_checkpoint
from moeray.placement.config import ControllerConfig
from moeray.router.kv_config import KVCacheConfig
from moeray.transport.direct import DirectTransport

GREEDY = SamplingParams(max_new_tokens=16)


def local(path, **kwargs) -> LocalEngine:
    # NOTE: moeray.Engine(config) with backend="local" is this class too (test_runs_without_ray goes through it);
    # here it is named directly, since moeray.engine imports Ray where Ray is installed (the fast tier never does).
    return LocalEngine(EngineConfig(model=str(path), backend="local", **{"workers": 2, **kwargs}))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_matches_transformers(arch, checkpoints, oracle):
    ref = oracle(arch)
    with local(checkpoints[arch], replicas=2) as engine:
        assert isinstance(engine, LocalEngine)
        assert_logits_close(engine.score([PROMPTS[1]])[0], ref.logits(PROMPTS[1]))
        ids = np.zeros((2, len(PROMPTS[1])), dtype=np.int64)
        mask = np.zeros_like(ids)
        ids[0], mask[0] = PROMPTS[1], 1
        ids[1, : len(PROMPTS[3])], mask[1, : len(PROMPTS[3])] = PROMPTS[3], 1  # right padded
        batched = engine.score(ids, mask)
        assert_logits_close(batched[0], ref.logits(PROMPTS[1]))
        assert_logits_close(batched[1, : len(PROMPTS[3])], ref.logits(PROMPTS[3]))
        results = engine.generate(PROMPTS, GREEDY)
        assert [r.output_ids for r in results] == [ref.greedy(p) for p in PROMPTS]
        assert [r.prompt_ids for r in results] == PROMPTS
        assert all(r.finish_reason in ("stop", "length") for r in results)
        expert_LE, worker_LW = engine.take_load()
        assert (expert_LE.sum(axis=1) == worker_LW.sum(axis=1)).all() and (worker_LW.sum(axis=0) > 0).all()


def test_streaming_abort_and_submit(checkpoints, oracle):
    ref = oracle("olmoe")
    with local(checkpoints["olmoe"], max_batch_size=2) as engine:
        chunks = list(engine.stream(PROMPTS[1], GREEDY))
        assert [t for c in chunks for t in c.token_ids] == ref.greedy(PROMPTS[1])
        assert chunks[-1].finish_reason in ("stop", "length") and all(c.finish_reason is None for c in chunks[:-1])
        assert len(chunks) >= 3, "tokens arrive as they are produced, not all at the end"
        # Abort a long request mid-stream: its stream ends with "abort" and the batch slot is free again.
        stream = engine.stream(PROMPTS[0], SamplingParams(max_new_tokens=200, ignore_eos=True), request_id="long")
        first = next(stream)
        assert first.request_id == "long" and first.token_ids
        assert engine.abort("long")
        rest = list(stream)
        assert rest[-1].finish_reason == "abort"
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) < 200
        # submit: a handle per request, results as they finish; an abort by id ends a submitted one too
        handles = [engine.submit(p, GREEDY) for p in PROMPTS[2:]]
        long = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=200, ignore_eos=True), request_id="long-2")
        assert [h.result(timeout=120).output_ids for h in handles] == [ref.greedy(p) for p in PROMPTS[2:]]
        assert engine.abort("long-2") and long.result(timeout=60).finish_reason == "abort"
        assert not engine.abort("no-such-request")


def test_bad_input_raises_and_leaves_other_requests_intact(checkpoints, oracle):
    ref = oracle("qwen3_moe")
    with local(checkpoints["qwen3_moe"], max_new_tokens_cap=64) as engine:
        running = [engine.submit(p, GREEDY) for p in PROMPTS]
        vocab, positions = engine.spec.vocab_size, engine.spec.max_positions
        bad = [
            ([1, vocab], SamplingParams(), f"token id {vocab} is outside the vocabulary"),
            ([], SamplingParams(), "prompt is empty"),
            ([1] * positions, SamplingParams(max_new_tokens=1), f"exceeds the model's {positions} positions"),
            ([1], SamplingParams(max_new_tokens=65), "above the cap 64"),
        ]
        for prompt, sampling, message in bad:
            for call in (engine.submit, engine.stream):
                with pytest.raises(InvalidRequest, match=message):
                    call(prompt, sampling)
        with pytest.raises(InvalidRequest, match=f"prompt 1: prompt token id {vocab} is outside"):
            engine.generate([[1], [vocab]], GREEDY)
        with pytest.raises(InvalidRequest, match="2 sampling parameter sets for 1 prompts"):
            engine.generate([[1]], [GREEDY, GREEDY])
        with pytest.raises(InvalidRequest, match=r"input_ids must be a non-empty \[batch, tokens\] array"):
            engine.score([1, 2, 3])
        with pytest.raises(InvalidRequest, match=f"token id {vocab} is outside the vocabulary"):
            engine.score([[1, vocab]])
        assert [r.result(timeout=120).output_ids for r in running] == [ref.greedy(p) for p in PROMPTS]


def test_config_names_the_backends_and_their_limits(checkpoints, tmp_path):
    path = checkpoints["qwen3_moe"]
    with pytest.raises(ValueError, match=r"backend 'dask' is not one of \('ray', 'local'\)"):
        EngineConfig(model=path, backend="dask")
    with pytest.raises(ValueError, match="backend 'local' runs one router in this process; got routers=2"):
        EngineConfig(model=path, backend="local", routers=2)
    with pytest.raises(ValueError, match="transport 'compiled_graph' needs backend 'ray'"):
        EngineConfig(model=path, backend="local", transport="compiled_graph")
    with pytest.raises(ValueError, match="transport 'direct' calls workers in this process; it needs backend"):
        EngineConfig(model=path, transport="direct")
    with pytest.raises(ValueError, match=r"a step may carry max_batch_size \+ max_prefill_tokens = 32 \+ 512 = 544 "
                                         r"tokens, over max_forward_tokens 500: raise max_forward_tokens"):
        EngineConfig(model=path, max_forward_tokens=500, kv_cache=KVCacheConfig(max_prefill_tokens=512))
    with pytest.raises(ValueError, match=r"32 \+ 16 = 48 tokens, over max_forward_tokens 40"):  # the automatic floor
        EngineConfig(model=path, max_forward_tokens=40)
    with pytest.raises(ValueError, match="LocalEngine runs backend 'local'; the config asks for backend 'ray'"):
        LocalEngine(EngineConfig(model=path))
    with pytest.raises(CheckpointError, match="does not exist"):
        local(tmp_path / "missing")


def test_rebalance_and_scale_keep_outputs(tmp_path):
    # top-1 routing over 16 experts: prompts repeating a few ids load a few experts (tests/integration/test_rebalance)
    path = save_tiny_checkpoint("mixtral", tmp_path / "mixtral16", seed=0, num_local_experts=16,
                                num_experts_per_tok=1)
    skewed = [[7] * 12, [7, 7, 7, 9] * 3, [9] * 10, [7] * 20]
    sampling = SamplingParams(max_new_tokens=8, ignore_eos=True)
    expected = [Oracle(str(path)).greedy(p, 8) for p in skewed]
    with local(path, workers=4, replicas=8, placement="round_robin",
               controller=ControllerConfig(policy="replicated", poll_interval_s=0.1)) as engine:
        assert [r.output_ids for r in engine.generate(skewed, sampling)] == expected
        assert engine.rebalance(dry_run=True)["applied"] is False and engine.plan.epoch == 0
        record = engine.rebalance()
        assert record["applied"] and record["moved_slots"] > 0 and engine.plan.epoch == record["epoch"] == 1
        assert record["expected_imbalance_after"] < record["expected_imbalance_before"]
        info = engine.workers_info()
        assert all(w["epoch"] == 1 and w["node_id"] == "local" for w in info), "every worker committed epoch 1"
        assert sum(w["fetched_slots"] for w in info) > 0, "moved slots came from peers, not the checkpoint"
        assert [w["experts_per_layer"] for w in info] == [engine.plan.experts_of(w) for w in range(4)]
        assert [r.output_ids for r in engine.generate(skewed, sampling)] == expected
        # Scaling in: the leaving worker's experts are placed on the others first; outputs stay the same.
        assert engine.scale(3)["applied"] and len(engine.workers) == 3 == engine.plan.num_workers
        assert [r.output_ids for r in engine.generate(skewed, sampling)] == expected
        assert sum(engine.memory_report()["worker_resident_bytes"]) > 0


def test_fp8_checkpoint_matches_transformers(tmp_path):
    pytest.importorskip("accelerate")  # transformers needs it to load an FP8 checkpoint (the oracle)
    path = save_fp8_checkpoint("qwen3_moe", tmp_path / "q48", block=(4, 8), seed=2)
    expected = [Oracle(str(path)).greedy(p) for p in PROMPTS]
    with local(path, replicas=1) as engine:
        assert engine.memory_report()["expert_format"].startswith("fp8")
        assert [r.output_ids for r in engine.generate(PROMPTS, GREEDY)] == expected


def test_direct_transport_pool_gives_the_same_results(checkpoints):
    with local(checkpoints["deepseek_v3"], workers=3) as engine:
        inline = engine.score([PROMPTS[1]])
        engine.router.dispatcher.transport = DirectTransport(engine.workers, threads=3)  # touched workers at once
        pooled = engine.score([PROMPTS[1]])
        engine.router.dispatcher.transport.close()
    np.testing.assert_array_equal(pooled, inline)
    with pytest.raises(ValueError, match="threads must be >= 1; got 0"):
        DirectTransport([], threads=0)


NO_RAY = textwrap.dedent("""
    import json, sys
    sys.modules["ray"] = None  # import ray now raises ImportError
    sys.modules["opentelemetry"] = None  # nor OpenTelemetry (make gpu-check's machine has neither)
    from moeray import Engine, EngineConfig, SamplingParams
    with Engine(EngineConfig(model=sys.argv[1], workers=2, backend="local")) as engine:
        ids = [r.output_ids for r in engine.generate(json.loads(sys.argv[2]), SamplingParams(max_new_tokens=16))]
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "opentelemetry") and sys.modules[m])
    print(json.dumps({"ids": ids, "loaded": loaded}))
""")


def test_runs_without_ray(checkpoints, oracle):
    arch = "mixtral"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", NO_RAY, checkpoints[arch], json.dumps(PROMPTS[:2])],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert out["ids"] == [oracle(arch).greedy(p) for p in PROMPTS[:2]]


@pytest.mark.ray
def test_equals_the_ray_engine(checkpoints, ray_local):
    from moeray import Engine

    path = checkpoints["gpt_oss"]
    with Engine(EngineConfig(model=path, workers=2, replicas=1)) as ray_engine:
        ray_ids = [r.output_ids for r in ray_engine.generate(PROMPTS, GREEDY)]
        ray_logits = ray_engine.score([PROMPTS[1]])
    with local(path, replicas=1) as engine:
        assert [r.output_ids for r in engine.generate(PROMPTS, GREEDY)] == ray_ids
        assert_logits_close(engine.score([PROMPTS[1]]), torch.tensor(ray_logits), rel=1e-5)
