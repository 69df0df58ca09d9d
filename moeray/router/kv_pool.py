"""The router's KV pool and the attention that reads it: one packed forward per step, any mix of prefill and decode.

A step's new tokens (each running sequence's next token, and chunks of prompts) are packed into one row,
``input_ids[1, Q]``, with each token's own position id: everything but attention is per token, so the dense
layers and the experts see no padding at all. Attention is the one place sequences must stay apart. transformers'
attention modules call ``cache.update(keys, values, layer_idx)`` and then the model's attention function, so moeray
plugs in at exactly those two seams:

- ``StepLayout.update`` (the cache) writes the step's new keys and values into their pool slots, then returns the
  keys of every sequence in the step, gathered from the pool into a **key layout**: first the decoding sequences
  (one new token each) as a ``[B, L]`` block, right-padded to the longest, then each sequence with several new
  tokens (a prefill chunk) as its own segment.
- ``paged_attention`` (registered with transformers' ``AttentionInterface``) runs the decode block as one batched
  attention and each segment on its own, with exact causal, sliding-window and attention-sink semantics.

Why not transformers' own paged attention (``paged|sdpa``): it attends every packed query to every packed key
under one block-diagonal mask, so a decode step of B sequences costs B times the attention it needs; and its cache
assumes keys and values of one head size, which DeepSeek's MLA breaks. MLA is served as transformers writes it:
the cache holds the compressed latent (``kv_nope`` and the shared rotary key, one head each) and the attention
module expands it after ``update``; the pool just stores those two instead of keys and values.

Sliding-window layers (GPT-OSS, Mixtral with a window) read only their window through the masks; the pool keeps
every position's blocks, since full-attention layers of the same model still need them.

Because moeray's name is not among transformers' mask functions, the model builds no mask of its own (it would
assume one padded batch); every mask here comes from the layout.

Shape legend: Q new tokens in the step, K positions in the key layout, N pool slots (blocks x block size),
H heads, D head size, B decoding sequences, L their longest length, n and l a segment's new tokens and keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from moeray.model.architecture import LayerKV
from moeray.model.checkpoint import CheckpointError

ATTN_IMPLEMENTATION = "moeray_paged"
_active = threading.local()  # the layout of the forward running on this thread


class KVPool:
    """Keys and values of every attention layer, ``[N, H, D]`` per layer, allocated once."""

    def __init__(self, layers: list[LayerKV], num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.layers, self.num_blocks, self.block_size = layers, num_blocks, block_size
        slots = num_blocks * block_size
        self.keys_NHD = [torch.zeros(slots, *layer.key, dtype=dtype, device=device) for layer in layers]
        self.values_NHD = [torch.zeros(slots, *layer.value, dtype=dtype, device=device) for layer in layers]
        self.bytes_per_token = self.bytes_per_token_of(layers, dtype)

    @staticmethod
    def bytes_per_token_of(layers: list[LayerKV], dtype: torch.dtype) -> int:
        return sum(layer.elements for layer in layers) * torch.finfo(dtype).bits // 8

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys_NHD + self.values_NHD)


@dataclasses.dataclass(frozen=True)
class Row:
    """One sequence in a step: ``context`` positions already cached, ``new`` positions computed now, and the pool
    blocks holding its positions in order (none when the step keeps no cache)."""

    context: int
    new: int
    block_ids: Sequence[int] = ()


class Segment(NamedTuple):
    """A sequence with several new tokens in the key layout: its queries ``q_start:q_start + new`` and keys
    ``k_start:k_start + keys``, the first ``context`` of them cached before this step."""

    q_start: int
    new: int
    k_start: int
    keys: int
    context: int


class StepLayout:
    """One forward's cache: where each new token's keys go, and the key layout attention reads.

    Rows with one new token come first (the decode block), then the others (segments), in the order given.
    """

    def __init__(self, rows: list[Row], pool: KVPool | None, device: torch.device | str = "cpu") -> None:
        self.pool = pool
        self.num_decode = next((i for i, r in enumerate(rows) if r.new != 1), len(rows))
        if any(r.new == 1 for r in rows[self.num_decode:]):
            raise ValueError("rows with one new token must come first")
        decode, self.segments = rows[:self.num_decode], []
        self.decode_len_B = torch.tensor([r.context + 1 for r in decode], dtype=torch.long)
        self.decode_width = int(self.decode_len_B.max()) if decode else 0
        q_start, k_start = self.num_decode, self.num_decode * self.decode_width
        for r in rows[self.num_decode:]:
            self.segments.append(Segment(q_start, r.new, k_start, r.context + r.new, r.context))
            q_start, k_start = q_start + r.new, k_start + r.context + r.new
        self.num_new = q_start
        self.write_slots_Q = self.read_slots_K = None
        if pool is not None:
            self.write_slots_Q, self.read_slots_K = self._slots(pool.block_size, decode, rows[self.num_decode:])
            self.write_slots_Q, self.read_slots_K = self.write_slots_Q.to(device), self.read_slots_K.to(device)
        elif any(r.context for r in rows):
            raise ValueError("a step without a pool cannot have cached context")
        self.device = device
        self._masks: dict[int | None, tuple] = {}

    def _slots(self, block_size: int, decode: list[Row], segments: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool slots of the new tokens [Q] and of the key layout [K] (a slot is block * block_size + offset)."""
        offsets = torch.arange(block_size)
        write, read = [], []
        if decode:
            width_blocks = -(-self.decode_width // block_size)
            padded = [list(r.block_ids[:width_blocks]) for r in decode]
            table_BM = torch.tensor([ids + [0] * (width_blocks - len(ids)) for ids in padded], dtype=torch.long)
            slots_BL = (table_BM[:, :, None] * block_size + offsets).flatten(1)[:, :self.decode_width]
            write.append(slots_BL[torch.arange(len(decode)), self.decode_len_B - 1])
            read.append(slots_BL.flatten())  # past each row's length: any slot, masked out
        for r in segments:
            used = r.context + r.new
            blocks = torch.tensor(r.block_ids[:-(-used // block_size)], dtype=torch.long)
            slots = (blocks[:, None] * block_size + offsets).flatten()[:used]
            write.append(slots[r.context:])
            read.append(slots)
        return torch.cat(write), torch.cat(read)

    @contextlib.contextmanager
    def active(self):
        """The forward inside this block reads and writes this layout (one forward per thread at a time)."""
        _active.layout = self
        try:
            yield self
        finally:
            _active.layout = None

    # -- the transformers cache seam ---------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the step's new keys/values [1, H, Q, D]; return the key layout's [1, H, K, D]."""
        if self.pool is None:  # nothing cached: each segment's keys are its own new tokens, already in place
            return key_states, value_states
        out = []
        for states, pool_NHD in ((key_states, self.pool.keys_NHD[layer_idx]),
                                 (value_states, self.pool.values_NHD[layer_idx])):
            pool_NHD[self.write_slots_Q] = states[0].transpose(0, 1).to(pool_NHD.dtype)
            out.append(pool_NHD[self.read_slots_K].transpose(0, 1).unsqueeze(0).to(states.dtype))
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions come as position ids; nothing may infer them from the cache

    # -- masks -------------------------------------------------------------------------------------------
    def masks(self, window: int | None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The decode block's [B, 1, 1, L] and each segment's [1, 1, n, l] boolean masks (True: attend)."""
        if window not in self._masks:
            decode = None
            if self.num_decode:
                key_L = torch.arange(self.decode_width)
                query_B1 = (self.decode_len_B - 1).unsqueeze(1)
                decode = key_L < self.decode_len_B.unsqueeze(1)
                if window is not None:
                    decode &= key_L > query_B1 - window
                decode = decode[:, None, None, :].to(self.device)
            segments = []
            for segment in self.segments:
                query_n1 = (torch.arange(segment.new) + segment.context).unsqueeze(1)
                key_l = torch.arange(segment.keys)
                mask = key_l <= query_n1
                if window is not None:
                    mask &= key_l > query_n1 - window
                segments.append(mask[None, None].to(self.device))
            self._masks[window] = (decode, segments)
        return self._masks[window]


def _attend(q_BHnD, k_BHlD, v_BHlD, mask_B1nl, scaling: float, sinks_H: torch.Tensor | None) -> torch.Tensor:
    """Attention of one group, [B, n, H, D] out. Sinks (GPT-OSS) add one learned logit per head to the softmax's
    denominator, as transformers' eager GPT-OSS attention does; sdpa cannot, so that case is written out."""
    if sinks_H is None:
        out = F.scaled_dot_product_attention(q_BHnD, k_BHlD, v_BHlD, attn_mask=mask_B1nl, scale=scaling,
                                             enable_gqa=q_BHnD.shape[1] != k_BHlD.shape[1])
        return out.transpose(1, 2)
    groups = q_BHnD.shape[1] // k_BHlD.shape[1]
    k_BHlD, v_BHlD = k_BHlD.repeat_interleave(groups, dim=1), v_BHlD.repeat_interleave(groups, dim=1)
    logits = torch.matmul(q_BHnD, k_BHlD.transpose(2, 3)) * scaling
    logits = logits.masked_fill(~mask_B1nl, float("-inf"))
    sinks = sinks_H.reshape(1, -1, 1, 1).expand(*logits.shape[:-1], 1).to(logits.dtype)
    combined = torch.cat([logits, sinks], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return torch.matmul(probs.to(v_BHlD.dtype), v_BHlD).transpose(1, 2)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                    s_aux=None, **kwargs):
    """transformers' attention-function signature: query [1, H, Q, D], key/value [1, H, K, D] in the active
    layout's key layout; returns ([1, Q, H, D], None)."""
    layout: StepLayout | None = getattr(_active, "layout", None)
    if layout is None:
        raise RuntimeError("moeray's paged attention runs only inside a scheduler step (StepLayout.active)")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    decode_mask, segment_masks = layout.masks(sliding_window or None)
    outs = []
    if layout.num_decode:
        b, width = layout.num_decode, layout.decode_width
        q = query[0, :, :b].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
        k = key[0, :, :b * width].unflatten(1, (b, width)).transpose(0, 1)  # [B, H, L, D]
        v = value[0, :, :b * width].unflatten(1, (b, width)).transpose(0, 1)
        outs.append(_attend(q, k, v, decode_mask, scaling, s_aux).transpose(0, 1))  # [1, B, H, D]
    for s, mask in zip(layout.segments, segment_masks):
        keys = slice(s.k_start, s.k_start + s.keys)
        outs.append(_attend(query[:, :, s.q_start:s.q_start + s.new], key[:, :, keys], value[:, :, keys], mask,
                            scaling, s_aux))
    return torch.cat(outs, dim=1), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)


def use_paged_attention(model: torch.nn.Module) -> None:
    """Route every attention layer of ``model`` through ``paged_attention``."""
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            raise CheckpointError(f"{type(module).__name__} did not take moeray's attention implementation")
