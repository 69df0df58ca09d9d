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


# the gate biases that choose experts: gpt-oss's router bias, DeepSeek-V3's score-correction bias (selection only)
_SELECTION_BIASES = ("mlp.router.bias", "mlp.gate.e_score_correction_bias")


def save_random_checkpoint(config: PretrainedConfig, path: str | os.PathLike, seed: int = 0,
                           dtype: torch.dtype = torch.float32, hot_expert: int | None = None) -> Path:
    """Random-init ``config`` with ``seed`` and save it (config.json + safetensors + generation config).
    ``hot_expert``: raise that expert's gate bias in every MoE layer so that it is every token's first choice
    (the skew replicas exist for); only architectures with a selection bias (gpt_oss, deepseek_v3) have one."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    raised = 0
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("bias"):  # router/expert/attention biases and DeepSeek's e_score_correction_bias
                t.normal_(0.0, 0.2)
            if hot_expert is not None and name.endswith(_SELECTION_BIASES):
                t[hot_expert] += 10.0  # far above the other logits, yet the others keep a weight
                raised += 1
    if hot_expert is not None and not raised:
        raise ValueError(f"{config.model_type} has no gate selection bias to make expert {hot_expert} hot; "
                         f"use one of gpt_oss, deepseek_v3")
    path = Path(path)
    model.save_pretrained(path)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(path)
    return path


def save_tiny_checkpoint(arch: str, path: str | os.PathLike, seed: int = 0, hot_expert: int | None = None,
                         **overrides) -> Path:
    return save_random_checkpoint(tiny_config(arch, **overrides), path, seed, hot_expert=hot_expert)


def _quantizable(key: str) -> bool:
    """The Linear weights published FP8 checkpoints quantize: attention, shared and dense MLP projections and
    routed experts; embeddings, norms, router gates and the LM head stay unquantized."""
    parts = key.split(".")
    return key.endswith(".weight") and len(parts) > 2 and ("proj" in parts[-2] or parts[-2] in ("w1", "w2", "w3"))


def _write_quantized(src: Path, path: Path, tensors: dict, quantization_config: dict) -> Path:
    import json
    import shutil

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    for name in ("generation_config.json",):
        if (src / name).exists():
            shutil.copy(src / name, path / name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


def save_fp8_checkpoint(arch: str, path: str | os.PathLike, *, block: tuple[int, int], fused: bool = False,
                        ue8m0: bool = False, seed: int = 0, **overrides) -> Path:
    """A tiny seeded ``arch`` checkpoint in fine-grained FP8, as DeepSeek-V3 and Qwen3-FP8 publish it: every
    projection float8_e4m3fn with a float32 ``weight_scale_inv`` per ``block`` (partial blocks at the edges).
    ``fused``: experts as transformers' FP8Experts saves them (``gate_up_proj`` [E, 2I, H] + scales).
    ``ue8m0``: scales are powers of two stored as float8_e8m0fnu (``scale_fmt: ue8m0``, DeepSeek-V3.1 style)."""
    from safetensors.torch import load_file

    from moeray.kernels.quantized import quantize_fp8

    path = Path(path)
    src = save_tiny_checkpoint(arch, path / "_unquantized", seed, **overrides)
    plain = load_file(str(src / "model.safetensors"))
    out: dict = {}
    experts: dict = {}  # (prefix, expert) -> {role: tensor}, for the fused layout
    for key, t in plain.items():
        parts = key.split(".")
        if fused and "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            i = parts.index("experts")
            experts.setdefault(".".join(parts[: i + 1]).replace("block_sparse_moe", "mlp"), {})[
                (int(parts[i + 1]), parts[i + 2])] = t
        elif _quantizable(key):
            out[key], out[key.removesuffix("weight") + "weight_scale_inv"] = quantize_fp8(t, block, ue8m0)
        else:
            out[key] = t
    for prefix, tensors in experts.items():
        count = 1 + max(e for e, _ in tensors)
        role = lambda e, *names: next(tensors[(e, n)] for n in names if (e, n) in tensors)
        gate_up = [torch.cat([role(e, "gate_proj", "w1"), role(e, "up_proj", "w3")]) for e in range(count)]
        down = [role(e, "down_proj", "w2") for e in range(count)]
        for name, mats in (("gate_up_proj", gate_up), ("down_proj", down)):
            pairs = [quantize_fp8(m, block, ue8m0) for m in mats]
            out[f"{prefix}.{name}"] = torch.stack([q for q, _ in pairs])
            out[f"{prefix}.{name}_scale_inv"] = torch.stack([s for _, s in pairs])
    import shutil
    result = _write_quantized(src, path, out, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                               "weight_block_size": list(block), "fmt": "e4m3",
                                               "scale_fmt": "ue8m0" if ue8m0 else "float"})
    shutil.rmtree(src)
    return result


def save_mxfp4_checkpoint(path: str | os.PathLike, *, seed: int = 0, **overrides) -> Path:
    """A tiny seeded gpt-oss checkpoint with MXFP4 experts, laid out as openai/gpt-oss publishes them:
    ``gate_up_proj_blocks`` [E, 2I, H/32, 16] and ``gate_up_proj_scales`` [E, 2I, H/32] (interleaved gate/up rows),
    ``down_proj_blocks`` [E, H, I/32, 16] and scales; biases and everything else unquantized."""
    import shutil

    from safetensors.torch import load_file

    from moeray.kernels.quantized import quantize_mxfp4

    path = Path(path)
    overrides = {"hidden_size": 64, "intermediate_size": 32, "head_dim": 16, **overrides}
    src = save_tiny_checkpoint("gpt_oss", path / "_unquantized", seed, **overrides)
    out = {}
    for key, t in load_file(str(src / "model.safetensors")).items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            pairs = [quantize_mxfp4(m.t()) for m in t]  # [H, 2I] / [I, H] per expert on disk: out-features first
            out[key + "_blocks"] = torch.stack([q.view(q.shape[0], -1, 16) for q, _ in pairs])
            out[key + "_scales"] = torch.stack([s for _, s in pairs])
        else:
            out[key] = t
    result = _write_quantized(src, path, out, {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"]})
    shutil.rmtree(src)
    return result


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")  # ids 0..5: pad, bos, eos as above


def save_tokenized_checkpoint(arch: str, path: str | os.PathLike, *, corpus: str, chat_template: str | None = None,
                              seed: int = 0, **overrides) -> Path:
    """A tiny ``arch`` checkpoint whose vocabulary is a byte-level BPE tokenizer's, trained here on ``corpus`` (300
    tokens, the special ones first), saved beside it with ``chat_template``: for what needs text (the OpenAI API,
    structured outputs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        chat_template=chat_template)
    out = save_tiny_checkpoint(arch, path, seed=seed, vocab_size=len(tokenizer), **overrides)
    tokenizer.save_pretrained(path)
    return out
