"""Dummy weights (--load-format dummy): values for any parameter, with no files and no wait.

Owns: `fill_dummy(param, name, seed)`. Each tensor is a run of one cached tile of seeded normal
values (std 0.02), starting at an offset taken from the tensor's name: a copy at memory speed, where
drawing 30B normal values one by one takes minutes; and the same values however the model is
placed (resident runner, placed/offloaded loading, any device), so dummy runs under different
policies give the same tokens.
Must not: know about placement or checkpoints.
"""
from __future__ import annotations

import functools
import zlib

import torch

_TILE = (1 << 20) + 7  # not a power of two: rows of common widths do not repeat the same values


@functools.lru_cache(maxsize=8)
def _tile(seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(_TILE, generator=gen, dtype=torch.float32) * 0.02).to(dtype=dtype, device=device)


def fill_dummy(param: torch.Tensor, name: str, seed: int) -> None:
    """Fill `param` (any shape, dtype, device) in place with the dummy values for `name`."""
    flat = param.data.view(-1) if param.data.is_contiguous() else None
    target = flat if flat is not None else torch.empty(param.numel(), dtype=param.dtype, device=param.device)
    tile = _tile(seed, param.dtype, param.device)
    pos, off, n = 0, zlib.crc32(name.encode()) % _TILE, target.numel()
    while pos < n:
        k = min(n - pos, _TILE - off)
        target[pos:pos + k].copy_(tile[off:off + k])
        pos, off = pos + k, 0
    if flat is None:
        param.data.copy_(target.view(param.shape))
