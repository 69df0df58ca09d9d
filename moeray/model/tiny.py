"""Tiny, seeded, random-init MoE checkpoints of every supported architecture, written in the Hugging Face format.

Tests, benchmarks and the demo build their models here (no hub). Sizes are deliberately not powers of two, and every
bias-like tensor is given nonzero values so that router biases, expert biases and DeepSeek's score-correction bias
actually change the routing being tested.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig

ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss")

_COMMON = dict(vocab_size=131, hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               tie_word_embeddings=False, initializer_range=0.15)


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    """A small config of ``arch`` with 8 experts, top-2; ``overrides`` replace any field."""
    c = dict(_COMMON)
    if arch == "mixtral":
        c.update(intermediate_size=56, num_local_experts=8, num_experts_per_tok=2)
        cls = transformers.MixtralConfig
    elif arch == "qwen2_moe":
        c.update(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=44, num_experts=8,
                 num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False)
        cls = transformers.Qwen2MoeConfig
    elif arch == "qwen3_moe":
        c.update(intermediate_size=64, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2, head_dim=10,
                 norm_topk_prob=True)
        cls = transformers.Qwen3MoeConfig
    elif arch == "deepseek_v3":
        c.update(num_hidden_layers=3, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=24,
                 n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                 first_k_dense_replace=1, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, rope_scaling=None)
        cls = transformers.DeepseekV3Config
    elif arch == "olmoe":
        c.update(intermediate_size=24, num_experts=8, num_experts_per_tok=2)
        cls = transformers.OlmoeConfig
    elif arch == "gpt_oss":
        c.update(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=10, sliding_window=6)
        cls = transformers.GptOssConfig
    else:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    c.update(overrides)
    return cls(**c)


def save_random_checkpoint(config: PretrainedConfig, path: str | os.PathLike, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> Path:
    """Random-init ``config`` with ``seed`` and save it (config.json + safetensors + generation config)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("bias"):  # router/expert/attention biases and DeepSeek's e_score_correction_bias
                t.normal_(0.0, 0.2)
    path = Path(path)
    model.save_pretrained(path)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(path)
    return path


def save_tiny_checkpoint(arch: str, path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    return save_random_checkpoint(tiny_config(arch, **overrides), path, seed)
