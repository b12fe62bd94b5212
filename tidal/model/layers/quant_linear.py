"""A Linear / MergedLinear whose weight is group-wise quantized (weights/quant.py's layout).

Owns: `QuantLinear` and its matmul paths, chosen once at construction from what the weight allows:
- "int4pack": torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`); int4, group 32/64/128/256,
  out % 16 == 0. The weight is repacked into torch's layout; the QuantizedWeight is not kept.
- "int8pack": torch's CPU int8 kernel (`_weight_int8pack_mm`); int8 with one group per row.
- "dequant": everything else (int8 group-wise, other group sizes, non-CPU devices): dequantize into
  a scratch buffer shared by every QuantLinear, then F.linear.
Both kernels run in bf16: their fp32 code is 10-30x slower (scalar), so fp32 inputs are cast to
bf16 and the result back; the activations lose bf16 rounding, far below int4/int8 weight error.
With `dense_min_rows`, a kernel layer also keeps the QuantizedWeight and sends batches of at least
that many rows down "dequant": the kernels lose to dequantize + bf16 GEMM at a few hundred rows
(prefill), at the price of holding the weight twice (int4: 0.56 -> 1.1 bytes a parameter).
Must not: quantize (weights/quant.py does), or know which model it sits in (weights/quantize_model.py
swaps it in). `TIDAL_QUANT_PATH=<path>` picks a path wherever it fits, for debugging and comparisons.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from tidal.weights.quant import QuantizedWeight, dequantize

_KERNEL_DTYPE = torch.bfloat16
_INT4_GROUPS = (32, 64, 128, 256)
_scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def kernel_fits(qw: QuantizedWeight, path: str, device: torch.device) -> bool:
    out_features, in_features = qw.shape
    if path == "dequant":
        return True
    if device.type != "cpu":
        return False  # torch's packed kernels here are the CPU ones; a CUDA kernel belongs in kernels/
    if path == "int4pack":
        return qw.bits == 4 and qw.group_size in _INT4_GROUPS and out_features % 16 == 0
    if path == "int8pack":
        return qw.bits == 8 and qw.group_size == in_features
    return False


def choose_path(qw: QuantizedWeight, device: torch.device) -> str:
    forced = os.environ.get("TIDAL_QUANT_PATH")
    if forced and kernel_fits(qw, forced, device):
        return forced
    return next(p for p in ("int4pack", "int8pack", "dequant") if kernel_fits(qw, p, device))


class QuantLinear(nn.Module):
    """Drop-in for Linear (and MergedLinear when `out_sizes` is given: `forward_split` works)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                 out_sizes: list[int] | None = None, path: str | None = None, dense_min_rows: int | None = None):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size = qw.bits, qw.group_size
        self.out_sizes = list(out_sizes) if out_sizes is not None else None
        device = qw.qdata.device
        self.path = path or choose_path(qw, device)
        if not kernel_fits(qw, self.path, device):
            raise ValueError(f"path '{self.path}' cannot run int{qw.bits} group {qw.group_size} "
                             f"[{self.out_features}, {self.in_features}] on {device}")
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.dense_min_rows = None if self.path == "dequant" else dense_min_rows
        keep = self.path == "dequant" or self.dense_min_rows is not None
        self.register_buffer("qdata", qw.qdata if keep else None)
        self.register_buffer("qscale", qw.scale if keep else None)
        self.register_buffer("qmin", qw.min if keep else None)
        if self.path == "int4pack":
            self._prepare_int4pack(qw)
        elif self.path == "int8pack":
            self._prepare_int8pack(qw)

    @property
    def qw(self) -> QuantizedWeight | None:
        if self.qdata is None:
            return None
        return QuantizedWeight(self.qdata, self.qscale, self.qmin, self.bits, self.group_size)

    def _prepare_int4pack(self, qw: QuantizedWeight) -> None:
        q = qw.unpacked().reshape(self.out_features, self.in_features).to(torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        # torch's kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale; [in / g, out, 2]
        scale, mn = qw.scale.float(), qw.min.float()
        sz = torch.stack([scale, mn + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(_KERNEL_DTYPE))

    def _prepare_int8pack(self, qw: QuantizedWeight) -> None:
        # the kernel is symmetric (w = q * scale); our q is unsigned with a min, so shift q by 128 and
        # add the remainder, x . (min + 128 * scale) per output, after the matmul
        self.register_buffer("qint8", (qw.qdata.to(torch.int16) - 128).to(torch.int8))
        scale, mn = qw.scale.float().view(-1), qw.min.float().view(-1)
        self.register_buffer("scale", scale.to(_KERNEL_DTYPE))
        self.register_buffer("zero", mn + 128 * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.path == "dequant" or (self.dense_min_rows is not None and x2.shape[0] >= self.dense_min_rows):
            y = F.linear(x2, self._dequantized(x.dtype))
        elif self.path == "int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(_KERNEL_DTYPE), self.packed, self.group_size, self.scales_and_zeros).to(x.dtype)
        else:  # int8pack
            y = torch.ops.aten._weight_int8pack_mm(x2.to(_KERNEL_DTYPE), self.qint8, self.scale)
            y = torch.addr(y.float(), x2.float().sum(-1), self.zero).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def forward_split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.forward(x).split(self.out_sizes, dim=-1))

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        # one buffer per (dtype, device) for all layers: a per-layer copy would undo the savings
        device, numel = self.qdata.device, self.out_features * self.in_features
        buf = _scratch.get((dtype, device))
        if buf is None or buf.numel() < numel:
            buf = _scratch[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return dequantize(self.qw, dtype, out=buf[:numel].view(self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, path={self.path}, dense_min_rows={self.dense_min_rows}")
