"""Token embeddings and the LM head. Owns: `Embedding` and `LMHead` (logits only for the rows asked for)."""
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
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size), requires_grad=False) if bias else None

    packed = None

    def pack(self, backend) -> None:
        """After loading: a faster layout of the head (a copy: a tied weight still serves the embedding)."""
        packed = backend.pack_linear(self.weight.data)
        if packed is not None:
            self.backend, self.packed = backend, packed

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.backend.linear(hidden, self.weight, self.bias, self.packed)
        return F.linear(hidden, self.weight, self.bias)
