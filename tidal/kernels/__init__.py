"""One backend interface over the ops that differ by device.

Owns: `get_backend(device)`, which returns an object with the ops layers call
(`write_kv`, `paged_attention`, `pack_linear` / `linear`). Layers never branch on cpu vs cuda; this is the only place
that does. Triton kernels for CUDA plug in here (kernels/triton/), falling back to the torch
reference ops in torch_ops.py.
Must not: import model, engine or server code.
"""
from __future__ import annotations

import os

import torch

from tidal.kernels import torch_ops


class TorchBackend:
    name = "torch"
    write_kv = staticmethod(torch_ops.write_kv)

    def pack_linear(self, weight: torch.Tensor):
        """A backend-specific layout of a linear weight for faster matmuls, or None."""
        return None

    def linear(self, x, weight, bias, packed=None):
        return torch.nn.functional.linear(x, weight, bias)

    def paged_attention(self, q, k_cache, v_cache, meta, scale):
        return torch_ops.paged_attention(q, k_cache, v_cache, meta, scale)


class CpuBackend(TorchBackend):
    """Torch ops, with decode attention from the compiled CPU kernel once it is built
    (it reads K/V straight from the paged cache instead of gathering a padded copy)."""
    name = "cpu"

    def __init__(self):
        from tidal.kernels import cpu
        self._cpu = cpu
        if os.environ.get("TIDAL_CPU_KERNELS", "1") == "sync":
            cpu.load()
        else:
            cpu.load_in_background()

    def pack_linear(self, weight: torch.Tensor):
        # oneDNN's blocked layout: bf16 matmuls 2x faster at one row, 10-20% at 64 (measured here)
        if weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available() \
                or os.environ.get("TIDAL_PACK_LINEAR", "1") == "0":
            return None
        try:
            return torch.ops.mkldnn._reorder_linear_weight(weight, 64)
        except (RuntimeError, AttributeError):
            return None

    def linear(self, x, weight, bias, packed=None):
        if packed is None:
            return torch.nn.functional.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    def paged_attention(self, q, k_cache, v_cache, meta, scale):
        ext = self._cpu.ready()
        decode = None
        if ext is not None:
            def decode(q_dec, block_tables, seq_lens, max_seq_len):
                return ext.paged_decode_attention(q_dec, k_cache, v_cache, block_tables, seq_lens, scale)
        return torch_ops.paged_attention(q, k_cache, v_cache, meta, scale, decode=decode)


_BACKENDS: dict[str, object] = {}


def get_backend(device: torch.device | str):
    kind = torch.device(device).type
    if kind not in _BACKENDS:
        _BACKENDS[kind] = CpuBackend() if kind == "cpu" else TorchBackend()
    return _BACKENDS[kind]
