"""The embedded demo checkpoint: a small Mixtral-style MoE that speaks, trained deterministically on first use.

``moeray serve`` and ``moeray generate`` use it when no ``--model`` is given, so a fresh machine can run the whole
service with no download. It is built from ``demo_corpus.txt`` (a short self-written English text kept in the
package): a byte-level BPE tokenizer with a ChatML-style chat template, then a 4-layer, 8-expert top-2 MoE trained
with AdamW (and Mixtral's load-balancing loss, so that experts specialise and all stay in use) until it has nearly
memorised the corpus. Greedy generation from a corpus prompt ("The sea", "Hello, experts") continues with the
corpus's words, and ``moeray placement inspect`` shows experts receiving different kinds of tokens.

The build is deterministic: fixed seeds, ``torch.use_deterministic_algorithms(True)``, a fixed thread count and a
fixed batch order, so building twice on one machine (one torch version, one CPU) gives byte-identical files. Another
torch version or CPU may round differently in the last bits and so train to slightly different weights (which still
speak the corpus, though greedy text may take another branch where the corpus has two). The checkpoint is built
once (about 25 s on 2 idle CPU cores, up to a minute on busy ones) and cached under ``$MOERAY_HOME/demo-<version>``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DEMO_VERSION = "v2"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")  # ids 0..4
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB_SIZE = 640  # special tokens + the 256 bytes + merges learnt from the corpus
CORPUS = Path(__file__).with_name("demo_corpus.txt")

# Training: AdamW on random windows of the corpus (a seeded generator), for a fixed number of steps.
TRAIN_STEPS = 300
TRAIN_BATCH = 16
TRAIN_SEQ_LEN = 64
TRAIN_LR = 3e-3
TRAIN_THREADS = 1  # fixed: some kernels' reduction order (so the last bits) depends on it; 1 also never oversubscribes
SEED = 0

BYTE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # byte_tokenizer(): ids 0, 1, 2; bytes follow from id 3


def demo_corpus() -> str:
    return CORPUS.read_text(encoding="utf-8")


def demo_config(vocab_size: int = VOCAB_SIZE) -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        vocab_size=vocab_size, hidden_size=96, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        router_aux_loss_coef=0.05,
    )


def demo_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained (deterministically) on the corpus, with the chat template.

    Every byte is in the vocabulary, so any UTF-8 text round-trips; the chat markers are single special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The chat markers are special tokens, never part of a merge: train on the text between them.
    text = demo_corpus()
    for marker in SPECIAL_TOKENS:
        text = text.replace(marker, "\n")
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Every byte is one token (id = 3 + byte), so any UTF-8 text round-trips. (The demo before v2 used it.)"""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # NOTE: order the 256 byte symbols by the byte they stand for, so token id = 3 + byte value.
    byte_to_char = {b: c for b, c in enumerate(sorted(byte_chars, key=_byte_of_symbol))}
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIAL_TOKENS)}
    vocab.update({byte_to_char[b]: len(BYTE_SPECIAL_TOKENS) + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(BYTE_SPECIAL_TOKENS))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def _byte_of_symbol(symbol: str) -> int:
    # GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to 256 + n in order.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    code = ord(symbol)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


@contextlib.contextmanager
def _deterministic_torch(threads: int):
    """Fixed threads, deterministic algorithms and a private RNG state; the caller's settings come back after."""
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)


def train_demo_model(tokenizer: transformers.PreTrainedTokenizerFast, steps: int = TRAIN_STEPS, seed: int = SEED,
                     log: Callable[[int, float], None] | None = None) -> transformers.MixtralForCausalLM:
    """The demo MoE trained on the corpus: float32, on CPU, deterministic (see the module's docstring)."""
    ids = torch.tensor(tokenizer(demo_corpus(), add_special_tokens=False)["input_ids"], dtype=torch.long)
    newline = [i for i, t in enumerate(tokenizer.convert_ids_to_tokens(ids.tolist())) if "Ċ" in t]  # 'Ċ' = '\n'
    line_starts = torch.tensor([0] + [i + 1 for i in newline if i + 1 < len(ids)], dtype=torch.long)
    config = demo_config(len(tokenizer))
    with _deterministic_torch(TRAIN_THREADS):
        torch.manual_seed(seed)
        model = transformers.MixtralForCausalLM(config).to(torch.float32)
        model.config.output_router_logits = True  # adds the load-balancing loss to the loss
        model.train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                lr=TRAIN_LR, betas=(0.9, 0.95))
        warmup = max(1, steps // 15)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
        gen = torch.Generator().manual_seed(seed)
        cyclic = torch.cat([ids, ids[:TRAIN_SEQ_LEN]])
        for step in range(steps):
            # Half the windows start at a line's start, as a prompt does; the rest anywhere.
            anywhere = torch.randint(0, len(ids), (TRAIN_BATCH,), generator=gen)
            at_line = line_starts[torch.randint(0, len(line_starts), (TRAIN_BATCH,), generator=gen)]
            starts = torch.where(torch.arange(TRAIN_BATCH) % 2 == 0, at_line, anywhere)
            batch = torch.stack([cyclic[s:s + TRAIN_SEQ_LEN] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if log is not None:
                log(step, loss.item())
        model.config.output_router_logits = False
        model.eval()
    return model


def build_demo_checkpoint(path: str | os.PathLike, steps: int = TRAIN_STEPS) -> Path:
    """Train the demo model and write it as an HF checkpoint (config, safetensors, generation config, tokenizer)."""
    path = Path(path)
    tokenizer = demo_tokenizer()
    model = train_demo_model(tokenizer, steps)
    model.save_pretrained(path)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2, im_end], pad_token_id=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def demo_checkpoint_dir() -> Path:
    home = Path(os.environ.get("MOERAY_HOME", Path.home() / ".cache" / "moeray"))
    return home / f"demo-{DEMO_VERSION}"


def ensure_demo_checkpoint() -> Path:
    """Create the demo checkpoint once (atomically, so concurrent callers are safe) and return its directory."""
    target = demo_checkpoint_dir()
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".demo-"))
    log = logging.getLogger("moeray")
    log.info("building the demo checkpoint (once; about a minute on 2 CPU cores) into %s", target)
    started = time.monotonic()
    try:
        build_demo_checkpoint(staging)
        log.info("demo checkpoint built in %.0f s", time.monotonic() - started)
        try:
            staging.rename(target)
        except OSError:  # another process got there first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
