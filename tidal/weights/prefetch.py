"""Copies streamed decoder layers onto the compute device just before they run, one layer ahead.

Owns: `LayerPrefetcher`: a fixed device working set of `num_slots` (2) layer buffers, and a forward
pre-hook on each streamed layer that waits for that layer's copy, binds the layer's parameters to
views of its slot, and starts copying the next streamed layer (wrapping round to the first, for
the next step) into the other slot. A layer's bytes are copied once however many micro-batches
then run through it.
- CPU: a one-thread pool copies from the memory-mapped file into the slot: a real copy, so the
  read (page cache or disk) happens while the current layer computes.
- CUDA: host-tier layers copy from pinned memory on a side stream; disk-tier layers are read by the
  thread into a pinned staging buffer, then copied on the side stream. Events order each copy
  after the compute that last used its slot, and the compute after the copy.
Must not: decide placement (placement.py) or know the step schedule (it sees only layer calls).
`TIDAL_PREFETCH=0` copies each layer only when it is called (no overlap), for comparisons.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from tidal.weights.placement import StreamedLayer, host_buffer


class LayerPrefetcher:
    def __init__(self, model: nn.Module, streamed: dict[int, StreamedLayer], device: torch.device,
                 num_slots: int = 2):
        self.device, self.cuda, self.streamed = device, device.type == "cuda", streamed
        order = sorted(streamed)
        self.next = {i: order[(k + 1) % len(order)] for k, i in enumerate(order)}
        nbytes = max(s.layout.nbytes for s in streamed.values())
        self.slots = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(num_slots)]
        self.views = [{i: s.layout.views(buf) for i, s in streamed.items()} for buf in self.slots]
        self.occupant: list[int | None] = [None] * num_slots   # layer whose bytes are (being) copied in
        self.pending: list = [None] * num_slots                 # the copy's future, until waited for
        self.bound: list[int] = []                              # layers whose parameters view a slot now
        self._cursor = 0
        self.prefetch = os.environ.get("TIDAL_PREFETCH", "1") != "0"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="tidal-prefetch")
        self.stats = {"loads": 0, "load_s": 0.0, "wait_s": 0.0, "peak_bound": 0}
        if self.cuda:
            disk = any(s.host_buffer is None for s in streamed.values())
            self.staging = [host_buffer(nbytes, device) for _ in self.slots] if disk else []
            self.staging_views = [{i: s.layout.views(buf) for i, s in streamed.items()} for buf in self.staging]
            self.side = torch.cuda.Stream(device)
            self.loaded = [torch.cuda.Event() for _ in self.slots]
            self.stream_wait = [False] * num_slots
        self.hooks = [model.layers[i].register_forward_pre_hook(self._hook(i)) for i in order]

    def _hook(self, i: int):
        return lambda module, args: self.get(i)

    def get(self, i: int) -> None:
        """Make layer i's parameters view its weights on the device; start copying the next layer."""
        s = self._slot_of(i)
        if s is None:  # not prefetched: the first step, or TIDAL_PREFETCH=0
            s = self._load(i, avoid=None)
        self._wait(s)
        if i not in self.bound:
            self.streamed[i].layout.bind(self.views[s][i])
            self.bound.append(i)
            self.stats["peak_bound"] = max(self.stats["peak_bound"], len(self.bound))
        nxt = self.next[i]
        if self.prefetch and self._slot_of(nxt) is None:
            self._load(nxt, avoid=s)

    def _slot_of(self, i: int) -> int | None:
        return next((s for s, occ in enumerate(self.occupant) if occ == i), None)

    def _load(self, i: int, avoid: int | None) -> int:
        n = len(self.slots)
        s = next(k % n for k in range(self._cursor, self._cursor + n) if k % n != avoid)
        self._cursor = s + 1
        self._wait(s)  # an earlier copy into this slot finishes before the slot is reused
        old = self.occupant[s]
        if old in self.bound:
            self.streamed[old].layout.release()
            self.bound.remove(old)
        self.occupant[s] = i
        self.stats["loads"] += 1
        layer = self.streamed[i]
        if not self.cuda:
            self.pending[s] = self.pool.submit(self._timed, layer.fill, self.views[s][i])
            return s
        # the copy may start once the compute queued so far (the slot's last user among it) is done
        free = torch.cuda.Event()
        free.record(torch.cuda.current_stream(self.device))
        self.stream_wait[s] = True
        if layer.host_buffer is not None:
            self._to_device(layer.host_buffer, s, layer.layout.nbytes, free)
        else:
            self.pending[s] = self.pool.submit(self._timed, self._disk_to_device, i, s, free)
        return s

    def _wait(self, s: int) -> None:
        fut = self.pending[s]
        if fut is not None:
            t0 = time.perf_counter()
            fut.result()
            self.stats["wait_s"] += time.perf_counter() - t0
            self.pending[s] = None
        if self.cuda and self.stream_wait[s]:
            torch.cuda.current_stream(self.device).wait_event(self.loaded[s])
            self.stream_wait[s] = False

    def _timed(self, fn, *args) -> None:
        t0 = time.perf_counter()
        fn(*args)
        self.stats["load_s"] += time.perf_counter() - t0

    def _to_device(self, src: torch.Tensor, s: int, nbytes: int, free) -> None:
        with torch.cuda.stream(self.side):
            self.side.wait_event(free)
            self.slots[s][:nbytes].copy_(src[:nbytes], non_blocking=True)
            self.loaded[s].record(self.side)

    def _disk_to_device(self, i: int, s: int, free) -> None:
        """Worker thread: file -> pinned staging buffer -> device slot (side stream)."""
        with torch.cuda.device(self.device):
            self.loaded[s].synchronize()  # the staging buffer's previous copy to the device is done
            self.streamed[i].fill(self.staging_views[s][i])
            self._to_device(self.staging[s], s, self.streamed[i].layout.nbytes, free)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.pool.shutdown(wait=True)
