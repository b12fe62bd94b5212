"""GGUF files -> a transformers config, a tokenizer directory and HF-named CPU tensors.

Owns: parsing a GGUF file once (gguf.GGUFReader) into a per-file cache (index.json plus the tokenizer
transformers converts from the file), llama.cpp -> HF tensor names per GGUF architecture, undoing
llama.cpp's q/k row permutation, and reading tensors from a memory map of the file: each one
dequantized by gguf_dequant.py (also reachable as `gguf_file.dequantize`), or its Q4_1 blocks
handed on as they are, for int4.
Must not: know about tidal's model classes, devices or placement; it hands back CPU tensors.

Why a cache: GGUFReader parses the 49k-token vocabulary and merge arrays element by element (2-3 s
for SmolLM2-135M), and transformers' tokenizer conversion takes as long again. Both depend only on
the file, so the first open writes what they produce next to a tensor table; later opens read that
table and memory-map the file.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from tidal.errors import TidalError
from tidal.weights.gguf_dequant import Q4_1, dequantize
from tidal.weights.quant import from_gguf_q4_1

INDEX_VERSION = 1
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufArch:
    """How one GGUF `general.architecture` maps onto a transformers model."""

    model_type: str  # transformers config model_type
    hf_architecture: str  # config.architectures[0]
    # llama.cpp permutes q/k rows for interleaved (GPT-J style) rope only for llama-family
    # converters; qwen2 uses neox rope and is written unpermuted.
    permute_qk: bool


# Adding an architecture: an entry here (and, if its tensor names differ, in _BLOCK_NAMES).
ARCHITECTURES = {
    "llama": GgufArch("llama", "LlamaForCausalLM", permute_qk=True),
    # "qwen2": GgufArch("qwen2", "Qwen2ForCausalLM", permute_qk=False),
}

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    return None


def unpermute_rows(rows, n_head: int):
    """Undo convert_hf_to_gguf's `permute`: rows (head, half, i) were written as (head, i, half).

    Works on a numpy array or a torch tensor of rows. Quantization blocks never cross a row, so
    this may run on the raw block bytes (rows x bytes per row) before dequantizing.
    """
    head_rows = rows.shape[0] // n_head
    return rows.reshape(n_head, head_rows // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def cache_dir_for(path: str) -> str:
    """`$TIDAL_CACHE_DIR/gguf/<key>` (default root ~/.cache/tidal); key changes when the file does."""
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    root = os.environ.get("TIDAL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tidal")
    return os.path.join(root, "gguf", key)


def load_or_build_index(path: str) -> tuple[dict, str]:
    """`(index, cache_dir)`: the cached index if there is one, else parse the file and write it."""
    check_magic(path)
    cache_dir = cache_dir_for(path)
    index_path = os.path.join(cache_dir, "index.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
        if index.get("version") == INDEX_VERSION:
            return index, cache_dir
    except (OSError, ValueError):
        pass  # no cache yet, or an unreadable one: rebuild it
    index = _parse(path)
    return index, _write_cache(path, index, cache_dir)


def check_magic(path: str) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise TidalError(f"'{path}' is not a GGUF file (bad magic bytes {magic!r}, expected b'GGUF')", param="model")


def _parse(path: str) -> dict:
    """Read the header with GGUFReader; validate; return the JSON-able index."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf/numpy raise ValueError/IndexError/struct errors on a cut file
        raise TidalError(f"GGUF file '{path}' is truncated or corrupt ({type(e).__name__}: {e})", param="model")

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch_name = field("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise TidalError(
            f"GGUF file '{path}' has architecture '{arch_name}', which tidal cannot load "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})",
            param="model",
        )
    size = os.path.getsize(path)
    tensors = []
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            raise TidalError(f"GGUF file '{path}' holds tensor '{t.name}', which tidal cannot map", param="model")
        offset, nbytes = int(t.data_offset), int(t.n_bytes)
        if offset + nbytes > size:
            raise TidalError(f"GGUF file '{path}' is truncated: tensor '{t.name}' ends past the end", param="model")
        shape = [int(d) for d in reversed(t.shape.tolist())]  # ggml lists the fastest dim first
        tensors.append({"name": name, "type": int(t.tensor_type), "shape": shape, "offset": offset, "nbytes": nbytes})
    config = _config_kwargs(arch_name, field, {t.name for t in reader.tensors})
    return {"version": INDEX_VERSION, "architecture": arch_name, "config": config, "tensors": tensors}


def _config_kwargs(arch_name: str, field, tensor_names: set[str]) -> dict:
    """transformers config kwargs from GGUF metadata, via transformers' own key table."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = ARCHITECTURES[arch_name]
    kwargs = {}
    for prefix, table in ((arch_name, GGUF_CONFIG_MAPPING[arch_name]), ("tokenizer", GGUF_CONFIG_MAPPING["tokenizer"])):
        for gguf_key, hf_key in table.items():
            value = field(f"{prefix}.{gguf_key}")
            if hf_key is not None and value is not None:
                kwargs[hf_key] = value
    if "vocab_size" not in kwargs:  # older files only say it through the vocabulary's length
        kwargs["vocab_size"] = len(field("tokenizer.ggml.tokens", []))
    rope = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta", 10000.0)}
    scaling = field(f"{arch_name}.rope.scaling.type")
    if scaling not in (None, "none"):
        rope.update(rope_type=scaling, factor=field(f"{arch_name}.rope.scaling.factor"))
        original = field(f"{arch_name}.rope.scaling.original_context_length")
        if original is not None:
            rope["original_max_position_embeddings"] = original
    kwargs.update(
        model_type=arch.model_type,
        architectures=[arch.hf_architecture],
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensor_names,
    )
    return kwargs


def _write_cache(path: str, index: dict, cache_dir: str) -> str:
    """Convert the tokenizer and write it with the index; atomic (temp dir + rename)."""
    from transformers import AutoTokenizer

    try:
        # transformers' GGUF converter, so tokens match AutoTokenizer(..., gguf_file=...) exactly
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except Exception as e:
        raise TidalError(f"cannot build a tokenizer from GGUF file '{path}' ({type(e).__name__}: {e})", param="model")
    parent = os.path.dirname(cache_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    except OSError:  # read-only cache root: still works, just without reuse
        parent, tmp = None, tempfile.mkdtemp(prefix="tidal-gguf-")
    try:
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump(index, f)
        if parent is not None:
            os.rename(tmp, cache_dir)
            return cache_dir
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isfile(os.path.join(cache_dir, "index.json")):
            return cache_dir  # another process finished first; its copy is identical
        raise
    return tmp


def iter_gguf_tensors(path: str, index: dict, config, dtype: torch.dtype, keep_quantized=None):
    """Yield (HF name, CPU tensor in dtype) for every tensor in the index, in file order. With
    `keep_quantized=(4, 32)` (int4, group 32), 2-D Q4_1 tensors come as a QuantizedWeight instead:
    their blocks as they are (weights/quant.from_gguf_q4_1), never dequantized."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    permute = ARCHITECTURES[index["architecture"]].permute_qk
    n_heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for t in index["tensors"]:
        raw = data[t["offset"] : t["offset"] + t["nbytes"]]
        proj = t["name"].split(".")[-2]
        if permute and proj in n_heads:
            raw = unpermute_rows(raw.reshape(t["shape"][0], -1), n_heads[proj]).reshape(-1)
        if keep_quantized == (4, 32) and t["type"] == Q4_1 and len(t["shape"]) == 2:
            yield t["name"], from_gguf_q4_1(raw, t["shape"][1])
        else:
            yield t["name"], dequantize(raw, t["type"], t["shape"], dtype)
