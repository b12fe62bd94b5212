"""The attention layer: stores new K/V in the paged cache and attends over it.

Owns: `Attention`, which reads the per-step `AttentionMetadata` and this layer's KV cache
from the forward context and calls the kernel backend. Models hand it rotated q, k, v
and never see the cache, so cache layouts and kernels change without touching models.
Must not: build metadata or allocate cache memory (the model runner does both).
"""
from __future__ import annotations

import torch
from torch import nn

from tidal.kernels import get_backend
from tidal.kernels.metadata import get_forward_context


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.layer_idx, self.num_heads, self.num_kv_heads = layer_idx, num_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, heads*d], k/v: [T, kv_heads*d] -> [T, heads*d]."""
        ctx = get_forward_context()
        backend = get_backend(q.device)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        backend.write_kv(k, v, k_cache, v_cache, ctx.attn.slot_mapping)
        out = backend.paged_attention(q, k_cache, v_cache, ctx.attn, self.scale)
        return out.reshape(-1, self.num_heads * self.head_dim)
