"""Rotary position embeddings (rotate-half / NeoX layout, as HF Llama uses).

Owns: the cos/sin table for every position, built with transformers' own rope-init
functions (default, linear, dynamic, yarn, longrope, llama3) so scaling matches HF exactly.
Must not: know about attention or the KV cache.
"""
from __future__ import annotations

import torch
from torch import nn

from tidal.kernels import get_backend


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, head_dim: int, max_position: int):
        super().__init__()
        params = getattr(hf_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        target = torch.empty(0).device  # where the model is being built (build_model sets a default device)
        with torch.device("cpu"):  # transformers' rope functions mix their own device with the default one
            if rope_type == "default":
                base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
                inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
                scaling = 1.0
            else:  # transformers imported only here: a default-rope model starts without it
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
                if getattr(hf_config, "is_light", False):  # weights/light_config.py: the functions want the real one
                    hf_config = hf_config.to_transformers()
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
            freqs = torch.arange(max_position, dtype=torch.float)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", (freqs.cos() * scaling).to(target), persistent=False)  # [P, d/2], fp32
        self.register_buffer("sin", (freqs.sin() * scaling).to(target), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, heads, d], k: [T, kv_heads, d] -> rotated, same dtype (the backend may rotate in place)."""
        return get_backend(q.device).rotary(q, k, self.cos, self.sin, positions)
