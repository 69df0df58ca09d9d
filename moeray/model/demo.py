"""The embedded demo checkpoint: a tiny Mixtral-style MoE with a byte-level tokenizer, built deterministically.

``moeray serve`` and ``moeray generate`` use it when no ``--model`` is given, so a fresh machine can run the whole
service with no download. Its weights are random (seeded): its text is gibberish, but every path is real.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from moeray.model.tiny import save_random_checkpoint

DEMO_VERSION = "v1"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2; bytes follow from id 3


def demo_config() -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        vocab_size=len(SPECIAL_TOKENS) + 256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Every byte is one token, so any UTF-8 text round-trips."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # NOTE: order the 256 byte symbols by the byte they stand for, so token id = 3 + byte value.
    byte_to_char = {b: c for b, c in enumerate(sorted(byte_chars, key=_byte_of_symbol))}
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({byte_to_char[b]: len(SPECIAL_TOKENS) + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
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
    try:
        save_random_checkpoint(demo_config(), staging, seed=0)
        byte_tokenizer().save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process got there first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
