"""Attention metadata for one flat batch, and the forward context that carries it.

Owns: `AttentionMetadata` (what the runner builds each step: slot mapping, block tables,
sequence lengths, query offsets) and the module-level forward context that the attention
layers read, so model code keeps the signature `forward(input_ids, positions)`.
Must not: build the metadata (the engine's model runner does) or hold model state.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # [T] int64: cache slot of each new token (block * block_size + offset)
    block_tables: torch.Tensor      # [B, max_blocks] int64, padded with 0 (masked by seq_lens)
    seq_lens: torch.Tensor          # [B] int64: context length of each sequence after this step
    query_start_loc: torch.Tensor   # [B + 1] int64: offsets of each sequence's new tokens in the flat batch
    query_lens_list: list[int]      # host copies, so no device sync is needed to shape the work
    seq_lens_list: list[int]
    max_query_len: int
    max_seq_len: int
    block_size: int
    _per_token: tuple | None = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def is_all_decode(self) -> bool:
        return self.max_query_len == 1

    def per_token_decode(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The batch as one decode row per new token: (block tables [T, max_blocks], context lengths [T],
        max context). New token j of a sequence whose q_len tokens end at seq_len sees seq_len - q_len + j + 1
        tokens, its causal context, once every new K/V is written. So a few tokens per sequence (jump-forward's
        forced tokens, later draft tokens to verify) run in the batched decode kernel instead of a per-sequence
        prefill. Built once per step (every layer shares it)."""
        if self._per_token is None:
            rows, lens = [], []
            for i, (q_len, seq_len) in enumerate(zip(self.query_lens_list, self.seq_lens_list)):
                rows += [i] * q_len
                lens += range(seq_len - q_len + 1, seq_len + 1)
            dev = self.block_tables.device
            self._per_token = (self.block_tables.index_select(0, torch.tensor(rows, device=dev)),
                               torch.tensor(lens, dtype=self.seq_lens.dtype, device=dev), max(lens))
        return self._per_token


@dataclass
class ForwardContext:
    attn: AttentionMetadata | None
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k_cache, v_cache), each [num_blocks, block_size, kv_heads, head_dim]


_context: ForwardContext | None = None


@contextmanager
def forward_context(attn: AttentionMetadata | None, kv_caches):
    global _context
    prev, _context = _context, ForwardContext(attn, kv_caches)
    try:
        yield _context
    finally:
        _context = prev


def get_forward_context() -> ForwardContext:
    if _context is None:
        raise RuntimeError("model forward called outside forward_context(); the model runner sets it")
    return _context
