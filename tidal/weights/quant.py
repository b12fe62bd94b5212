"""Group-wise asymmetric (min/max) int4 and int8 weight quantization.

Owns: `QuantizedWeight` (packed unsigned ints plus a per-group scale and min, x = scale * q + min),
`quantize`, `dequantize`, the int4 nibble packing, `concat_rows` (fused projections), and
`from_gguf_q4_1`, which maps GGUF Q4_1 blocks onto the same layout bit for bit.
Must not: know about modules, matmul kernels or devices (model/layers/quant_linear.py picks the
kernel and its layout); it works on whatever device the tensors are on.

Int4 nibble layout, chosen to equal GGUF Q4_1's so that its blocks need no repacking: within each
group of `g` values, byte j holds value j in its low nibble and value j + g/2 in its high nibble.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_Q4_1_BLOCK, _Q4_1_BYTES = 32, 20  # values and bytes per Q4_1 block: fp16 d, fp16 m, 16 nibble bytes


@dataclass
class QuantizedWeight:
    qdata: torch.Tensor  # uint8; int8: [out, in]; int4: [out, in // 2], nibbles as in the module docstring
    scale: torch.Tensor  # [out, in // group_size]
    min: torch.Tensor  # [out, in // group_size]
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qdata.shape[0], self.qdata.shape[1] * (8 // self.bits)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scale, self.min))

    def to(self, device, non_blocking: bool = False) -> "QuantizedWeight":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return QuantizedWeight(move(self.qdata), move(self.scale), move(self.min), self.bits, self.group_size)

    def unpacked(self) -> torch.Tensor:
        """The unsigned integers as uint8 [out, in // group_size, group_size]."""
        out, in_features = self.shape
        if self.bits == 8:
            return self.qdata.view(out, -1, self.group_size)
        b = self.qdata.view(out, -1, self.group_size // 2)
        return torch.cat([b & 15, b >> 4], dim=-1)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack weights along the output dim (a fused QKV or gate-up); groups never cross a row, so
    this is exact. All parts must share bits and group size."""
    first = parts[0]
    if any((p.bits, p.group_size, p.shape[1]) != (first.bits, first.group_size, first.shape[1]) for p in parts):
        raise ValueError("cannot stack quantized weights with different bits, group sizes or input sizes: "
                         f"{[(p.bits, p.group_size, p.shape) for p in parts]}")
    return QuantizedWeight(*(torch.cat([getattr(p, f) for p in parts]) for f in ("qdata", "scale", "min")),
                           first.bits, first.group_size)


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size <= 0 or group_size % 2 or in_features % group_size:
        raise ValueError(f"group size {group_size} must be even and divide the input size {in_features}; "
                         f"pick a divisor of {in_features} (e.g. 32 or 64) or the input size itself (per channel)")


def quantize(w: torch.Tensor, bits: int = 4, group_size: int | None = 64,
             scale_dtype: torch.dtype = torch.float16, symmetric: bool = False) -> QuantizedWeight:
    """`w` [out, in] -> QuantizedWeight. `group_size=None` means one group per output row.

    `symmetric` (int8 only): GGUF Q8_0's grid, scale = max|w| / 127 and min = -128 * scale, so a
    Q8_0 checkpoint's dequantized rows (each group d * q with some |q| = 127) come back exactly.

    The error of every element is at most half its group's (stored) scale: min is rounded down
    and scale up into `scale_dtype`, so the stored grid still covers the group's [min, max].
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out, in_features = w.shape
    group_size = group_size or in_features
    check_group_size(in_features, group_size)
    qmax = (1 << bits) - 1
    groups = w.detach().float().reshape(out, -1, group_size)
    if symmetric:
        if bits != 8:
            raise ValueError("symmetric quantization is int8 only (GGUF Q8_0's grid)")
        scale = _round_toward(groups.abs().amax(-1) / 127, scale_dtype, down=False)
        mn = (scale.float() * -128).to(scale_dtype)
    else:
        lo, hi = groups.amin(-1), groups.amax(-1)
        mn = _round_toward(lo, scale_dtype, down=True)
        scale = _round_toward((hi - mn.float()) / qmax, scale_dtype, down=False)
    s32 = scale.float()
    # a constant group has scale 0 (or, when its value has no `scale_dtype` form, a tiny one): q = 0
    # and min reproduce it
    inv = torch.where(s32 > 0, 1.0 / s32, torch.zeros_like(s32))
    q = ((groups - mn.float()[..., None]) * inv[..., None]).round_().clamp_(0, qmax).to(torch.uint8)
    if bits == 4:
        q = q[..., : group_size // 2] | (q[..., group_size // 2:] << 4)
    return QuantizedWeight(q.reshape(out, -1).contiguous(), scale, mn, bits, group_size)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """QuantizedWeight -> [out, in] in `dtype`, computed in fp32 (so Q4_1 matches ggml exactly);
    written into `out` when given (a buffer reused across calls)."""
    rows, in_features = qw.shape
    # q * scale is exact in fp32 (4 or 8 bits times an 11-bit fp16 mantissa), so fused or not, the
    # one rounding is at + min, as in gguf.quants' d * q + m
    w = torch.addcmul(qw.min.float()[..., None], qw.unpacked().float(), qw.scale.float()[..., None])
    w = w.reshape(rows, in_features)
    if out is None:
        return w.to(dtype)
    return out.copy_(w)


def from_gguf_q4_1(raw, in_features: int | None = None) -> QuantizedWeight:
    """GGUF Q4_1 rows (uint8 bytes, [rows, in / 32 * 20] or flat with `in_features`) -> group size 32,
    scale d, min m, nibbles copied as they are. Undo any llama.cpp row permutation on `raw` first
    (weights/gguf_file.unpermute_rows works on block bytes)."""
    # numpy, not torch: single-threaded, where each small torch op on busy cores can stall in its OpenMP
    # region (see gguf_file.dequantize). The slices are copied: raw is often a read-only memory map
    # of the file, and the result must outlive it.
    data = (raw.cpu().numpy() if torch.is_tensor(raw) else np.asarray(raw)).view(np.uint8)
    if in_features is not None:
        data = data.reshape(-1, in_features // _Q4_1_BLOCK * _Q4_1_BYTES)
    if data.ndim != 2 or data.shape[1] % _Q4_1_BYTES:
        raise ValueError(f"Q4_1 rows must be [rows, n * {_Q4_1_BYTES}] bytes, got shape {tuple(data.shape)}")
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, _Q4_1_BYTES)
    d, m, qs = (torch.from_numpy(blocks[..., a:b].copy().reshape(rows, -1)) for a, b in ((0, 2), (2, 4), (4, None)))
    d, m = d.view(torch.float16), m.view(torch.float16)
    return QuantizedWeight(qs, d, m, 4, _Q4_1_BLOCK)


def _round_toward(x: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """`x` (fp32) cast to `dtype`, rounded toward -inf (down) or +inf instead of to nearest."""
    y = x.to(dtype)
    if dtype == torch.float32:
        return y
    wrong = y.float() > x if down else y.float() < x
    step = torch.full_like(y, float("-inf") if down else float("inf"))
    return torch.where(wrong, torch.nextafter(y, step), y)
