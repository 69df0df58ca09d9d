"""Quantized checkpoints as they are published (fine-grained FP8, gpt-oss MXFP4), served end to end.

The oracle is transformers' own CPU load of the same directory (it dequantizes on load; it needs accelerate).
Two transformers 5.24 gaps decide where the oracle is a dequantized copy instead, made with transformers' own
dequantization (``_dequantize_fp8_weight``, the one its FP8 linear uses): its CPU loader refuses FP8 blocks that
are partial at an edge ("Weight shape (20, 40) not divisible by scale grid (3, 5)"), and it loads the fused
experts its own FP8Experts saves (``gate_up_proj`` + ``gate_up_proj_scale_inv``) without applying their scales.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PROMPTS, Oracle
from moeray import Engine, EngineConfig, SamplingParams
from moeray.model.tiny import save_fp8_checkpoint, save_mxfp4_checkpoint

pytestmark = pytest.mark.ray
GREEDY = SamplingParams(max_new_tokens=16)


def dequantized_copy(src: Path, dst: Path) -> Path:
    """The same checkpoint with every FP8 tensor dequantized by transformers' code, saved unquantized."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    config = json.loads((src / "config.json").read_text())
    block = config.pop("quantization_config")["weight_block_size"]
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for key, t in tensors.items():
        if key.endswith("_scale_inv"):
            continue
        scale = tensors.get(key.removesuffix("weight") + "weight_scale_inv", tensors.get(key + "_scale_inv"))
        out[key] = t if scale is None else _dequantize_fp8_weight(t.clone(), scale, block, torch.float32)
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config))
    shutil.copy(src / "generation_config.json", dst / "generation_config.json")
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """name -> (checkpoint directory, the directory whose transformers load is the oracle)."""
    root = tmp_path_factory.mktemp("quantized")
    made = {
        # block sizes chosen so that transformers' CPU loader accepts them (every dimension a block multiple)
        "deepseek_v3-fp8-8x4": save_fp8_checkpoint("deepseek_v3", root / "ds84", block=(8, 4), seed=3),
        "deepseek_v3-fp8-4x8": save_fp8_checkpoint("deepseek_v3", root / "ds48", block=(4, 8), ue8m0=True, seed=3),
        "qwen3_moe-fp8-4x8": save_fp8_checkpoint("qwen3_moe", root / "q48", block=(4, 8), seed=2),
        "gpt_oss-mxfp4": save_mxfp4_checkpoint(root / "mx", seed=5),
    }
    out = {name: (path, path) for name, path in made.items()}
    # 16x16 blocks: partial at the edges of every 40-wide and 24-wide dimension (and I % 16 != 0: gate and up
    # are stacked with one scale row per weight row)
    partial = save_fp8_checkpoint("qwen3_moe", root / "q16", block=(16, 16), seed=2)
    out["qwen3_moe-fp8-16x16-partial"] = (partial, dequantized_copy(partial, root / "q16-ref"))
    fused = save_fp8_checkpoint("mixtral", root / "mixf", block=(4, 8), fused=True, seed=1)
    out["mixtral-fp8-fused"] = (fused, dequantized_copy(fused, root / "mixf-ref"))
    return out


# NOTE: two block sizes per layout: DeepSeek-V3 8x4 (test_cli_generate_fp8) and 4x8 (UE8M0 scales), Qwen3-MoE 4x8
# and 16x16 (partial edge blocks)
@pytest.mark.parametrize("name", ["deepseek_v3-fp8-4x8", "qwen3_moe-fp8-4x8", "gpt_oss-mxfp4",
                                  "qwen3_moe-fp8-16x16-partial", "mixtral-fp8-fused"])
def test_greedy_matches_transformers(ray_local, quantized, name):
    path, reference = quantized[name]
    ref = Oracle(str(reference))
    expected = [ref.greedy(p) for p in PROMPTS]
    with Engine(EngineConfig(model=str(path), workers=2, replicas=1)) as engine:
        assert [r.output_ids for r in engine.generate(PROMPTS, GREEDY)] == expected
        report = engine.memory_report()
        assert report["expert_format"].startswith(name.split("-")[1])
        if name == "deepseek_v3-fp8-4x8":  # every expert once on its workers (replicas=1 adds one copy per layer)
            _check_fp8_bytes(engine, report)
        if name.startswith("qwen3_moe-fp8-4x8"):
            engine.rebalance(policy="replicated")  # experts move between workers as stored, scales with them
            info = engine.workers_info()
            assert sum(w["fetched_slots"] + w["read_slots"] for w in info) > 0
            assert [r.output_ids for r in engine.generate(PROMPTS, GREEDY)] == expected


def _check_fp8_bytes(engine, report) -> None:
    """Resident expert bytes, scales counted, against the same experts held in fp32: at most 0.3x."""
    spec, slots = engine.spec, engine.plan.num_slots
    fp8_bytes = sum(report["worker_resident_bytes"])
    assert fp8_bytes == slots * spec.moe_layers[0].bytes_per_expert(4) * len(spec.moe_layers), "what the spec counts"
    fp32_bytes = slots * spec.moe_layers[0].params_per_expert * 4 * len(spec.moe_layers)
    assert fp8_bytes <= 0.3 * fp32_bytes, (fp8_bytes, fp32_bytes)


def _generate(path, *extra):
    return subprocess.run([sys.executable, "-m", "moeray.cli", "generate", "--model", str(path), "--prompt-ids",
                           "5,6,7", "--max-new-tokens", "16", "--workers", "2", "--dtype", "float32", "--json",
                           *extra], capture_output=True, text=True, timeout=240)


def test_cli_generate_fp8(quantized):
    path, reference = quantized["deepseek_v3-fp8-8x4"]
    proc = _generate(path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["output_ids"] == Oracle(str(reference)).greedy([5, 6, 7])
