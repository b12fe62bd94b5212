"""HF architecture name -> model class.

Owns: the table of supported architectures and `build_model`, which makes an empty model
on the target device and dtype from a transformers config.
Must not: load weights from files (weights/ does) or build engines.
"""
from __future__ import annotations

import importlib

import torch

from tidal.errors import TidalError

_MODELS = {
    "LlamaForCausalLM": ("tidal.model.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("tidal.model.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("tidal.model.llama", "LlamaForCausalLM"),
    "OPTForCausalLM": ("tidal.model.opt", "OPTForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(hf_config):
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in _MODELS:
            module, name = _MODELS[arch]
            return getattr(importlib.import_module(module), name)
    raise TidalError(f"architecture {archs or '(none given in config.json)'} is not supported; "
                     f"tidal runs {', '.join(supported_architectures())}", param="model")


def build_model(hf_config, device: torch.device, dtype: torch.dtype, max_position: int | None = None):
    cls = get_model_class(hf_config)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(hf_config, max_position=max_position)
    finally:
        torch.set_default_dtype(prev)
    # rope tables stay fp32 whatever the model dtype, as HF keeps them
    for name, buf in model.named_buffers():
        if name.endswith(("cos", "sin")):
            buf.data = buf.data.float()
    return model.eval()
