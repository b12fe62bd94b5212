"""Normalization layers. Owns: RMSNorm (computed in fp32, as HF does) with an optional fused
residual add; the arithmetic is the kernel backend's (`rms_norm`: torch ops, or one fused pass on CPU).
Must not: branch on device type."""
from __future__ import annotations

import torch
from torch import nn

from tidal.kernels import get_backend


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Returns norm(x) or, with a residual, (norm(x + residual), x + residual). The backend may
        update `residual` in place (callers hand over a residual they own)."""
        return get_backend(x.device).rms_norm(x, residual, self.weight, self.eps)
