"""Counter-based random draws for seeded sampling: one uniform per (seed, step).

Owns: `row_uniforms(seeds, steps)`, a stateless hash of each row's seed and the number of
tokens that row has generated so far, and `draw`, which turns that uniform into a token id.
Because the draw depends on nothing else (not the batch size, not the row's position, not
what other requests did), a seeded request gives the same tokens alone or inside any batch,
and a preempted request resumes identically.
A per-row torch.Generator would need a Python loop per step and a host sync; this is a
handful of vectorized int64 ops on [B] tensors, on any device.
Must not: know about sampling params or filtering (sampling.py does those before `draw`).
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without leaving int64 range.

    A full 32x32-bit product needs 64 unsigned bits and would overflow int64 (undefined in
    C++, so not something to rely on across backends); splitting c into 16-bit halves keeps
    every partial product below 2**48.
    """
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer: a bijection on [0, 2**32) with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _word(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor, salt: int) -> torch.Tensor:
    # Chained so that every input bit reaches every output bit; the salt makes words independent.
    h = _mix32((seed_lo ^ salt) & _MASK32)
    h = _mix32(h ^ seed_hi)
    return _mix32((h + _mix32(step ^ 0x9E3779B9)) & _MASK32)


def to_int64_seed(seed: int) -> int:
    """Any Python int -> the int64 with the same low 64 bits (torch has no uint64 arithmetic)."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    return s - (1 << 64) if s >= (1 << 63) else s


def row_uniforms(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """seeds, steps: int64 [B] -> float64 [B], uniform in the open interval (0, 1).

    52 random bits: (k + 0.5) / 2**52 is exact in float64, never 0 and at most 1 - 2**-53.
    """
    lo = seeds & _MASK32
    hi = (seeds >> 32) & _MASK32  # arithmetic shift then mask: the two's-complement high word
    st = steps & _MASK32
    w1 = _word(lo, hi, st, 0x243F6A88)
    w2 = _word(lo, hi, st, 0x85A308D3)
    k = (w1 << 20) | (w2 >> 12)
    return (k.to(torch.float64) + 0.5) * (2.0 ** -52)


def draw(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw with one counter-based uniform per row.

    One uniform per row (not one per vocabulary entry, as an exponential race would need)
    keeps the hashing O(B). The CDF is accumulated in float64 per row, so the chosen token
    depends only on this row's logits and uniform, never on the rest of the batch.
    """
    cdf = logits.softmax(dim=-1).to(torch.float64).cumsum(dim=-1)
    total = cdf[:, -1:]
    # Strictly below the total, so some entry of the CDF always exceeds it; the first entry
    # that does has nonzero probability, so a masked (-inf) token can never be drawn.
    target = torch.minimum(row_uniforms(seeds, steps)[:, None] * total,
                           torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=logits.shape[1] - 1)
