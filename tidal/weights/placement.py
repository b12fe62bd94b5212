"""Where each decoder layer's weights live (device / host / disk).

Owns: `assign_tiers` (layers in order, each to the tier its cumulative-byte midpoint falls in, as
FlexGen does), `LayerLayout` (one layer's own tensors packed into one byte buffer, and rebinding
the layer's parameters and buffers to views of such a buffer), and `StreamedLayer`: a layer that
is not resident and where its bytes come from (a pinned host buffer on CUDA, or memory-mapped
safetensors: the checkpoint's own, or a file in --offload-dir), `host_buffer` (page-locked on
CUDA) and `copy_serial`. Loading a model into this shape
is model/placed_loading.py; copying a streamed layer in before it runs is weights/prefetch.py.
Embeddings, the LM head and everything else outside the decoder layers stays resident. On a CPU
device the host tier is resident too (host == device): only disk layers stream.
Must not: pick the policy (plan/ and engine/offload_runner.py do), run layers, or read files.
"""
from __future__ import annotations

import ctypes

import re
import warnings
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


_ALIGN = 64  # byte alignment of each tensor in a layer buffer: any dtype view is legal
_LAYER = re.compile(r"^layers\.(\d+)\.")


def assign_tiers(layer_bytes: list[int], percents) -> list[str]:
    """Walking the layers in order, a layer goes to the tier (device, host, disk; `percents` of the
    decoder-layer bytes, summing to 100) in whose share the midpoint of its cumulative bytes falls."""
    total, acc, tiers = sum(layer_bytes) or 1, 0, []
    for b in layer_bytes:
        mid = (acc + b / 2) / total * 100
        acc += b
        tiers.append("device" if mid < percents[0] else "host" if mid < percents[0] + percents[1] else "disk")
    return tiers


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def module_tensors(module: nn.Module):
    """(kind, attr, item, tensor) for each tensor a module holds itself: parameters, buffers, and
    plain attributes that are tensors or tuples of tensors (a quantized layer's packed weight)."""
    for attr, t in module._parameters.items():
        if t is not None:
            yield "param", attr, None, t
    for attr, t in module._buffers.items():
        if t is not None:
            yield "buffer", attr, None, t
    for attr, v in vars(module).items():
        if attr.startswith("_"):
            continue
        if isinstance(v, torch.Tensor):
            yield "attr", attr, None, v
        elif isinstance(v, (tuple, list)):
            for k, x in enumerate(v):
                if isinstance(x, torch.Tensor):
                    yield "attr", attr, k, x


def shared_tensor_ids(model: nn.Module) -> set[int]:
    """Tensors a decoder layer reaches but does not own: held outside the layers, or by several."""
    outside = set()
    for name, m in model.named_modules():
        if name != "layers" and not name.startswith("layers."):
            outside.update(id(t) for *_, t in module_tensors(m))
    seen = Counter(id(t) for layer in model.layers for m in layer.modules() for *_, t in module_tensors(m))
    return outside | {k for k, n in seen.items() if n > 1}


@dataclass
class _Entry:
    name: str        # relative to the layer, e.g. "mlp.down_proj.weight" or "mlp.down_proj.packed.0"
    module: nn.Module
    kind: str        # "param", "buffer" or "attr"
    attr: str
    item: int | None  # index within a tuple attribute
    shape: torch.Size
    dtype: torch.dtype
    offset: int
    nbytes: int


class LayerLayout:
    """A decoder layer's own tensors, in a fixed order at 64-byte-aligned offsets of one buffer."""

    def __init__(self, layer: nn.Module, shared_ids: set[int]):
        self.entries: list[_Entry] = []
        offset = 0
        for mod_name, module in layer.named_modules():
            for kind, attr, item, t in module_tensors(module):
                if id(t) in shared_ids:
                    continue
                nbytes = t.numel() * t.element_size()
                name = ".".join(x for x in (mod_name, attr, None if item is None else str(item)) if x)
                self.entries.append(_Entry(name, module, kind, attr, item, t.shape, t.dtype, offset, nbytes))
                offset += -(-nbytes // _ALIGN) * _ALIGN
        self.nbytes = offset
        self.index = {e.name: j for j, e in enumerate(self.entries)}

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor of the layer as a view of `buf` (uint8, at least nbytes)."""
        return [buf[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries]

    def current(self) -> list[torch.Tensor]:
        out = []
        for e in self.entries:
            table = e.module._parameters if e.kind == "param" else e.module._buffers if e.kind == "buffer" \
                else e.module.__dict__
            out.append(table[e.attr] if e.item is None else table[e.attr][e.item])
        return out

    def bind(self, tensors: list[torch.Tensor]) -> None:
        """Point the layer's tensors at `tensors` (the modules keep their Parameter objects)."""
        for e, t in zip(self.entries, tensors):
            if e.kind == "param":
                e.module._parameters[e.attr].data = t
            elif e.kind == "buffer":
                e.module._buffers[e.attr] = t
            elif e.item is None:
                e.module.__dict__[e.attr] = t
            else:
                seq = e.module.__dict__[e.attr]
                e.module.__dict__[e.attr] = type(seq)(t if k == e.item else x for k, x in enumerate(seq))

    def release(self) -> None:
        """Drop the layer's storage: empty placeholders until the prefetcher binds a buffer."""
        self.bind([torch.empty(0, dtype=e.dtype) for e in self.entries])


def host_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 CPU buffer, page-locked when `device` is CUDA so copies to it run asynchronously.
    Registered with cudaHostRegister rather than taken from torch's pinned allocator, which rounds
    each block up to a power of two (a 1.2 GiB layer would pin 2 GiB)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if device.type == "cuda" and nbytes:
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0)) == 0:
            weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr())
        else:  # out of lockable memory: still correct, the copies are just synchronous
            warnings.warn(f"could not page-lock {nbytes} bytes of host memory; host-to-device copies will not overlap")
    return buf


@dataclass
class StreamedLayer:
    """A decoder layer whose weights are not resident: where to copy them from before it runs."""
    index: int
    tier: str                                  # "host" or "disk"
    layout: LayerLayout
    host_buffer: torch.Tensor | None = None    # host tier: the layer in layout order (pinned on CUDA)
    ops: list = field(default_factory=list)    # disk tier: (mapped source, entry index, first row or None)

    def fill(self, views: list[torch.Tensor]) -> None:
        """Copy the layer from its memory-mapped source into `views` (a fused projection's shards
        into their rows, casting dtype if the file's differs)."""
        with torch.no_grad():
            for src, j, row in self.ops:
                dst = views[j] if row is None else views[j][row:row + src.shape[0]]
                copy_serial(dst, src)


_SERIAL_ELEMS = 32000  # under ATen's grain size (32768): each piece copies on this thread alone


def copy_serial(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) on the calling thread only. A prefetch thread's copy must not start an
    OpenMP team of its own: it would fight the compute threads for the cores (measured on 2 cores:
    a prefetched step became slower than loading without overlap)."""
    if (dst.dtype == src.dtype and dst.device.type == "cpu" and src.device.type == "cpu"
            and dst.is_contiguous() and src.is_contiguous() and dst.numel() == src.numel()):
        # one memcpy with the GIL released (ctypes drops it): the compute thread keeps running Python
        # between its ops, where a loop of small torch copies took the GIL ~1,000 times a layer
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())
        return
    d, s = dst.view(-1), src.reshape(-1)
    for a in range(0, d.numel(), _SERIAL_ELEMS):
        d[a:a + _SERIAL_ELEMS].copy_(s[a:a + _SERIAL_ELEMS])


@dataclass
class Placement:
    tiers: list[str]
    streamed: dict[int, StreamedLayer]
    keep: list = field(default_factory=list)   # open safetensors files whose mappings back the disk sources

    def summary(self) -> str:
        c = Counter(self.tiers)
        return f"{c['device']} layers on device, {c['host']} on host, {c['disk']} on disk"


@contextmanager
def without_layers(model: nn.Module, indices):
    """Swap the given decoder layers out of `model` for the duration (for whole-model passes such
    as .to(device), quantization or packing that must leave streamed layers alone)."""
    saved = {i: model.layers[i] for i in indices}
    for i in saved:
        model.layers[i] = nn.Identity()
    try:
        yield model
    finally:
        for i, layer in saved.items():
            model.layers[i] = layer
