"""A Linear / MergedLinear whose weight is group-wise quantized (weights/quant.py's layout).

Owns: `QuantLinear` and the choice of its matmul path, made once at construction from what the
device's backend can run (`get_backend(device).quant_linear_paths(qw)`, best first, e.g. CPU's
"int4pack" / "int8pack": torch's packed kernels, kernels/quant_ops.py) and the fallback every device
has, "dequant": dequantize into the scratch buffer every dequantizing matmul shares (quant_ops.scratch), then F.linear.
A kernel path keeps only the backend's packed layout, not the QuantizedWeight.
With `dense_min_rows`, a kernel layer also keeps the QuantizedWeight and sends batches of at least
that many rows down "dequant": the kernels lose to dequantize + bf16 GEMM at a few hundred rows
(prefill), at the price of holding the weight twice (int4: 0.56 -> 1.1 bytes a parameter).
Must not: quantize (weights/quant.py does), branch on the device type (the backend does), or know
which model it sits in (model/quantize.py swaps it in). `TIDAL_QUANT_PATH=<path>` picks a
path wherever it fits, for debugging and comparisons.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from tidal.kernels import get_backend
from tidal.kernels.quant_ops import scratch
from tidal.weights.quant import QuantizedWeight, dequantize


def fitting_paths(qw: QuantizedWeight, device: torch.device) -> tuple[str, ...]:
    """Every path that can run `qw` on `device`, best first; "dequant" is always last."""
    return tuple(get_backend(device).quant_linear_paths(qw)) + ("dequant",)


def choose_path(qw: QuantizedWeight, device: torch.device) -> str:
    fits = fitting_paths(qw, device)
    forced = os.environ.get("TIDAL_QUANT_PATH")
    return forced if forced in fits else fits[0]


class QuantLinear(nn.Module):
    """Drop-in for Linear (and MergedLinear when `out_sizes` is given: `forward_split` works)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                 out_sizes: list[int] | None = None, path: str | None = None, dense_min_rows: int | None = None,
                 act_scale: torch.Tensor | None = None):
        """`act_scale` (path "w8a8" only): the activations are multiplied by it per input channel before
        they are rounded; `qw` already holds the weight with its columns divided by it (model/smooth.py)."""
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size = qw.bits, qw.group_size
        self.out_sizes = list(out_sizes) if out_sizes is not None else None
        device = qw.qdata.device
        self.path = path or choose_path(qw, device)
        if self.path not in fitting_paths(qw, device):
            raise ValueError(f"path '{self.path}' cannot run int{qw.bits} group {qw.group_size} "
                             f"[{self.out_features}, {self.in_features}] on {device}")
        if act_scale is not None and (self.path != "w8a8" or dense_min_rows is not None):
            raise ValueError("an activation scale needs the w8a8 path, without dense_min_rows")
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.dense_min_rows = None if self.path == "dequant" else dense_min_rows
        keep = self.path == "dequant" or self.dense_min_rows is not None
        self.register_buffer("qdata", qw.qdata if keep else None)
        self.register_buffer("qscale", qw.scale if keep else None)
        self.register_buffer("qmin", qw.min if keep else None)
        self.backend = self.packed = None
        if self.path != "dequant":
            self.backend = get_backend(device)
            self.packed = self.backend.pack_quant_linear(qw, self.path, act_scale)
        self.smoothed = act_scale is not None

    @property
    def qw(self) -> QuantizedWeight | None:
        if self.qdata is None:
            return None
        return QuantizedWeight(self.qdata, self.qscale, self.qmin, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and self.dense_min_rows is None and self.bias is None and self.path != "dequant":
            return self.backend.quant_linear(x, self.path, self.packed)   # the engine's flat [tokens, in] rows
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.path == "dequant" or (self.dense_min_rows is not None and x2.shape[0] >= self.dense_min_rows):
            y = F.linear(x2, self._dequantized(x.dtype))
        else:
            y = self.backend.quant_linear(x2, self.path, self.packed)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def forward_split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.forward(x).split(self.out_sizes, dim=-1))

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        # one buffer per (dtype, device) for all layers: a per-layer copy would undo the savings
        out = scratch(self.out_features, self.in_features, dtype, self.qdata.device)
        return dequantize(self.qw, dtype, out=out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, path={self.path}, dense_min_rows={self.dense_min_rows}"
                + (", smoothed" if self.smoothed else ""))
