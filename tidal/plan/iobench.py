"""Timing and memory-system micro-benchmarks for `tidal plan --profile`.

Owns: `best` (the best time of a call over about half a second, on the device's own clock: CUDA
events on a GPU), `copy_bw`, `disk_bw` (uncached read via O_DIRECT, or after POSIX_FADV_DONTNEED
where O_DIRECT is refused; fsync'ed write; page-cache read) and `llc_bytes` (the CPU's last-level
cache size).
Must not: cache profiles or know about models (hardware.py, microbench.py).
"""
from __future__ import annotations

import mmap
import os
import tempfile
import time

import torch


_MIN_S = 0.4


def _timer(device: torch.device):
    """time_once(fn) -> seconds of one call, on the device's own clock."""
    if device.type == "cuda":
        def time_once(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return time_once

    def time_cpu(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return time_cpu


def best(fn, device: torch.device, min_s: float = _MIN_S) -> float:
    time_once = _timer(device)
    fn()  # warm-up: first-call allocation, kernel selection, packing caches
    best, t_end, n = float("inf"), time.perf_counter() + min_s, 0
    while n < 3 or time.perf_counter() < t_end:
        best, n = min(best, time_once(fn)), n + 1
    return best


def copy_bw(device: torch.device, nbytes: int) -> tuple[float, float]:
    """(host->device, device->host) bytes per second; on CPU both are a memcpy."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d = nbytes / best(lambda: dev.copy_(host, non_blocking=True), device)
    d2h = nbytes / best(lambda: host.copy_(dev, non_blocking=True), device)
    return h2d, d2h


def disk_bw(directory: str | None, nbytes: int, notes: list[str]) -> tuple[float, float, float]:
    """(read bypassing the page cache, write with fsync, read from the page cache) bytes per second."""
    os.makedirs(directory, exist_ok=True) if directory else None
    buf = mmap.mmap(-1, nbytes)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(1 << 20) * (nbytes >> 20))
    with tempfile.NamedTemporaryFile(dir=directory, prefix="tidal-disk-bench-", delete=False) as f:
        path = f.name

    def timed(flags: int, io, drop: bool = False) -> float:
        fd = os.open(path, flags)
        try:
            if drop:  # no O_DIRECT (e.g. tmpfs): ask the kernel to drop this file's cached pages instead
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            done = io(fd)
            return done / (time.perf_counter() - t0)
        finally:
            os.close(fd)
    try:
        write = timed(os.O_WRONLY, lambda fd: (os.write(fd, buf), os.fsync(fd))[0])
        try:
            read = timed(os.O_RDONLY | os.O_DIRECT, lambda fd: os.readv(fd, [buf]))
        except (OSError, AttributeError):
            drop = hasattr(os, "posix_fadvise")
            notes.append("disk read measured after POSIX_FADV_DONTNEED (no O_DIRECT here)" if drop else
                         "disk read may have come from the page cache (no O_DIRECT or fadvise here)")
            read = timed(os.O_RDONLY, lambda fd: os.readv(fd, [buf]), drop=drop)
        timed(os.O_RDONLY, lambda fd: os.readv(fd, [buf]))  # now it is cached
        cached = timed(os.O_RDONLY, lambda fd: os.readv(fd, [buf]))
        return read, write, cached
    finally:
        buf.close()
        os.unlink(path)


def llc_bytes() -> int:
    """The CPU's last-level cache size (0 if unknown)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
    except (OSError, ValueError):
        return 0
