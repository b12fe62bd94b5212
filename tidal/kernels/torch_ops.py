"""Torch reference ops: correct on any device, the fallback for every backend.

Owns: writing new K/V into the paged cache and attention over the paged cache for a
mixed batch of prefills (possibly chunked, possibly on top of a cached prefix) and decodes.
Must not: know about requests, schedulers or models; everything arrives as tensors plus
`AttentionMetadata`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tidal.kernels.metadata import AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim] -> cache slots given by slot_mapping [T]."""
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence as a dense [length, kv_heads, head_dim] tensor."""
    nb, bs, h, d = cache.shape
    n_blocks = (length + bs - 1) // bs
    return cache.index_select(0, block_table[:n_blocks]).view(n_blocks * bs, h, d)[:length]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim] -> [T, heads, head_dim], causal over each sequence's cached context.

    Each sequence is computed on its own, over exactly its own context: a request's result
    never depends on what else is in the batch (batch invariance), and no padding is computed.
    """
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    gqa = num_heads != num_kv_heads
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
        table = meta.block_tables[i]
        k = gather_kv(k_cache, table, seq_len).to(q.dtype).transpose(0, 1)   # [kvh, S, d]
        v = gather_kv(v_cache, table, seq_len).to(q.dtype).transpose(0, 1)
        qi = q[start:start + q_len].transpose(0, 1)                            # [h, L, d]
        if q_len == 1:
            mask = None  # a single new token attends to the whole context
        elif q_len == seq_len:
            mask = None
        else:  # chunked prefill on top of earlier context: query i sits at position seq_len - q_len + i
            qpos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= qpos
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, is_causal=(mask is None and q_len > 1),
                                           scale=scale, enable_gqa=gqa)
        out[start:start + q_len] = o.transpose(0, 1)
        start += q_len
    return out
