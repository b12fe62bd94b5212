"""Attention over a KV cache kept in host memory while the model runs on a GPU (--policy kv=...,
its host share), called by the CUDA backend when a layer's cache is not on q's device.

Owns: `write_kv` (new K/V are copied down to the host cache) and `paged_attention`, which either
attends on the host CPU (FlexGen's CPU attention: q goes down and the output comes back, so only
O(new tokens) bytes cross the bus; used for decode-only batches when `--policy ... cpu-attn=on`),
or copies just the blocks this batch reads up to the device and attends there (prefill, or
cpu-attn=off). `set_cpu_attention` is set by the model runner from its policy (one engine per
process shares the backend).
Must not: allocate or place caches (the model runner does), or know about models.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from tidal.kernels import torch_ops
from tidal.kernels.metadata import AttentionMetadata

_cpu_attention = False


def set_cpu_attention(on: bool) -> None:
    global _cpu_attention
    _cpu_attention = bool(on)


def host_meta(meta: AttentionMetadata) -> AttentionMetadata:
    """The metadata with its tensors on the CPU, made once per step and kept on the metadata."""
    h = meta.__dict__.get("_host_copy")
    if h is None:
        cpu = torch.device("cpu")
        h = replace(meta, slot_mapping=meta.slot_mapping.to(cpu), block_tables=meta.block_tables.to(cpu),
                    seq_lens=meta.seq_lens.to(cpu), query_start_loc=meta.query_start_loc.to(cpu))
        meta.__dict__["_host_copy"] = h
    return h


def write_kv(cpu_backend, k, v, k_cache, v_cache, slot_mapping: torch.Tensor) -> None:
    cpu = torch.device("cpu")
    cpu_backend.write_kv(k.to(cpu), v.to(cpu), k_cache, v_cache, slot_mapping.to(cpu))


def paged_attention(cpu_backend, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    h = host_meta(meta)
    if _cpu_attention and meta.is_all_decode:
        out = cpu_backend.paged_attention(q.to("cpu"), k_cache, v_cache, h, scale)
        return out.to(q.device, non_blocking=True)
    return gathered_attention(q, k_cache, v_cache, meta, h, scale)


def gathered_attention(q, k_cache, v_cache, meta: AttentionMetadata, h: AttentionMetadata, scale: float):
    """Copy only the blocks the batch's block tables name to q's device (renumbered 0..n-1) and
    attend there with the torch ops."""
    used = torch.unique(h.block_tables)
    remap = torch.zeros(k_cache.shape[0], dtype=torch.int64)
    remap[used] = torch.arange(used.numel())
    k = torch_ops.select_blocks(k_cache, used, q.dtype).to(q.device)
    v = torch_ops.select_blocks(v_cache, used, q.dtype).to(q.device)
    local = replace(meta, block_tables=remap[h.block_tables].to(q.device))
    return torch_ops.paged_attention(q, k, v, local, scale)
