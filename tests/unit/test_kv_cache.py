"""The paged KV cache: block bookkeeping (pure), and chunked prefill, prefix reuse and preemption against
transformers on every architecture (experts in-process, no Ray)."""

import pytest
import torch

from conftest import PROMPTS
from local_experts import LocalExperts
from moeray.model.architecture import kv_layout_of
from moeray.model.backbone import build_backbone
from moeray.model.tiny import ARCHITECTURES
from moeray.request import InvalidRequest, SamplingParams
from moeray.router.kv_blocks import BlockTable, OutOfBlocks, SeqBlocks
from moeray.router.kv_pool import KVPool
from moeray.router.scheduler import Scheduler
from moeray.router.sequence import Sequence

LONG = [3 + (7 * i) % 90 for i in range(23)]  # longer than every chunk below, and past GPT-OSS's window of 6


# -- block bookkeeping ----------------------------------------------------------------------------------
def test_blocks_grow_release_and_refuse_past_the_pool():
    table = BlockTable(num_blocks=4, block_size=2)
    a, b = SeqBlocks(), SeqBlocks()
    table.grow(a, 3)
    assert len(a.block_ids) == 2 and table.num_free == 2
    with pytest.raises(OutOfBlocks):
        table.grow(b, 5)
    assert b.block_ids == [] and table.num_free == 2  # a refused grow takes nothing
    table.release(a)
    assert table.num_free == 4 and a.block_ids == []


def test_prefix_blocks_are_shared_exactly_and_evicted_least_recently_used():
    table = BlockTable(num_blocks=4, block_size=2)
    a = SeqBlocks()
    tokens = [1, 2, 3, 4, 5]
    table.grow(a, 5)
    table.register_full(a, tokens, 5)
    assert len(a.content_ids) == 2  # the third block is not full
    b = SeqBlocks()
    assert table.match_prefix(b, tokens, max_tokens=4) == 4 and b.block_ids == a.block_ids[:2]
    c = SeqBlocks()
    assert table.match_prefix(c, [1, 2, 9, 4], max_tokens=4) == 2  # the second block differs in one token
    d = SeqBlocks()
    assert table.match_prefix(d, [3, 4, 5, 6], max_tokens=4) == 0  # same tokens, but not after the same parent
    for s in (a, b, c):
        table.release(s)
    assert table.num_free == 4  # cached blocks no sequence holds are free to take
    e = SeqBlocks()
    table.grow(e, 6)  # takes the never-cached block, then evicts the least recently used cached ones
    assert table.match_prefix(SeqBlocks(), tokens, max_tokens=4) == 2
    table.release(e)
    off = BlockTable(num_blocks=2, block_size=2, prefix_caching=False)
    f = SeqBlocks()
    off.grow(f, 4)
    off.register_full(f, tokens, 4)
    assert off.match_prefix(SeqBlocks(), tokens, 4) == 0


# -- against transformers -------------------------------------------------------------------------------
def _scheduler(path, **kw):
    experts = LocalExperts(path)
    model, _ = build_backbone(path, torch.float32, experts)
    return Scheduler(model, on_forward=lambda ids: None, max_batch_size=8, **kw)


def _run(scheduler, prompts, eos=(), n=12):
    seqs = [Sequence(request_id=f"r{i}-{scheduler.steps}", prompt_ids=p, sampling=SamplingParams(max_new_tokens=n),
                     stop_ids=frozenset(eos)) for i, p in enumerate(prompts)]
    for s in seqs:
        scheduler.submit(s)
    while not all(s.done.is_set() for s in seqs):
        scheduler.step()
    assert all(s.error is None for s in seqs)
    return [s.output_ids for s in seqs]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_prefill_prefix_hits_and_preemption_match_transformers(arch, checkpoints, oracle):
    ref = oracle(arch)
    prompts = PROMPTS + [LONG]
    expected = [ref.greedy(p, 12) for p in prompts]
    # Chunks of 5 prompt tokens beside the running decodes; blocks of 4 positions.
    chunked = _scheduler(checkpoints[arch], block_size=4, max_prefill_tokens=5)
    assert _run(chunked, prompts, ref.eos) == expected
    # The same prompts again: their full blocks are found in the prefix cache, and outputs do not change.
    hits = chunked.prefix_hits
    assert _run(chunked, prompts, ref.eos) == expected
    assert chunked.prefix_hits > hits
    # A pool of 10 blocks of 4 (40 positions) for 5 sequences that need up to 87: preemption and recompute.
    small = _scheduler(checkpoints[arch], block_size=4, max_prefill_tokens=5, kv_cache_bytes=_bytes(chunked, 10))
    assert _run(small, prompts, ref.eos) == expected
    assert small.preemptions > 0 and small.blocks.num_free == small.blocks.num_blocks


def _bytes(scheduler, blocks):
    return blocks * scheduler.pool.block_size * scheduler.pool.bytes_per_token


def test_a_request_the_pool_could_never_hold_is_refused(checkpoints):
    scheduler = _scheduler(checkpoints["mixtral"], block_size=4)
    tiny = _scheduler(checkpoints["mixtral"], block_size=4, kv_cache_bytes=_bytes(scheduler, 2))
    seq = Sequence(request_id="big", prompt_ids=[5] * 6, sampling=SamplingParams(max_new_tokens=3),
                   stop_ids=frozenset())
    with pytest.raises(InvalidRequest, match="exceeds the router's KV cache of 8 tokens"):
        tiny.submit(seq)


def test_the_pool_holds_the_mla_latent_not_expanded_keys(checkpoints):
    experts = LocalExperts(checkpoints["deepseek_v3"])
    model, _ = build_backbone(checkpoints["deepseek_v3"], torch.float32, experts)
    config = model.config
    layers = kv_layout_of(model)
    per_token = KVPool.bytes_per_token_of(layers, torch.float32)
    assert per_token == config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
    expanded = config.num_hidden_layers * config.num_attention_heads * (
        config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * 4
    assert per_token < expanded


def test_kv_cache_memory_is_bytes_or_a_fraction_of_free_memory():
    from moeray.router.kv_config import KVCacheConfig

    cpu = torch.device("cpu")
    assert KVCacheConfig(memory="2MiB").pool_bytes(cpu) == 2 * 2**20 == KVCacheConfig(memory=2 * 2**20).fixed_bytes()
    assert KVCacheConfig().pool_bytes(cpu) is None  # the scheduler's default
    half = KVCacheConfig(memory="0.5")
    assert half.fixed_bytes() is None and 0 < half.pool_bytes(cpu) < KVCacheConfig(memory=1.0).pool_bytes(cpu)
    for bad, message in [("1.5", r"fraction '1.5' must be in \(0, 1\]"), ("0", "must be positive"),
                         ("lots", "is not a number")]:
        with pytest.raises(ValueError, match=message):
            KVCacheConfig(memory=bad)
    with pytest.raises(ValueError, match="max_prefill_tokens must be >= 1; got 0"):
        KVCacheConfig(max_prefill_tokens=0)
