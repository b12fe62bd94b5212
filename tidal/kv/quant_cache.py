"""Group-wise int8 / int4 KV cache (--kv-quant): the layout, its allocation, and row quantization.

Owns: `QuantKVCache` (one layer's K or V: packed uint8 codes plus a per-group scale and min, x = scale
* q + min, groups along head_dim), `allocate_kv_cache` (plain or quantized K/V tensors for one layer,
in memory or memory-mapped from a file for the disk tier),
`kv_bytes_per_token`, and `quantize_rows` / `write_kv_quant` / `dequantize_blocks`, thin shape adapters over
weights/quant.py's `quantize` / `dequantize` (the arithmetic and the int4 nibble order live there only).
Must not: run attention or pick kernels (kernels/ dispatch on `QuantKVCache`), or know about requests.

Layout per layer, for K and for V alike (int4 bytes hold two values in weights/quant.py's nibble order):
  data  uint8 [num_blocks, block_size, kv_heads, head_dim * bits // 8]
  scale, min  fp16 [num_blocks, block_size, kv_heads, head_dim // group_size]
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import torch

from tidal.errors import TidalError
from tidal.weights.quant import QuantizedWeight, dequantize, quantize

# Values per group, by bits. int8: one group per head at head_dim 64 (SmolLM2, Llama-3.2-1B), 4 bytes
# of scale and min per 64 values. int4: groups of 32, as for weights: SmolLM2's perplexity on 4096
# tokens of pydoc_data.topics (tidal/eval/perplexity.py) rose 7.1% over fp32 at 32 against 15.8% at
# 64, for 40 bytes a head row instead of 36. TIDAL_KV_GROUP_SIZE overrides both (for experiments).
KV_GROUP_SIZE = {8: 64, 4: 32}
KV_SCALE_DTYPE = torch.float16
KV_QUANT_BITS = {"int8": 8, "int4": 4}


@dataclass
class QuantKVCache:
    data: torch.Tensor   # uint8 [num_blocks, block_size, kv_heads, head_dim * bits // 8]
    scale: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim // group_size]
    min: torch.Tensor    # same shape and dtype as scale
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The logical shape, as a plain cache would have: [num_blocks, block_size, kv_heads, head_dim]."""
        nb, bs, h, packed = self.data.shape
        return nb, bs, h, packed * 8 // self.bits

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.min))

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.data, self.scale, self.min


def kv_group_size(head_dim: int, bits: int, group_size: int | None = None) -> int:
    """`group_size` (default: TIDAL_KV_GROUP_SIZE, else KV_GROUP_SIZE[bits]), or one group per head when
    the head is smaller or not a multiple of it."""
    if head_dim % 2:
        raise TidalError(f"--kv-quant needs an even head size, this model's is {head_dim}; use --kv-quant none",
                         param="kv_quant")
    group_size = group_size or int(os.environ.get("TIDAL_KV_GROUP_SIZE", 0)) or KV_GROUP_SIZE[bits]
    return group_size if head_dim % group_size == 0 and group_size % 2 == 0 else head_dim


def kv_bytes_per_token(num_kv_heads: int, head_dim: int, dtype: torch.dtype, kv_quant: str = "none",
                       group_size: int | None = None) -> int:
    """Bytes one token takes in one layer's K (or V) cache."""
    if kv_quant == "none":
        return num_kv_heads * head_dim * dtype.itemsize
    bits = KV_QUANT_BITS[kv_quant]
    groups = head_dim // kv_group_size(head_dim, bits, group_size)
    return num_kv_heads * (head_dim * bits // 8 + 2 * groups * KV_SCALE_DTYPE.itemsize)


def allocate_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      device: torch.device, kv_quant: str = "none", group_size: int | None = None,
                      backing: str | None = None):
    """One layer's (k_cache, v_cache): zeroed `dtype` tensors, or two QuantKVCache for int8 / int4.
    `backing`: a path prefix; the tensors are then memory-mapped files there (the disk tier, on the CPU)."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    parts = itertools.count()

    def zeros(shp, dt):
        if backing is None:
            return torch.zeros(shp, dtype=dt, device=device)
        return _mapped_zeros(f"{backing}.{next(parts)}", shp, dt)
    if kv_quant == "none":
        return zeros(shape, dtype), zeros(shape, dtype)
    bits = KV_QUANT_BITS[kv_quant]
    g = kv_group_size(head_dim, bits, group_size)

    def one() -> QuantKVCache:
        groups = shape[:3] + (head_dim // g,)
        return QuantKVCache(zeros(shape[:3] + (head_dim * bits // 8,), torch.uint8),
                            zeros(groups, KV_SCALE_DTYPE), zeros(groups, KV_SCALE_DTYPE), bits, g)
    return one(), one()


def kv_file(offload_dir: str, layer: int) -> str:
    """The path prefix of layer `layer`'s disk-tier KV files under --offload-dir (one set per process)."""
    return os.path.join(offload_dir, "kv", f"{os.getpid()}-layer{layer}")


def _mapped_zeros(path: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor backed by a file (MAP_SHARED): the kernel pages it to disk under memory
    pressure. The file is unlinked at once; its space is freed when the mapping goes."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    numel = math.prod(shape)
    try:
        with open(path, "wb") as f:
            f.truncate(numel * dtype.itemsize)          # sparse: reads as zeros
        t = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    except OSError as e:
        raise TidalError(f"cannot create the KV cache file '{path}' ({e}); pass an --offload-dir on a disk "
                         "with room for the policy's disk share of the KV cache", param="offload_dir") from None
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return t.view(shape)


def quantize_rows(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (codes [..., head_dim * bits // 8], scale, min [..., head_dim // group_size]),
    each element within half its group's scale of x (weights/quant.py's guarantee)."""
    lead, d = x.shape[:-1], x.shape[-1]
    qw = quantize(x.reshape(-1, d), bits, group_size, KV_SCALE_DTYPE)
    return qw.qdata.view(*lead, -1), qw.scale.view(*lead, -1), qw.min.view(*lead, -1)


def dequantize_blocks(cache: QuantKVCache, block_ids: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The blocks `block_ids` (all when None) as a dense [n, block_size, kv_heads, head_dim] tensor."""
    parts = cache.parts() if block_ids is None else [t.index_select(0, block_ids) for t in cache.parts()]
    data, scale, mn = parts
    n, bs, h, packed = data.shape
    qw = QuantizedWeight(data.reshape(-1, packed), scale.reshape(n * bs * h, -1), mn.reshape(n * bs * h, -1),
                         cache.bits, cache.group_size)
    return dequantize(qw, dtype).view(n, bs, h, -1)


def write_kv_quant(k: torch.Tensor, v: torch.Tensor, k_cache: QuantKVCache, v_cache: QuantKVCache,
                   slot_mapping: torch.Tensor) -> None:
    """Quantize k, v [T, kv_heads, head_dim] and store row t at cache slot slot_mapping[t]. K and V go
    through one quantize call: at decode these are tiny tensors, and each op costs dispatch time."""
    nb, bs, h, _ = k_cache.shape
    codes = quantize_rows(torch.stack([k, v]), k_cache.bits, k_cache.group_size)
    for i, cache in enumerate((k_cache, v_cache)):
        for dst, src in zip(cache.parts(), codes):
            dst.view(nb * bs, h, -1).index_copy_(0, slot_mapping, src[i])
