"""CPU kernels compiled on first use (torch.utils.cpp_extension), with the torch reference as fallback.

Owns: building and loading the C++ extension in this folder. The first build takes about a
minute and is cached under ~/.cache/torch_extensions; a machine without a C++ compiler, or
TIDAL_CPU_KERNELS=0, keeps the torch reference ops.
Must not: be imported on the hot path before `available()` says the build worked.
"""
from __future__ import annotations

import os
import sys
import threading

_ext = None
_tried = False
_lock = threading.Lock()


def ready():
    """The compiled module if it is built and loaded already, else None (never blocks)."""
    return _ext


def load_in_background() -> None:
    """Start building in a thread: the engine serves with the torch ops meanwhile, so a cold
    `tidal chat` does not wait for the compiler."""
    if not _tried and not _lock.locked():
        threading.Thread(target=load, name="tidal-cpu-kernels", daemon=True).start()


def load():
    """The compiled module, or None when it cannot be built here (blocks while building)."""
    global _ext, _tried
    if _tried:
        return _ext
    with _lock:
        if _tried:
            return _ext
        _tried = True
        if os.environ.get("TIDAL_CPU_KERNELS", "1") == "0":
            return None
        try:
            from torch.utils.cpp_extension import load as load_ext
            here = os.path.dirname(__file__)
            # paged_decode_quant.cpp registers torch.ops.tidal_kv.paged_decode_quant (quantized KV caches)
            # fused_ops.cpp: SiLU-and-mul, rotary; rms_norm.cpp: RMSNorm+residual (all bound in paged_decode.cpp)
            src = [os.path.join(here, f) for f in ("paged_decode.cpp", "paged_decode_quant.cpp", "fused_ops.cpp",
                                                  "rms_norm.cpp", "prefill_bf16.cpp")]
            flags = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
            name = _build_name(src + [os.path.join(here, "fused_ops.h"), os.path.join(here, "cpu_common.h"),
                                 os.path.join(here, "avx512_common.h")], flags)
            _clear_stale_lock(name)
            _ext = load_ext(name=name, sources=src, extra_cflags=flags,
                            extra_ldflags=["-fopenmp"], verbose=bool(os.environ.get("TIDAL_VERBOSE")))
        except Exception as e:  # no compiler, no ninja, odd platform: the torch ops still work
            print(f"[tidal] CPU kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "using torch reference ops", file=sys.stderr)
            _ext = None
        return _ext


def _build_name(files: list[str], flags: list[str]) -> str:
    """A build folder per version of the sources: two checkouts (or a git bisect) never rebuild
    over each other's library, and an edited source never loads a stale one."""
    import hashlib

    import torch
    h = hashlib.sha1(" ".join(flags + [torch.__version__]).encode())
    for f in files:
        with open(f, "rb") as fh:
            h.update(fh.read())
    return f"tidal_cpu_kernels_{h.hexdigest()[:10]}"


_STALE_LOCK_S = 600  # a build takes 30-75 s; an older lock was left by a process killed mid-build


def _clear_stale_lock(name: str) -> None:
    """torch's builder waits forever on a lock file that a killed build left behind."""
    import time
    try:
        from torch.utils.cpp_extension import _get_build_directory
        lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
        if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > _STALE_LOCK_S:
            print(f"[tidal] removing a stale CPU-kernel build lock ({lock})", file=sys.stderr)
            os.remove(lock)
    except (ImportError, OSError):
        pass
