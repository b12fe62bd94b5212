"""CPU kernels compiled on first use (torch.utils.cpp_extension), with the torch reference as fallback.

Owns: loading the C++ extension in this folder into this process: `load()` waits for it (visibly,
at most build.WAIT_S), `load_in_background()` keeps the torch ops until a build finishes and then
switches, `ready()` says which is in use. The compiling itself happens in a detached builder
process (build.py), cached per source version and environment under
$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions; a killed `tidal chat` does not stop it.
A machine without ninja or a C++ compiler, or TIDAL_CPU_KERNELS=0, keeps the torch reference ops.
Must not: be imported on the hot path before `ready()` says the build worked; import build.py at
import time (`python -m tidal.kernels.cpu.build` runs it as __main__).
"""
from __future__ import annotations

import os
import sys
import threading

_ext = None
_settled = False  # loaded, or given up on: the answer stays for the life of the process
_state = threading.Lock()
_background: threading.Thread | None = None


def ready():
    """The compiled module if it is built and loaded already, else None (never blocks)."""
    return _ext


def load_in_background() -> None:
    """Serve with the torch ops while a builder compiles; a daemon thread loads the kernels once it is
    done (fast), so a cold `tidal chat` does not wait for the compiler. A finished build is loaded
    right here (no compiler involved, ~0.1 s), so the model built next can pick kernels that exist
    only in the extension (quant_ops' int4 GEMV)."""
    global _background
    from tidal.kernels.cpu import build
    if os.environ.get("TIDAL_CPU_KERNELS", "1") != "0" and not _settled and _background is None:
        try:
            done = build.built(build.build_dir())
        except OSError:
            done = None
        if done:
            _load(60, False)
            return
    with _state:
        if _settled or _background is not None:
            return
        _background = threading.Thread(target=_load, args=(build.BUILDER_LIFETIME_S + 60, False),
                                       name="tidal-cpu-kernels", daemon=True)
    _background.start()


def load(timeout: float | None = None):
    """The compiled module, or None when it cannot be built here or the build takes longer than
    `timeout` s (default build.WAIT_S); says what it waits for while another process builds."""
    if _settled:
        return _ext
    from tidal.kernels.cpu import build
    return _load(build.WAIT_S if timeout is None else timeout, True)


def _load(timeout: float, visible: bool):
    global _ext, _settled
    if os.environ.get("TIDAL_CPU_KERNELS", "1") == "0":
        _settled = True
        return None
    from tidal.kernels.cpu import build
    try:
        say = (lambda line: print(line, file=sys.stderr, flush=True)) if visible else None
        so = build.ensure_built(timeout=timeout, say=say)
        with _state:
            if not _settled:
                _ext, _settled = build.import_built(so), True
    except Exception as e:  # no compiler, no ninja, a build error or timeout: the torch ops still work
        with _state:
            if not _settled:
                _settled = True
                why = str(e) if isinstance(e, build.BuildError) else f"{type(e).__name__}: {e}"
                print(f"[tidal] CPU kernels unavailable ({(why.splitlines() or [''])[0][:300]}); "
                      "using torch reference ops", file=sys.stderr, flush=True)
    return _ext
