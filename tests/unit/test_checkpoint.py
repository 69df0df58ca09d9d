"""Loading: bad checkpoints fail with a clear error; every layout reads back exactly what transformers loads."""

import json
import shutil

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from moeray.model.backbone import inspect_checkpoint
from moeray.model.checkpoint import CheckpointError
from moeray.model.tiny import ARCHITECTURES, save_random_checkpoint
from moeray.model.weights import TensorReader, read_expert


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_checkpoint(tmp_path / "nope")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        inspect_checkpoint(tmp_path)


def test_dense_model_is_not_moe(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    save_random_checkpoint(config, tmp_path)
    with pytest.raises(CheckpointError, match="not a Mixture-of-Experts model"):
        inspect_checkpoint(tmp_path)


def test_unsupported_architecture(tmp_path, checkpoints):
    shutil.copytree(checkpoints["mixtral"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "moe_from_the_future"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a model transformers"):
        inspect_checkpoint(tmp_path)


def test_truncated_safetensors(tmp_path, checkpoints):
    shutil.copytree(checkpoints["mixtral"], tmp_path, dirs_exist_ok=True)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        inspect_checkpoint(tmp_path)


def test_no_safetensors(tmp_path, checkpoints):
    shutil.copy(f"{checkpoints['mixtral']}/config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        inspect_checkpoint(tmp_path)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_read_expert_matches_transformers_weights(arch, checkpoints):
    """Each worker reads its experts alone; they must equal what transformers' own loader builds."""
    info = inspect_checkpoint(checkpoints[arch])
    model = AutoModelForCausalLM.from_pretrained(checkpoints[arch], dtype=torch.float32)
    modules = dict(model.named_modules())
    reader = TensorReader()
    for layer, source in zip(info.spec.moe_layers, info.index.experts):
        hf = modules[layer.module_path]
        for e in (0, layer.num_experts - 1):
            got = read_expert(reader, layer, source, e, torch.float32)
            gate_up, down = hf.gate_up_proj[e], hf.down_proj[e]
            if layer.is_transposed:
                gate_up, down = gate_up.t(), down.t()
            if not layer.is_concatenated:
                gate_up = torch.cat([gate_up[0::2], gate_up[1::2]])
            assert torch.equal(got["gate_up"], gate_up)
            assert torch.equal(got["down"], down)
            if layer.has_bias:
                b = hf.gate_up_proj_bias[e]
                assert torch.equal(got["gate_up_bias"], torch.cat([b[0::2], b[1::2]]))
                assert torch.equal(got["down_bias"], hf.down_proj_bias[e])


def test_spec_counts_match_transformers(checkpoints):
    for arch in ("deepseek_v3", "gpt_oss"):
        info = inspect_checkpoint(checkpoints[arch])
        model = AutoModelForCausalLM.from_pretrained(checkpoints[arch])
        assert info.spec.total_params == sum(p.numel() for p in model.parameters())
        assert info.spec.active_params < info.spec.total_params
    ds = inspect_checkpoint(checkpoints["deepseek_v3"]).spec
    assert [l.decoder_layer for l in ds.moe_layers] == [1, 2]  # layer 0 is dense (first_k_dense_replace=1)
