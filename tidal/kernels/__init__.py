"""One backend interface over the ops that differ by device.

Owns: `get_backend(device)`, which returns an object with the ops layers call
(`write_kv`, `paged_attention`). Layers never branch on cpu vs cuda; this is the only place
that does. Triton kernels for CUDA plug in here (kernels/triton/), falling back to the torch
reference ops in torch_ops.py.
Must not: import model, engine or server code.
"""
from __future__ import annotations

import torch

from tidal.kernels import torch_ops


class TorchBackend:
    name = "torch"
    write_kv = staticmethod(torch_ops.write_kv)
    paged_attention = staticmethod(torch_ops.paged_attention)


_BACKENDS: dict[str, object] = {}


def get_backend(device: torch.device | str):
    kind = torch.device(device).type
    if kind not in _BACKENDS:
        _BACKENDS[kind] = TorchBackend()
    return _BACKENDS[kind]
