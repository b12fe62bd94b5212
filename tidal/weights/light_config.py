"""A model config read from a GGUF file's metadata without importing transformers.

Owns: `LightConfig`, an object with the same attribute names and values as the transformers config
(e.g. `LlamaConfig`) that the same keyword arguments would give, for every field tidal reads; and
`to_transformers()` for the few callers that need the real thing (saving a directory, handing it to
transformers' own rope functions or models).
Must not: know about tidal's model classes, devices or placement.

Why: building a transformers config imports transformers' lazy module table and, through
`configuration_llama`, `torch.distributed.tensor` (about 2 s of a `tidal chat` start-up on a 2-core
CPU), while a GGUF's config is a handful of numbers already in the cached index. HF safetensors
directories still go through transformers' `AutoConfig` (loader.py).
"""
from __future__ import annotations

import copy

# Per model_type: the transformers config class's own defaults (transformers 5.x `LlamaConfig`), for
# the fields a GGUF index may leave out. tests/test_light_config.py checks them against transformers.
_DEFAULTS = {
    "llama": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
        "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True,
        "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "pretraining_tp": 1,
        "tie_word_embeddings": False, "rope_parameters": None, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "head_dim": None,
    },
}  # fmt: skip
# What every transformers config carries (PreTrainedConfig), whatever the model.
_COMMON = {"architectures": None, "dtype": None, "_name_or_path": "", "is_encoder_decoder": False}


class LightConfig:
    """`LightConfig(model_type="llama", hidden_size=576, ...)`: the attributes
    `transformers.AutoConfig.for_model(**same kwargs)` would have for the fields tidal reads
    (sizes, heads, rope_parameters, rms_norm_eps, vocab, max positions, tie_word_embeddings, token
    ids, architectures, dtype, ...). Attributes set later (as `tidal quantize` does) are kept and
    carried into `to_transformers()` / `save_pretrained()`."""

    is_light = True  # tells a caller it is not a transformers PreTrainedConfig

    def __init__(self, model_type: str, **kwargs):
        if model_type not in _DEFAULTS:
            raise ValueError(f"LightConfig has no defaults for model_type '{model_type}' (known: {sorted(_DEFAULTS)})")
        self._kwargs = {"model_type": model_type, **copy.deepcopy(kwargs)}
        values = {**_COMMON, **_DEFAULTS[model_type], **copy.deepcopy(kwargs)}
        if values.get("head_dim") is None:
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        if values.get("rope_parameters") is None:  # transformers' standardization of the legacy rope_theta
            values["rope_parameters"] = {"rope_theta": values.pop("rope_theta", 10000.0), "rope_type": "default"}
        self.model_type = model_type
        self.__dict__.update(values)

    @property
    def torch_dtype(self):  # the name transformers 4.x used for `dtype`
        return self.dtype

    @property
    def name_or_path(self) -> str:
        return self._name_or_path

    def to_dict(self) -> dict:
        """The public attributes, as a plain dict (a deep copy)."""
        return copy.deepcopy({k: v for k, v in vars(self).items() if not k.startswith("_") or k == "_name_or_path"})

    def to_transformers(self):
        """The real transformers config (imports transformers): the original keyword arguments, plus
        every attribute set on this object since."""
        from transformers import AutoConfig

        config = AutoConfig.for_model(**copy.deepcopy(self._kwargs))
        for key, value in self.to_dict().items():
            if key != "model_type" and getattr(config, key, object()) != value:
                setattr(config, key, copy.deepcopy(value))
        return config

    def save_pretrained(self, save_directory: str) -> None:
        """Write config.json exactly as transformers would (transformers does the writing)."""
        self.to_transformers().save_pretrained(save_directory)

    def __repr__(self) -> str:
        return f"LightConfig({self.to_dict()})"
