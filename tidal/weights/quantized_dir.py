"""The checkpoint format `tidal quantize` writes ("tidal-groupwise-v1"): an HF checkpoint directory
whose linear weights are already group-wise quantized, so that start-up does not redo it.

Layout: config.json is the HF config plus
    "tidal_quantization": {"bits": 4, "group_size": 32, "format": "tidal-groupwise-v1"}
(group_size null: one group per row). For each quantized weight `<module>.weight` (HF names, the
projections unfused) the safetensors files hold, together in one file, `<module>.qweight` (uint8,
weights/quant.py's packing), `<module>.scales` and `<module>.mins` ([out, in / group], fp16); every
other tensor under its HF name in the model dtype. The tokenizer files sit alongside.
Owns: the config entry (`quantization_entry`, `read_quantization`), the tensor names, writing
shards (`ShardWriter`) and reading them back (`iter_tensors`, `num_tensors`).
Must not: decide which tensors to quantize (tidal/quantize.py asks the model), or build modules.
"""
from __future__ import annotations

import json
import os

import torch

from tidal.errors import TidalError
from tidal.weights.quant import QuantizedWeight, dequantize

FORMAT = "tidal-groupwise-v1"
CONFIG_KEY = "tidal_quantization"
_PARTS = (".qweight", ".scales", ".mins")
_SHARD_BYTES = 2 << 30  # like HF's shards: no single huge file, and a writer that holds one shard at a time


def quantization_entry(bits: int, group_size: int | None) -> dict:
    return {"bits": bits, "group_size": group_size, "format": FORMAT}


def read_quantization(hf_config, path: str) -> dict | None:
    """The checked config entry of a quantized directory, or None for an ordinary checkpoint."""
    entry = getattr(hf_config, CONFIG_KEY, None)
    if entry is None:
        return None
    where = os.path.join(path, "config.json")
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        fmt = entry.get("format") if isinstance(entry, dict) else entry
        raise TidalError(f"'{where}' has {CONFIG_KEY} in format {fmt!r}, which this tidal cannot read "
                         f"(it reads {FORMAT}); quantize the original checkpoint again with `tidal quantize`",
                         param="model")
    group = entry.get("group_size")
    if entry.get("bits") not in (4, 8) or not (group is None or (isinstance(group, int) and group > 0)):
        raise TidalError(f"'{where}': {CONFIG_KEY} {entry} needs bits 4 or 8 and a positive group_size "
                         "(or null for one group per row)", param="model")
    return entry


def split(stem: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """`<stem>.weight` quantized -> its three stored tensors."""
    return {stem + ".qweight": qw.qdata, stem + ".scales": qw.scale, stem + ".mins": qw.min}


def num_tensors(shards: dict[str, list[str]]) -> int:
    """How many (name, tensor) pairs `iter_tensors` yields: a quantized weight's three count once."""
    return sum(1 for names in shards.values() for n in names if not n.endswith(_PARTS[1:]))


def iter_tensors(shards: dict[str, list[str]], quantization: dict, dtype: torch.dtype, keep_quantized=None):
    """Yield (HF name, tensor): `<module>.weight` as a QuantizedWeight when `keep_quantized` is the
    directory's (bits, group_size), else dequantized to `dtype`; the other tensors in `dtype`."""
    from safetensors import safe_open

    bits, group_size = quantization["bits"], quantization["group_size"]
    keep = keep_quantized == (bits, group_size)
    for shard, names in shards.items():
        with safe_open(shard, framework="pt") as f:
            present = set(names)
            for name in names:
                if name.endswith(_PARTS[1:]):
                    continue
                if not name.endswith(_PARTS[0]):
                    yield name, f.get_tensor(name).to(dtype)
                    continue
                stem = name[: -len(_PARTS[0])]
                if not {stem + p for p in _PARTS} <= present:
                    raise TidalError(f"'{shard}' holds {name} without its {stem}.scales and {stem}.mins; "
                                     "the directory is incomplete: run `tidal quantize` again", param="model")
                qw = _checked(f.get_tensor(name), f.get_tensor(stem + ".scales"), f.get_tensor(stem + ".mins"),
                              bits, group_size, f"{shard}: {stem}")
                yield stem + ".weight", qw if keep else dequantize(qw, dtype)


def _checked(qdata, scale, mn, bits: int, group_size: int | None, what: str) -> QuantizedWeight:
    rows, in_features = qdata.shape[0], qdata.shape[-1] * 8 // bits
    groups = scale.shape[-1] if scale.dim() == 2 else 0
    group = group_size or in_features
    if (qdata.dtype != torch.uint8 or qdata.dim() != 2 or scale.shape != mn.shape or groups == 0
            or tuple(scale.shape) != (rows, in_features // group) or in_features % group):
        raise TidalError(f"{what}: qweight {tuple(qdata.shape)} {qdata.dtype}, scales {tuple(scale.shape)} and "
                         f"mins {tuple(mn.shape)} do not fit int{bits} in groups of {group}; the file is corrupt "
                         "or from another tool", param="model")
    return QuantizedWeight(qdata, scale, mn, bits, group)


class ShardWriter:
    """Collects tensors into safetensors files of about `_SHARD_BYTES`; `add` keeps its tensors in
    one file (a weight's three parts). `finish` names them and writes the index when there are several."""

    def __init__(self, directory: str, max_bytes: int = _SHARD_BYTES):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.files, self.weight_map, self.total_bytes = 0, [], {}, 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending.update({k: t.contiguous() for k, t in tensors.items()})
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, os.path.join(self.directory, name), metadata={"format": "pt"})
        self.files.append(name)
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.rename(os.path.join(self.directory, self.files[0]), os.path.join(self.directory, "model.safetensors"))
            return ["model.safetensors"]
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        return list(self.files)
