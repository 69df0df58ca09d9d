"""The engine on a local Ray cluster against transformers in one process: logits, greedy output, bad input."""

import json

import numpy as np
import pytest
import ray
import torch
from ray._private.test_utils import wait_for_condition

from conftest import PROMPTS, assert_logits_close, held_bytes_per_expert
from moeray import Engine, EngineConfig, InvalidRequest, SamplingParams
from moeray.model.checkpoint import CheckpointError
from moeray.model.tiny import ARCHITECTURES

pytestmark = pytest.mark.ray


def _free_cpus() -> float:
    return ray.available_resources().get("CPU", 0.0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_matches_transformers(arch, checkpoints, oracle, ray_local):
    ref = oracle(arch)
    expected = [ref.greedy(p) for p in PROMPTS]
    with Engine(EngineConfig(model=checkpoints[arch], workers=2, replicas=2)) as engine:
        # Prompt logits, alone and padded into one batch.
        for prompt in PROMPTS[:2]:
            assert_logits_close(engine.score([prompt])[0], ref.logits(prompt))
        ids = np.zeros((2, len(PROMPTS[1])), dtype=np.int64)
        mask = np.zeros_like(ids)
        ids[0], mask[0] = PROMPTS[1], 1
        ids[1, : len(PROMPTS[3])], mask[1, : len(PROMPTS[3])] = PROMPTS[3], 1  # right padded
        batched = engine.score(ids, mask)
        assert_logits_close(batched[0], ref.logits(PROMPTS[1]))
        assert_logits_close(batched[1, : len(PROMPTS[3])], ref.logits(PROMPTS[3]))
        # Greedy generations: batched together, and one at a time.
        together = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16))
        assert [r.output_ids for r in together] == expected
        alone = [engine.generate([p], SamplingParams(max_new_tokens=16))[0] for p in PROMPTS]
        assert [r.output_ids for r in alone] == expected
        assert [r.prompt_ids for r in together] == PROMPTS
        assert all(r.finish_reason in ("stop", "length") for r in together)


@pytest.mark.parametrize("workers,replicas,placement", [(1, 0, "contiguous"), (3, 0, "contiguous"),
                                                        (3, 4, "round_robin")])
def test_any_worker_count_and_replicas(workers, replicas, placement, checkpoints, oracle, ray_local):
    arch = "deepseek_v3"
    ref = oracle(arch)
    config = EngineConfig(model=checkpoints[arch], workers=workers, replicas=replicas, placement=placement)
    with Engine(config) as engine:
        results = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16))
        assert [r.output_ids for r in results] == [ref.greedy(p) for p in PROMPTS]
        expert_LE, worker_LW = engine.take_load()
        # Every non-padding token reached top_k experts in every MoE layer, and the workers did that work.
        assert (expert_LE.sum(axis=1) == worker_LW.sum(axis=1)).all()
        assert worker_LW.shape == (len(engine.spec.moe_layers), workers)
        if workers > 1:
            assert (worker_LW.sum(axis=0) > 0).all(), "every worker served tokens"


def test_memory_accounting_router_holds_no_experts(checkpoints, ray_local):
    with Engine(EngineConfig(model=checkpoints["mixtral"], workers=2, replicas=3)) as engine:
        report = engine.memory_report()
        spec = engine.spec
        per_expert = held_bytes_per_expert(spec.moe_layers[0])
        slots = len(spec.moe_layers) * (spec.num_experts + 3)
        assert sum(report["worker_resident_bytes"]) == slots * per_expert
        assert report["router_expert_bytes"] == [0]
        assert report["router_resident_bytes"][0] < report["expert_bytes_total"]
        assert report["total_params"] > report["active_params"] > report["dense_params"]
        json.dumps(report)  # reportable as is


def test_bad_input_leaves_other_requests_intact(checkpoints, oracle, ray_local):
    arch = "qwen3_moe"
    ref = oracle(arch)
    with Engine(EngineConfig(model=checkpoints[arch], workers=2, max_new_tokens_cap=64)) as engine:
        running = [engine.submit(p, SamplingParams(max_new_tokens=16)) for p in PROMPTS]
        vocab, positions = engine.spec.vocab_size, engine.spec.max_positions
        bad = [
            ([1, vocab], SamplingParams(), f"token id {vocab} is outside the vocabulary"),
            ([], SamplingParams(), "prompt is empty"),
            ([1] * positions, SamplingParams(max_new_tokens=1), f"exceeds the model's {positions} positions"),
            ([1], SamplingParams(max_new_tokens=65), "above the cap 64"),
        ]
        router = engine.routers[0]
        for prompt, sampling, message in bad:
            with pytest.raises(InvalidRequest, match=message):
                engine.submit(prompt, sampling)
            # The same request straight at the router actor (as the serving path sends it) fails alone.
            with pytest.raises(InvalidRequest, match=message):
                ray.get(router.generate.remote(prompt, sampling))
        with pytest.raises(InvalidRequest, match="max_new_tokens must be a positive integer; got 0"):
            SamplingParams(max_new_tokens=0)
        assert [r.output_ids for r in ray.get(running)] == [ref.greedy(p) for p in PROMPTS]


def test_bad_expert_tensor_fails_at_load_with_no_actors_left(checkpoints, tmp_path, ray_local):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoints["mixtral"], tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.block_sparse_moe.experts.7.w2.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()  # header and data consistent, shape wrong
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    # Workers hold a CPU share each while alive: all of it must come back once the engine gives up.
    wait_for_condition(lambda: _free_cpus() == ray.cluster_resources()["CPU"])
    with pytest.raises(Exception, match="expert 7 of MoE layer 1"):
        Engine(EngineConfig(model=str(tmp_path), workers=2))
    wait_for_condition(lambda: _free_cpus() == ray.cluster_resources()["CPU"])
    with pytest.raises(CheckpointError, match="does not exist"):
        Engine(EngineConfig(model=str(tmp_path / "missing"), workers=2))
    assert _free_cpus() == ray.cluster_resources()["CPU"]


def test_bfloat16_runs_close_to_float32(checkpoints, oracle, ray_local):
    ref = oracle("mixtral")
    with Engine(EngineConfig(model=checkpoints["mixtral"], workers=2, dtype="bfloat16")) as engine:
        logits = torch.tensor(engine.score([PROMPTS[1]])[0])
        expected = ref.logits(PROMPTS[1])
        assert (logits - expected).abs().max() < 0.1 * expected.abs().max()
        assert len(engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4))[0].output_ids) >= 1


def test_streaming_matches_offline_and_abort_frees_the_slot(checkpoints, oracle, ray_local):
    arch = "olmoe"
    ref = oracle(arch)
    with Engine(EngineConfig(model=checkpoints[arch], workers=2, max_batch_size=2)) as engine:
        chunks = list(engine.stream(PROMPTS[1], SamplingParams(max_new_tokens=16)))
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
        results = engine.generate(PROMPTS[2:], SamplingParams(max_new_tokens=16))
        assert [r.output_ids for r in results] == [ref.greedy(p) for p in PROMPTS[2:]]
        assert not engine.abort("no-such-request")


def test_a_burst_three_times_the_kv_pool_completes_exactly(checkpoints, oracle, ray_local):
    from moeray.router.kv_config import KVCacheConfig

    arch = "qwen2_moe"
    ref = oracle(arch)
    prompts = [PROMPTS[i % len(PROMPTS)] + [50 + i] for i in range(12)]
    expected = [ref.greedy(p, 12) for p in prompts]
    need = sum(len(p) + len(e) for p, e in zip(prompts, expected))
    from moeray.model.backbone import inspect_checkpoint

    per_token = inspect_checkpoint(checkpoints[arch]).spec.kv_bytes_per_token(4)
    budget = per_token * (need // 3 // 4 * 4)  # a third of what the burst holds at its peak, in whole blocks of 4
    kv = KVCacheConfig(memory=budget, block_size=4, max_prefill_tokens=8)
    with Engine(EngineConfig(model=checkpoints[arch], workers=2, kv_cache=kv)) as engine:
        results = engine.generate(prompts, SamplingParams(max_new_tokens=12))
        assert [r.output_ids for r in results] == expected  # no request failed, and none changed
        (stats,) = ray.get([r.stats.remote() for r in engine.routers])
        assert stats["kv"]["preemptions"] > 0
        assert stats["kv"]["pool_bytes"] <= budget  # allocated once, within the budget
        assert stats["kv"]["blocks_used"] == 0  # every block came back
