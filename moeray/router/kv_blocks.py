"""Which KV blocks a router's sequences hold: a free list, reference counts and the prefix cache. Pure bookkeeping.

A **KV block** is ``block_size`` consecutive token positions of one sequence in the router's KV pool (the tensors
live in ``kv_pool.py``; this module only hands out block numbers). A sequence takes blocks as it grows and returns
them when it ends or is preempted.

Prefix reuse: a block that is full is registered under its content, ``(parent content id, its tokens)``, where the
parent is the block before it in the sequence. A new sequence walks its prompt block by block through that table
and shares every block that matches (reference counted), skipping their prefill. Keys are compared exactly (a
Python dict compares the token tuples on a hash match), so a collision can never hand a sequence foreign keys.
Content ids are never reused: a child registered under an evicted parent's id can no longer be reached. Blocks no
sequence holds stay cached until the pool needs them, evicted least recently used first.
"""

from __future__ import annotations

import collections
import dataclasses

ROOT = 0  # the content id a sequence's first block chains from


class OutOfBlocks(Exception):
    """Fewer free blocks than asked for (the scheduler preempts or waits; never a request's error)."""


@dataclasses.dataclass
class SeqBlocks:
    """One sequence's hold on the pool: its blocks in position order, and the content ids of the leading ones
    that are full and registered (``len(content_ids) <= len(block_ids)``)."""

    block_ids: list[int] = dataclasses.field(default_factory=list)
    content_ids: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Cached:
    block_id: int
    content_id: int


class BlockTable:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs at least one block of at least one token; got {num_blocks} blocks "
                             f"of {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._by_content: dict[tuple[int, tuple[int, ...]], _Cached] = {}
        self._content_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block id -> its key in _by_content
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unheld: LRU first
        self._next_content_id = ROOT + 1
        self.prefix_queries = 0  # prompt tokens looked up, and those found cached
        self.prefix_hits = 0

    # -- capacity ----------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now: never used, or cached but held by no sequence."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation --------------------------------------------------------------------------------------
    def grow(self, seq: SeqBlocks, num_tokens: int) -> None:
        """Give ``seq`` enough blocks to hold ``num_tokens`` positions; OutOfBlocks (taking none) if the pool
        cannot."""
        missing = self.blocks_for(num_tokens) - len(seq.block_ids)
        if missing <= 0:
            return
        if missing > self.num_free:
            raise OutOfBlocks(f"{missing} blocks needed, {self.num_free} free")
        for _ in range(missing):
            if self._free:
                block = self._free.popleft()
            else:  # evict the least recently used cached block
                block, _ = self._evictable.popitem(last=False)
                del self._by_content[self._content_of.pop(block)]
            self._refs[block] = 1
            seq.block_ids.append(block)

    def release(self, seq: SeqBlocks) -> None:
        """``seq`` ends or is preempted: its blocks go back (registered ones stay cached until evicted)."""
        for block in reversed(seq.block_ids):  # the tail of a sequence is the least likely to be shared: evict it first
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._content_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_ids.clear()
        seq.content_ids.clear()

    # -- prefix cache ------------------------------------------------------------------------------------
    def match_prefix(self, seq: SeqBlocks, token_ids: list[int], max_tokens: int) -> int:
        """Share the cached blocks that start ``token_ids`` (covering at most ``max_tokens`` positions) with an
        empty ``seq``; returns how many positions they cover."""
        assert not seq.block_ids
        self.prefix_queries += len(token_ids)
        if not self.prefix_caching:
            return 0
        parent, size = ROOT, self.block_size
        for start in range(0, max_tokens - size + 1, size):
            hit = self._by_content.get((parent, tuple(token_ids[start:start + size])))
            if hit is None:
                break
            if self._refs[hit.block_id] == 0:
                del self._evictable[hit.block_id]
            self._refs[hit.block_id] += 1
            seq.block_ids.append(hit.block_id)
            seq.content_ids.append(hit.content_id)
            parent = hit.content_id
        matched = len(seq.block_ids) * size
        self.prefix_hits += matched
        return matched

    def register_full(self, seq: SeqBlocks, token_ids: list[int], num_computed: int) -> None:
        """Register ``seq``'s blocks that ``num_computed`` positions (of ``token_ids``) have filled since the last
        call, so later sequences can share them."""
        if not self.prefix_caching:
            return
        size = self.block_size
        for index in range(len(seq.content_ids), num_computed // size):
            parent = seq.content_ids[-1] if seq.content_ids else ROOT
            key = (parent, tuple(token_ids[index * size:(index + 1) * size]))
            block = seq.block_ids[index]
            known = self._by_content.get(key)
            if known is not None:  # computed twice (two sequences at once): keep the first; chain from its content
                seq.content_ids.append(known.content_id)
                continue
            content = self._next_content_id
            self._next_content_id += 1
            self._by_content[key] = _Cached(block, content)
            self._content_of[block] = key
            seq.content_ids.append(content)

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
