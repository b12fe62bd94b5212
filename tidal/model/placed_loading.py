"""Loading a model into a weight placement (weights/placement.py): resident tensors in place,
streamed layers as placeholders with a source the prefetcher copies from.

Owns: `load_placed` (one pass over the checkpoint, or dummy weights, with at most one streamed
layer's tensors in memory at a time), staging a layer out to a pinned host buffer or an
--offload-dir file, and mapping an HF safetensors checkpoint in place.
Must not: pick tiers or the policy, or run layers; it fills tensors through the model's own
`load_named_weights` / `weight_loader`, so name mapping and fusing stay in model/.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from tidal.errors import TidalError
from tidal.model.loading import load_named_weights
from tidal.weights.dummy import fill_dummy
from tidal.weights.loader import plain_safetensors
from tidal.weights.placement import (LayerLayout, Placement, StreamedLayer, host_buffer, layer_of, shared_tensor_ids,
                                     without_layers)


class _Subset:
    """Duck-types a model for load_named_weights, restricted to some of its parameters."""

    def __init__(self, model: nn.Module, names: set[str]):
        self.model, self.names = model, names

    def named_parameters(self, remove_duplicate: bool = True):
        return ((n, p) for n, p in self.model.named_parameters(remove_duplicate=remove_duplicate) if n in self.names)

    def map_weight_name(self, name):
        return self.model.map_weight_name(name)

    def get_submodule(self, name):
        return self.model.get_submodule(name)


def load_placed(model: nn.Module, tiers: list[str], device: torch.device, dtype: torch.dtype, checkpoint,
                read: Callable[[], Iterable], dummy_seed: int | None, quantize: Callable[[nn.Module], object] | None,
                store, progress: Callable[[Iterable], Iterable] = iter) -> Placement:
    """Fill `model` (built on the CPU) under `tiers`; streamed layers end up as placeholders with a
    source. `read()`: the checkpoint's (HF name, tensor) pairs, as the resident runner reads them.
    `dummy_seed`: random weights drawn exactly as the resident runner draws them.
    `quantize(module)`: the runner's quantization, applied to each layer on `device`. `store`: an
    offload_dir.OffloadStore, or None when no --offload-dir was given. `progress` wraps the tensor
    stream (a progress bar). Raises ValueError for a checkpoint that does not fit the model."""
    stream = [i for i, t in enumerate(tiers) if t == "disk" or (t == "host" and device.type != "cpu")]
    layouts = {i: LayerLayout(model.layers[i], shared_tensor_ids(model)) for i in stream}
    shards = plain_safetensors(checkpoint) if dummy_seed is None else None
    how = {}
    for i in stream:
        if tiers[i] == "host":
            how[i] = "host"
        elif shards is not None and quantize is None:
            how[i] = "inplace"
        elif store is None:
            why = "random (dummy) weights" if dummy_seed is not None else \
                "quantized weights" if quantize is not None else f"a {checkpoint.format} checkpoint"
            raise TidalError(f"the policy puts {sum(t == 'disk' for t in tiers)} layer(s) on disk, and {why} "
                             "cannot be memory-mapped from the checkpoint in place; pass --offload-dir DIR",
                             param="offload_dir")
        else:
            how[i] = "cached" if store.has(i, layouts[i]) else "write"
    staged = {i for i in stream if how[i] in ("host", "write")}
    skipped = set(stream) - staged
    streamed: dict[int, StreamedLayer] = {}

    def stage_out(i: int) -> None:  # a staged layer is loaded: quantize, keep its bytes aside, release
        layer = model.layers[i]
        if quantize is not None:
            quantize(layer.to(device))
        lay = LayerLayout(layer, shared_tensor_ids(model))
        if how[i] == "host":
            buf = host_buffer(lay.nbytes, device)
            for v, t in zip(lay.views(buf), lay.current()):
                v.copy_(t)
            streamed[i] = StreamedLayer(i, "host", lay, host_buffer=buf)
        else:
            store.write(i, layouts[i], lay)
            streamed[i] = StreamedLayer(i, "disk", lay, ops=store.ops(i, lay))
        lay.release()

    with without_layers(model, stream):
        model.to(device)
    if dummy_seed is not None:
        _load_dummy(model, dummy_seed, skipped, staged, stage_out)
    else:
        _load_checkpoint(model, read, dtype, shards, skipped, staged, stage_out, progress)
    handles: dict = {}
    for i in sorted(skipped):
        lay = layouts[i]
        if how[i] == "inplace":
            streamed[i] = StreamedLayer(i, "disk", lay, ops=_inplace_ops(model, shards, i, lay, handles))
        else:  # cached: a quantized layer's structure comes from quantizing stand-in values
            if quantize is not None:
                lay.bind([torch.randn(e.shape, device=device).to(e.dtype) * 0.02 for e in lay.entries])
                quantize(model.layers[i])
                lay = LayerLayout(model.layers[i], shared_tensor_ids(model))
            streamed[i] = StreamedLayer(i, "disk", lay, ops=store.ops(i, lay))
        lay.release()
    return Placement(tiers, streamed, list(handles.values()) + (list(store.handles) if store is not None else []))


def _load_dummy(model, seed, skipped, staged, stage_out) -> None:
    # weights/dummy.py's values by name, as ModelRunner._load_weights fills them: equal to a resident run's
    last = None
    for name, p in model.named_parameters():
        i = layer_of(name)
        if i != last and last in staged:
            stage_out(last)
        last = i
        if i not in skipped:
            fill_dummy(p, name, seed)
    if last in staged:
        stage_out(last)


def _expected(model, i: int) -> set:
    out = set()
    for name, _ in model.layers[i].named_parameters(prefix=f"layers.{i}"):
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        out.update((name, s) for s in (getattr(owner, "offsets", None) or [None]))
    return out


def _load_checkpoint(model, read, dtype, shards, skipped, staged, stage_out, progress) -> None:
    """One pass over the checkpoint: resident tensors load as usual; a staged layer's tensors are
    held until the layer is complete, then loaded, staged out and freed (one layer in memory)."""
    pending = {i: [] for i in staged}
    missing = {i: _expected(model, i) for i in staged}

    def wanted(hf_name):
        mapped = model.map_weight_name(hf_name)
        return None if mapped is None else (layer_of(mapped[0]), mapped)

    if shards is not None:  # plain safetensors: skip the in-place layers unread
        def source():
            from safetensors import safe_open
            for path, names in shards.items():
                with safe_open(path, framework="pt") as f:
                    for n in names:
                        w = wanted(n)
                        if w is None or w[0] not in skipped:
                            yield n, f.get_tensor(n).to(dtype)
    else:
        source = read

    def flush(i):
        names = {n for n, _ in model.layers[i].named_parameters(prefix=f"layers.{i}")}
        load_named_weights(_Subset(model, names), pending.pop(i))
        stage_out(i)

    def resident():
        for hf_name, t in progress(source()):
            w = wanted(hf_name)
            i = w[0] if w else None
            if i in skipped:
                continue
            if i in pending:
                pending[i].append((hf_name, t))
                name, shard = w[1]
                missing[i] -= {(name, shard)} if shard is not None else {m for m in missing[i] if m[0] == name}
                if not missing[i]:
                    flush(i)
                continue
            yield hf_name, t

    stream = set(skipped) | set(staged)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False) if layer_of(n) not in stream}
    load_named_weights(_Subset(model, names), resident())
    for i in list(pending):  # incomplete: load what came, which names what is missing
        flush(i)


def _inplace_ops(model, shards, i: int, lay: LayerLayout, handles: dict) -> list:
    from safetensors import safe_open
    ops, need = [], _expected(model, i)
    prefix = f"layers.{i}."
    for path, names in shards.items():
        for hf_name in names:
            mapped = model.map_weight_name(hf_name)
            if mapped is None or layer_of(mapped[0]) != i:
                continue
            if path not in handles:
                handles[path] = safe_open(path, framework="pt")
            f = handles[path]
            name, shard = mapped
            if name[len(prefix):] not in lay.index:
                raise ValueError(f"checkpoint tensor '{hf_name}' has no place in layer {i} (mapped to '{name}')")
            j, src = lay.index[name[len(prefix):]], f.get_tensor(hf_name)  # a view of the mapping, not a read
            shape, row = tuple(lay.entries[j].shape), None
            if shard is not None:  # one projection of a fused one: its rows (MergedLinear.offsets)
                row, rows = model.get_submodule(name.rsplit(".", 1)[0]).offsets[shard]
                shape = (rows, *shape[1:])
            if tuple(src.shape) != shape:
                raise ValueError(f"shape mismatch for {hf_name}: {tuple(src.shape)} vs {shape} in {name}")
            ops.append((src, j, row))
            need -= {(name, shard)} if shard is not None else {m for m in need if m[0] == name}
    if need:
        raise ValueError(f"checkpoint lacks {len(need)} tensor(s) of layer {i}, e.g. {sorted(need)[:2]}")
    return ops
