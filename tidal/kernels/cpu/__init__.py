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
            src = os.path.join(os.path.dirname(__file__), "paged_decode.cpp")
            flags = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
            _ext = load_ext(name="tidal_cpu_kernels", sources=[src], extra_cflags=flags,
                            extra_ldflags=["-fopenmp"], verbose=bool(os.environ.get("TIDAL_VERBOSE")))
        except Exception as e:  # no compiler, no ninja, odd platform: the torch ops still work
            print(f"[tidal] CPU kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "using torch reference ops", file=sys.stderr)
            _ext = None
        return _ext
