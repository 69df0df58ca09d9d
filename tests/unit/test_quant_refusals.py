"""Quantized checkpoints moeray cannot serve exactly are refused at load, by name, before any actor starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeray.model.backbone import inspect_checkpoint
from moeray.model.checkpoint import CheckpointError
from moeray.model.tiny import save_fp8_checkpoint, save_mxfp4_checkpoint


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    return save_fp8_checkpoint("qwen3_moe", tmp_path_factory.mktemp("fp8") / "q", block=(4, 8))


def _edit(src, dst, *, config=None, tensors=None):
    """A copy of checkpoint ``src`` with ``config(dict)`` and ``tensors(dict)`` applied in place."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if config:
        config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(src / "model.safetensors"))
    if tensors:
        tensors(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _cli_generate(path):
    return subprocess.run([sys.executable, "-m", "moeray.cli", "generate", "--model", str(path), "--prompt-ids",
                           "5,6,7", "--max-new-tokens", "4", "--workers", "1", "--json"],
                          capture_output=True, text=True, timeout=120)


EXPERT = "model.layers.1.mlp.experts.3.down_proj"
CASES = {
    "awq": (dict(config=lambda c: c["quantization_config"].update(quant_method="awq")),
            "quantization method 'awq' is not supported; moeray serves fp8"),
    "missing-expert-scale": (dict(tensors=lambda s: s.pop(EXPERT + ".weight_scale_inv")),
                             "lacks the down_scale tensor of expert 3"),
    "missing-dense-scale": (dict(tensors=lambda s: s.pop("model.layers.0.self_attn.q_proj.weight_scale_inv")),
                            "FP8 tensor 'model.layers.0.self_attn.q_proj.weight' has no weight_scale_inv"),
    "wrong-scale-grid": (dict(tensors=lambda s: s.update({EXPERT + ".weight_scale_inv": torch.ones(10, 2)})),
                         f"scale tensor of '{EXPERT}.weight' has shape (10, 2); weight (40, 24) with 4x8 blocks "
                         f"needs (10, 3)"),
    "per-tensor-fp8": (dict(config=lambda c: c["quantization_config"].pop("weight_block_size")),
                       "weight_block_size None is not two positive integers"),
    "fp8-without-config": (dict(config=lambda c: c.pop("quantization_config")),
                           "stores fp8 experts, but config.json declares no quantization"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_at_load(fp8, tmp_path, case):
    edits, message = CASES[case]
    with pytest.raises(CheckpointError) as e:
        inspect_checkpoint(_edit(fp8, tmp_path / case, **edits))
    assert message in str(e.value)


@pytest.mark.parametrize("case", ["awq", "missing-expert-scale", "wrong-scale-grid"])
def test_cli_refuses_without_output(fp8, tmp_path, case):
    edits, message = CASES[case]
    proc = _cli_generate(_edit(fp8, tmp_path / case, **edits))
    assert proc.returncode != 0 and proc.stdout == ""
    assert message in proc.stderr


def test_mxfp4_missing_scales(tmp_path):
    src = save_mxfp4_checkpoint(tmp_path / "mx")
    bad = _edit(src, tmp_path / "bad", tensors=lambda s: s.pop("model.layers.0.mlp.experts.down_proj_scales"))
    with pytest.raises(CheckpointError, match=r"lacks its scale tensors \['down_scale'\]"):
        inspect_checkpoint(bad)


def test_info_reports_format_and_bytes(fp8, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moeray.cli", "info", "--model", str(fp8), "--workers", "3",
                           "--replicas", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert info["format"] == "fp8 e4m3, 4x8 blocks" and info["block_size"] == [4, 8]
    on_disk = (fp8 / "model.safetensors").stat().st_size
    assert on_disk - 64 * 1024 < info["bytes_on_disk"] <= on_disk  # tensor bytes: the file less its header
    # 8 experts + 1 replica over 3 workers: 3 slots per MoE layer; an expert is 3 projections of fp8 bytes plus
    # float32 scales per 4x8 block (qwen3_moe tiny: hidden 40, moe intermediate 24)
    h, i = 40, 24
    per_expert = 3 * h * i + 4 * ((2 * i // 4) * (h // 8) + (h // 4) * (i // 8))
    assert info["slots_per_worker"] == 3 and info["expert_bytes_per_worker"] == 2 * 3 * per_expert
