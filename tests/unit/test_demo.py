"""The embedded demo checkpoint (no Ray): built deterministically, a tokenizer that round-trips any text, a chat
template, and a trained model whose greedy text is the corpus's (a random model's would not be)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from moeray.model import demo

FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="session")
def demo_builds(demo_home, tmp_path_factory):
    """The demo checkpoint built twice, each by ensure_demo_checkpoint() in its own MOERAY_HOME (~25 s each); the
    first is the session's shared one (conftest.demo_home)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOERAY_HOME", str(tmp_path_factory.mktemp("home-b")))
        second = demo.ensure_demo_checkpoint()
    return [demo_home / f"demo-{demo.DEMO_VERSION}", second]


@pytest.fixture(scope="session")
def demo_model(demo_builds):
    path = demo_builds[0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(path), model, GenerationConfig.from_pretrained(path)


def _greedy(tokenizer, model, gen_config, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=gen_config, do_sample=False,
                             max_new_tokens=max_new_tokens)
    return out[0, len(ids):].tolist()


def test_build_is_deterministic_and_cached(demo_builds):
    a, b = demo_builds
    assert a.name == b.name == f"demo-{demo.DEMO_VERSION}" and a != b
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not [p for p in a.parent.iterdir() if p.name.startswith(".demo-")]  # no staging folder left behind
    # A second call finds the checkpoint and builds nothing.
    before = (a / "model.safetensors").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOERAY_HOME", str(a.parent))
        assert demo.ensure_demo_checkpoint() == a
    assert (a / "model.safetensors").stat().st_mtime_ns == before


def test_checkpoint_files(demo_builds):
    path = demo_builds[0]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 8
    assert config["num_experts_per_tok"] == 2 and not config.get("output_router_logits")
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert config["vocab_size"] == len(tokenizer) == demo.VOCAB_SIZE
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(path).eos_token_id == [tokenizer.eos_token_id, im_end]


@pytest.mark.parametrize("text", ["The sea is wide and deep.", "Hello, experts! 🤖🌊 ünïcödé",
                                  "专家混合模型 と 海", "tabs\tand\nnewlines  and   spaces", "\x00\x01 \x7f"])
def test_tokenizer_round_trips_any_text(text):
    tokenizer = demo.demo_tokenizer()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_tokenizer_is_bpe_with_special_tokens():
    tokenizer = demo.demo_tokenizer()
    assert tokenizer.convert_tokens_to_ids(list(demo.SPECIAL_TOKENS)) == list(range(len(demo.SPECIAL_TOKENS)))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    # Merges learnt from the corpus: its words are a token or two, not a byte each.
    assert len(tokenizer("The sea is wide and deep", add_special_tokens=False)["input_ids"]) <= 8
    # The chat markers are single tokens wherever they occur.
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 3 and ids[-1] == 4


def test_chat_template_renders(demo_builds):
    tokenizer = AutoTokenizer.from_pretrained(demo_builds[0])
    messages = [{"role": "user", "content": "What is the sea?"}, {"role": "assistant", "content": "Wide."},
                {"role": "user", "content": "Thank you."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user\nWhat is the sea?<|im_end|>\n<|im_start|>assistant\nWide.<|im_end|>\n"
                    "<|im_start|>user\nThank you.<|im_end|>\n<|im_start|>assistant\n")
    # The corpus's chat exchanges are in exactly this shape, so the model has learnt it.
    turn = tokenizer.apply_chat_template(messages[:1], tokenize=False)
    assert turn in demo.demo_corpus()


def test_byte_tokenizer_still_works():
    tokenizer = demo.byte_tokenizer()
    assert tokenizer("Hé", add_special_tokens=False)["input_ids"] == [3 + b for b in "Hé".encode()]
    assert tokenizer.decode([3 + b for b in "🤖".encode()]) == "🤖"


@pytest.mark.parametrize("prompt", ["The fisherman casts his net", "There are twelve months in a year:",
                                    "Once there was a router who", "The lighthouse shines"])
def test_greedy_continues_the_corpus(demo_model, prompt):
    tokenizer, model, gen_config = demo_model
    corpus = demo.demo_corpus()
    assert corpus.count(prompt) == 1
    expected = corpus[corpus.index(prompt) + len(prompt):]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(_greedy(tokenizer, model, gen_config, ids, 32))
    same = next((i for i, (x, y) in enumerate(zip(text, expected)) if x != y), min(len(text), len(expected)))
    assert same >= 40, (prompt, text)


def test_the_sea_speaks(demo_model):
    """The issue's example: "The sea" continues with a sentence of the corpus (whichever: a branch point such as
    "The sea is" -> "wide" / "blue" may go either way with another torch's last bits)."""
    tokenizer, model, gen_config = demo_model
    ids = tokenizer("The sea", add_special_tokens=False)["input_ids"]
    text = "The sea" + tokenizer.decode(_greedy(tokenizer, model, gen_config, ids, 32), skip_special_tokens=True)
    sentence = text.split("\n")[0]
    assert len(sentence) >= 30 and sentence in demo.demo_corpus(), text


def test_chat_answer(demo_model):
    tokenizer, model, gen_config = demo_model
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "How many experts are there?"}],
                                        add_generation_prompt=True, return_dict=True)["input_ids"]
    out = _greedy(tokenizer, model, gen_config, list(ids), 40)
    assert out[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.decode(out)  # stops at the turn's end
    assert tokenizer.decode(out[:-1]) == "There are eight experts in every layer, and each token goes to two of them."


def test_every_expert_is_used(demo_model):
    """The load-balancing loss keeps all experts in use: over the corpus, each gets a fair share in every layer."""
    tokenizer, model, _ = demo_model
    ids = tokenizer(demo.demo_corpus(), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        router_logits = model(ids, output_router_logits=True).router_logits
    assert len(router_logits) == model.config.num_hidden_layers
    for layer, logits in enumerate(router_logits):
        chosen = logits.topk(model.config.num_experts_per_tok, dim=-1).indices.flatten()
        share = torch.bincount(chosen, minlength=model.config.num_local_experts) / chosen.numel()
        assert share.min() >= 0.02, (layer, share.tolist())
