"""Linear layers, including the fused ones made at load time.

Owns: `Linear` and `MergedLinear` (QKV, gate-up: several HF weights stacked into one
matmul). Each parameter knows how to take an HF tensor via `weight_loader(param, tensor, shard)`;
a weight that arrives already quantized (a QuantizedWeight) is held aside, not dequantized, until
model/quantize.py swaps the layer for a QuantLinear (`take_quantized`).
Must not: read files (the loader yields tensors) or know model names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tidal.weights.quant import QuantizedWeight, concat_rows, dequantize


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    offsets: dict | None = None  # MergedLinear: shard -> (first row, rows)

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard=None) -> None:
        if param.shape != tensor.shape:
            raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(tensor.shape)}")
        if isinstance(tensor, QuantizedWeight):
            self.quantized_shards = {None: tensor}
            return
        param.data.copy_(tensor)

    def take_quantized(self) -> QuantizedWeight | None:
        """The weight as it arrived quantized, every shard stacked, or None. Shards that cannot
        stack (some arrived as floats, or in different formats) are dequantized into `weight`."""
        shards = self.__dict__.pop("quantized_shards", {})
        spans = self.offsets or {None: (0, self.out_features)}
        if set(shards) == set(spans) and len({(q.bits, q.group_size) for q in shards.values()}) == 1:
            return concat_rows([shards[k] for k in spans])
        for key, qw in shards.items():
            start, size = spans[key]
            dequantize(qw, self.weight.dtype, out=self.weight.data[start:start + size])
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.backend.linear(x, self.weight, self.bias, self.packed)
        return F.linear(x, self.weight, self.bias)

    packed = None

    def pack(self, backend) -> None:
        """After loading: let the backend keep the weight in its faster layout (the plain copy is
        dropped, so this is the last step of loading)."""
        packed = backend.pack_linear(self.weight.data)
        if packed is not None:
            self.backend, self.packed = backend, packed
            self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)


class MergedLinear(Linear):
    """Several projections of the same input as one matmul; `shard` names which slice a tensor fills."""

    def __init__(self, in_features: int, out_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(out_sizes.values()), bias)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in out_sizes.items():
            self.offsets[name] = (start, size)
            start += size
        self.out_sizes = list(out_sizes.values())

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard=None) -> None:
        start, size = self.offsets[shard]
        if tensor.shape[0] != size or tuple(tensor.shape[1:]) != tuple(param.shape[1:]):
            raise ValueError(f"shape mismatch for shard {shard}: expected ({size}, ...{tuple(param.shape[1:])}), "
                             f"got {tuple(tensor.shape)}")
        if isinstance(tensor, QuantizedWeight) and param is self.weight:
            self.__dict__.setdefault("quantized_shards", {})[shard] = tensor
            return
        param.data[start:start + size].copy_(tensor)

    def forward_split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.forward(x).split(self.out_sizes, dim=-1))
