"""Token embeddings and the LM head.

Owns: `Embedding` and `LMHead` (logits only for the rows asked for; a faster packed copy of the head
for the backend, or a group-wise int4 copy under --quant int4, model/quantize.py). At batch-1 decode
the head is the biggest single read of a small model's step (SmolLM2: 57 MB in bf16 against 66 MB
for all 30 int4 decoder layers), so an int4 model that kept a bf16 head would spend half its
bandwidth there.
Must not: quantize (weights/quant.py does) or pick matmul kernels (QuantLinear does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class LMHead(nn.Module):
    def __init__(self, vocab_size: int, dim: int, tied_to: Embedding | None = None, bias: bool = False):
        super().__init__()
        self.tied = tied_to is not None
        self.quantized = None   # a QuantLinear standing in for the head (set_quantized)
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size), requires_grad=False) if bias else None

    packed = None

    def pack(self, backend) -> None:
        """After loading: a faster layout of the head (a copy: a tied weight still serves the embedding)."""
        if self.quantized is not None:
            return
        packed = backend.pack_linear(self.weight.data)
        if packed is not None:
            self.backend, self.packed = backend, packed

    def set_quantized(self, qlinear: nn.Module) -> None:
        """Compute logits with `qlinear` (bias included) from now on; an untied float weight is dropped."""
        self.quantized, self.packed = qlinear, None
        if not self.tied:
            self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized(hidden)
        if self.packed is not None:
            return self.backend.linear(hidden, self.weight, self.bias, self.packed)
        return F.linear(hidden, self.weight, self.bias)
