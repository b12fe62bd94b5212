"""The machine's figures the cost model needs, measured once and cached.

Owns: `HardwareProfile` (matmul FLOP/s and weight-streaming bandwidth per weight format on the
device and on the CPU, decode-attention bandwidth, the four tier links, a decoder layer's dispatch
overhead, tier capacities), its JSON cache at ~/.cache/tidal/hardware-<hostname>-<device>.json
(TIDAL_CACHE_DIR overrides the folder; TIDAL_HARDWARE_PROFILE=PATH uses that file instead),
`get_profile` (load the cache, or measure with microbench.py), and reading free memory and disk
space now.
Must not: time anything itself (microbench.py does) or know about models and policies.
On a CPU-only machine the device *is* the host: `unified_memory` is true, host<->device "copies"
cost nothing in the cost model (their memcpy figure is kept for reference), and only disk streams.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from dataclasses import asdict, dataclass, field, fields, replace

from tidal.errors import TidalError

PROFILE_VERSION = 1


@dataclass
class HardwareProfile:
    device: str                                   # "cpu" or "cuda:N"
    device_name: str
    unified_memory: bool                          # device memory is host RAM (CPU-only)
    matmul_flops: dict[str, float]                # device FLOP/s at many rows, by format (float32, bfloat16, int4, ...)
    gemv_bw: dict[str, float]                     # device weight bytes/s at one row (weights streamed from memory)
    attn_bw: float                                # device decode attention, KV bytes read per second
    cpu_matmul_flops: dict[str, float]            # the same on the host CPU (CPU attention, or the device itself)
    cpu_attn_bw: float
    h2d_bw: float                                 # host -> device bytes/s (pinned on CUDA, memcpy on CPU)
    d2h_bw: float
    disk_read_bw: float                           # disk -> host, page cache bypassed where possible
    disk_write_bw: float                          # host -> disk, fsync'ed
    disk_read_cached_bw: float                    # disk -> host when the file sits in the page cache
    layer_overhead_s: float                       # one decoder layer's dispatch (Python + launches) at a tiny size
    device_capacity: int                          # bytes free at measurement
    host_capacity: int
    disk_capacity: int                            # free bytes where the disk test ran
    threads: int = 0                              # torch CPU threads during measurement
    notes: list[str] = field(default_factory=list)
    measured_at: str = ""
    hostname: str = ""
    torch_version: str = ""
    version: int = PROFILE_VERSION

    def flops(self, fmt: str, on_cpu: bool = False) -> float:
        """Matmul FLOP/s for a weight format, falling back to float32's when that format was not measured."""
        table = self.cpu_matmul_flops if on_cpu else self.matmul_flops
        return table.get(fmt) or table["float32"]

    def stream_bw(self, fmt: str) -> float:
        return self.gemv_bw.get(fmt) or self.gemv_bw["float32"]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareProfile":
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:
            raise TidalError(f"hardware profile is incomplete ({e}); re-measure it with `tidal plan --profile`",
                             param="hardware")

    def summary(self) -> str:
        g = 1e9
        mm = ", ".join(f"{k} {v / g:,.0f}" for k, v in self.matmul_flops.items())
        bw = ", ".join(f"{k} {v / g:,.1f}" for k, v in self.gemv_bw.items())
        lines = [f"device {self.device} ({self.device_name}), {self.threads} CPU threads"
                 + (", device memory = host RAM" if self.unified_memory else ""),
                 f"  matmul GFLOP/s: {mm}",
                 f"  one-row matmul, weight GB/s: {bw}",
                 f"  decode attention KV GB/s: device {self.attn_bw / g:,.1f}, cpu {self.cpu_attn_bw / g:,.1f}",
                 f"  links GB/s: host->device {self.h2d_bw / g:,.1f}, device->host {self.d2h_bw / g:,.1f}, "
                 f"disk read {self.disk_read_bw / g:,.2f} (cached {self.disk_read_cached_bw / g:,.1f}), "
                 f"disk write {self.disk_write_bw / g:,.2f}",
                 f"  decoder layer dispatch {self.layer_overhead_s * 1e6:,.0f} us; "
                 f"free: device {self.device_capacity / 2**30:,.1f} "
                 f"GiB, host {self.host_capacity / 2**30:,.1f} GiB, disk {self.disk_capacity / 2**30:,.1f} GiB"]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def cache_dir() -> str:
    return os.environ.get("TIDAL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tidal")


def profile_path(device: str) -> str:
    tag = device.replace(":", "")
    return os.path.join(cache_dir(), f"hardware-{socket.gethostname()}-{tag}.json")


def load_profile(path: str) -> HardwareProfile:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise TidalError(f"cannot read hardware profile '{path}' ({e.strerror}); "
                         "measure one with `tidal plan --profile`", param="hardware")
    except ValueError as e:
        raise TidalError(f"hardware profile '{path}' is not JSON ({e}); delete it or re-measure with "
                         "`tidal plan --profile`", param="hardware")
    return HardwareProfile.from_dict(data)


def save_profile(profile: HardwareProfile, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(profile.to_dict(), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)  # a reader never sees half a file


def get_profile(device: str = "cpu", offload_dir: str | None = None, remeasure: bool = False,
                progress: bool = True) -> tuple[HardwareProfile, str, bool]:
    """(profile, its cache path, whether it was measured now). Loads the cache unless `remeasure`."""
    if os.environ.get("TIDAL_HARDWARE_PROFILE") and not remeasure:  # a fixed profile (tests, or a fleet's)
        path = os.environ["TIDAL_HARDWARE_PROFILE"]
        return load_profile(path), path, False
    path = profile_path(device)
    if not remeasure and os.path.isfile(path):
        prof = load_profile(path)
        if prof.version == PROFILE_VERSION:
            return prof, path, False
    from tidal.plan.microbench import measure
    print(f"[tidal] measuring {device} for the offloading planner (about 10 s; cached in {path})", file=sys.stderr)
    prof = measure(device, offload_dir, progress=progress)
    save_profile(prof, path)
    return prof, path, True


def profile_for(engine_config, remeasure: bool = False, progress: bool = True) -> tuple[HardwareProfile, str, bool]:
    """The profile of the engine's device (cached, or measured now), with free memory read now:
    what `--policy auto` passes to search.choose_policy. Returns (profile, cache path, measured now)."""
    dev = engine_config.torch_device
    device = "cpu" if dev.type == "cpu" else f"cuda:{dev.index or 0}"
    prof, path, fresh = get_profile(device, engine_config.offload_dir, remeasure=remeasure, progress=progress)
    return (prof if fresh else live_capacities(prof)), path, fresh


def live_capacities(profile: HardwareProfile) -> HardwareProfile:
    """The profile with free memory read now (it changes between runs; rates do not)."""
    return replace(profile, device_capacity=free_device_memory(profile.device), host_capacity=free_host_memory())


def disk_free(path: str | None) -> int:
    """Free bytes under `path` (its nearest existing parent); 0 without a path: nothing may go to disk."""
    if not path:
        return 0
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


def free_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
        return info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def free_device_memory(device: str) -> int:
    if device.startswith("cuda"):
        import torch
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return free_host_memory()
