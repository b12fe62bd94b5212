"""Copying checkpoint tensors into a model.

Owns: `map_packed_name` (HF q/k/v or gate/up names -> our fused module and its shard) and
`load_named_weights` (fills every parameter through its module's `weight_loader`, and names
whatever the checkpoint did not provide). A quantized tensor (weights/quant.QuantizedWeight) goes
as it is to a module that can hold one (a Linear), and is dequantized for any other.
Must not: read files (weights/ yields the tensors) or build models.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from tidal.weights.quant import QuantizedWeight, dequantize


def map_packed_name(name: str, packed_modules: dict[str, tuple[str, str]]) -> tuple[str, object]:
    """'layers.0.self_attn.q_proj.weight' -> ('layers.0.self_attn.qkv_proj.weight', 'q')."""
    for hf_frag, (ours, shard) in packed_modules.items():
        if f".{hf_frag}." in name:
            return name.replace(hf_frag, ours), shard
    return name, None


def load_named_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Copy checkpoint tensors into `model` via its `map_weight_name`; returns the parameters filled.
    Raises ValueError naming any parameter the checkpoint did not provide."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for hf_name, tensor in tensors:
        mapped = model.map_weight_name(hf_name)
        if mapped is None:
            continue
        name, shard = mapped
        if name not in params:
            raise ValueError(f"checkpoint tensor '{hf_name}' has no place in {type(model).__name__} (mapped to '{name}')")
        param = params[name]
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(tensor, QuantizedWeight) and not hasattr(owner, "take_quantized"):
            tensor = dequantize(tensor, param.dtype)
        if hasattr(owner, "weight_loader"):
            owner.weight_loader(param, tensor, shard)
        else:
            if param.shape != tensor.shape:
                raise ValueError(f"shape mismatch for {name}: {tuple(param.shape)} vs {tuple(tensor.shape)}")
            param.data.copy_(tensor)
        loaded.add(name)
    tied = {n for n, p in params.items() if any(p is params[m] for m in loaded)}
    missing = sorted(set(params) - loaded - tied)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    return loaded
