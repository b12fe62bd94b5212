"""Building the CPU kernels in a detached process, and waiting for that build without ever hanging.

Owns: the build folder (one per source version, flags, torch, CPU, venv and clone:
$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions, then tidal_cpu_kernels_<hash>), the builder
process (`python -m tidal.kernels.cpu.build FOLDER`: its own session, stdin closed, output in
FOLDER/builder.log, gone after BUILDER_LIFETIME_S at most), and `ensure_built`, which starts a
builder when none runs and waits for it: visibly when asked, and never past its timeout. A process
that exits or is killed mid-build leaves the build running; a killed builder leaves a stale lock
that the next one takes over (build_lock.py). FOLDER/built marks a finished build, FOLDER/build-failed
holds the last failure's one-line reason.
Must not: import the built module into the serving process (cpu/__init__.py does that), or run
torch's build in a folder without holding its lock.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
import time

from tidal.kernels.cpu import build_lock

HERE = os.path.dirname(os.path.abspath(__file__))
# paged_decode_quant.cpp registers torch.ops.tidal_kv.paged_decode_quant (quantized KV caches);
# fused_ops.cpp: SiLU-and-mul, rotary; rms_norm.cpp: RMSNorm+residual; int4_linear.cpp: int4 GEMV and
# dequantize; decode_stack.cpp: a decoder stack's decode step; w8a8_linear.cpp: int8 x int8 batches;
# rows_gemv.cpp: fp32-math GEMVs on per-row int8 and bf16 weights;
# kv_quant_ops.cpp: the quantized KV cache's writes and block dequantization (all bound in bindings.cpp)
SOURCES = ("bindings.cpp", "paged_decode.cpp", "paged_decode_quant.cpp", "fused_ops.cpp", "rms_norm.cpp", "prefill_bf16.cpp",
           "int4_linear.cpp", "decode_stack.cpp", "w8a8_linear.cpp", "rows_gemv.cpp", "kv_quant_ops.cpp")
HEADERS = ("fused_ops.h", "cpu_common.h", "avx512_common.h", "int4_linear.h", "paged_decode_bf16.h", "paged_decode_int8.h")
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
LDFLAGS = ["-fopenmp"]
LOG, BUILT, FAILED = "builder.log", "built", "build-failed"
BUILDER_LIFETIME_S = 15 * 60  # a build takes 1-2 min; a builder still going after this gives up
WAIT_S = 10 * 60  # how long a waiter (sync mode, tidal bench, tests) waits before using the torch ops
_LOST_RACE = 3  # the builder's exit status when another builder already holds the lock
_giving_up = threading.Event()  # the builder's watchdog stops the build


class BuildError(Exception):
    """The kernels cannot be built or loaded here; the message is one line that says why."""


def build_dir(prefix: str | None = None, src_dir: str | None = None) -> str:
    """The build folder for these sources under this venv (`prefix`) and clone (`src_dir`): ninja's
    build file holds both paths, so two venvs or clones sharing one folder would rebuild each other's."""
    import torch
    src_dir = os.path.realpath(src_dir or HERE)
    h = hashlib.sha1("\0".join(CFLAGS + LDFLAGS + [torch.__version__, sys.version, _cpu_signature(),
                                                    os.path.realpath(prefix or sys.prefix), src_dir]).encode())
    for f in SOURCES + HEADERS:
        with open(os.path.join(src_dir, f), "rb") as fh:
            h.update(fh.read())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or _default_build_root()
    return os.path.join(root, f"tidal_cpu_kernels_{h.hexdigest()[:10]}")


def _default_build_root() -> str:
    """torch.utils.cpp_extension.get_default_build_root()'s folder, from the function it calls: importing
    cpp_extension costs ~0.12 s, and a process whose build is already done (the common start) needs
    only this path."""
    try:
        from torch._appdirs import user_cache_dir
    except ImportError:   # a torch without it: ask cpp_extension itself
        from torch.utils.cpp_extension import get_default_build_root
        return get_default_build_root()
    return os.path.realpath(user_cache_dir(appname="torch_extensions"))


def _cpu_signature() -> str:
    """-march=native compiles for this CPU: a home folder shared with another CPU must not load it."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    import platform
    return platform.machine() + platform.processor()


def built(folder: str) -> str | None:
    """The finished build's shared library in `folder`, or None."""
    so = os.path.join(folder, os.path.basename(folder) + ".so")
    return so if os.path.exists(os.path.join(folder, BUILT)) and os.path.exists(so) else None


def import_built(so_path: str):
    """Load a finished build (fast: no compiler, no ninja, no lock)."""
    import importlib.util

    import torch  # noqa: F401  (the library links against libtorch)
    spec = importlib.util.spec_from_file_location(os.path.basename(so_path)[:-3], so_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_built(folder: str | None = None, timeout: float = WAIT_S, say=None,
                 first_after: float = 3.0, every: float = 15.0) -> str:
    """The built library's path, starting a builder unless one runs, and waiting up to `timeout` s.
    `say(line)`, when given, hears what is waited for after `first_after` s and every `every` s.
    Raises BuildError when the build fails or the wait times out (the builder then keeps going)."""
    folder = folder or build_dir()
    start, next_say, ours, spawns, log = time.time(), time.time() + first_after, None, 0, os.path.join(folder, LOG)
    while True:
        so = built(folder)
        if so:
            return so
        rc = ours.poll() if ours is not None else None
        if rc not in (None, 0, _LOST_RACE):
            raise BuildError(_failure(folder, f"the builder exited with status {rc}"))
        owner = build_lock.holder(folder)
        if owner is None and (ours is None or rc is not None):  # nobody builds: start a builder
            if _failed_since(folder, start):  # another process's builder failed while we waited
                raise BuildError(_failure(folder, "the build failed"))
            if spawns == 3:
                raise BuildError(_failure(folder, "the builders keep stopping without finishing"))
            ours, spawns = _spawn(folder), spawns + 1
        waited = time.time() - start
        if waited > timeout:
            who = f"builder pid {owner[0]}" if owner else "the builder"
            raise BuildError(f"gave up waiting for the CPU kernels after {waited:.0f} s ({who} keeps "
                             f"going for up to {BUILDER_LIFETIME_S // 60} min; log: {log})")
        if say is not None and time.time() >= next_say:
            who = f"builder pid {owner[0]} is compiling" if owner else \
                f"builder pid {ours.pid if ours else '?'} is starting"
            say(f"[tidal] waiting for the CPU kernels: {who} ({waited:.0f} s so far; a first build takes 1-2 min "
                f"on an idle machine; giving up after {timeout:.0f} s); log: {log}")
            next_say = time.time() + every
        time.sleep(0.25)


def _failed_since(folder: str, t: float) -> bool:
    with contextlib.suppress(OSError):
        return os.path.getmtime(os.path.join(folder, FAILED)) >= t
    return False


def _failure(folder: str, default: str) -> str:
    try:
        with open(os.path.join(folder, FAILED)) as f:
            reason = f.read().strip() or default
    except OSError:
        reason = default
    return f"{reason} (log: {os.path.join(folder, LOG)})"


_spawned: dict[str, subprocess.Popen] = {}  # one builder per folder per process, shared by its threads
_spawn_lock = threading.Lock()


def _spawn(folder: str) -> subprocess.Popen:
    """Start a builder that outlives this process: its own session (no Ctrl-C, no kill of our group),
    stdin closed, output appended to the folder's log."""
    with _spawn_lock:
        p = _spawned.get(folder)
        if p is not None and p.poll() is None:
            return p
        os.makedirs(folder, exist_ok=True)
        root = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))  # `-m` must find this same tidal
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        with open(os.path.join(folder, LOG), "ab") as log:
            p = subprocess.Popen([sys.executable, "-m", "tidal.kernels.cpu.build", folder], cwd=root, env=env,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, close_fds=True)
        _spawned[folder] = p
        threading.Thread(target=p.wait, name="tidal-cpu-builder-reaper", daemon=True).start()  # no zombie
        return p


def main(argv: list[str]) -> int:
    """The builder: take the folder's lock (or leave it to the builder holding it), compile with
    torch's cpp_extension, mark the folder built, release, exit."""
    folder = argv[0]
    lifetime = float(argv[argv.index("--lifetime") + 1]) if "--lifetime" in argv else BUILDER_LIFETIME_S
    print(f"[tidal] builder pid {os.getpid()} started {time.ctime()}", flush=True)
    threading.Thread(target=_give_up_after, args=(folder, lifetime), daemon=True).start()
    owner = build_lock.try_acquire(folder)
    if owner is not None:
        print(f"[tidal] builder pid {owner[0]} is building here already; exiting", flush=True)
        return _LOST_RACE
    try:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, FAILED))
        expected = build_dir()
        if os.path.realpath(expected) != os.path.realpath(folder):
            raise BuildError(f"{folder} is not this environment's build folder ({expected})")
        from torch.utils.cpp_extension import load
        load(name=os.path.basename(folder), sources=[os.path.join(HERE, f) for f in SOURCES], extra_cflags=CFLAGS,
             extra_ldflags=LDFLAGS, build_directory=folder, verbose=True)
        _write(os.path.join(folder, BUILT), f"{time.ctime()}\n")
        print(f"[tidal] builder pid {os.getpid()} done {time.ctime()}", flush=True)
        return 0
    except Exception as e:  # no compiler, no ninja, a compile error: say why in one line
        if _giving_up.is_set():  # the compile died because the watchdog stops it: that one says why, and exits
            time.sleep(BUILDER_LIFETIME_S)
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        print(f"[tidal] build failed: {reason}", flush=True)
        _write(os.path.join(folder, FAILED), reason + "\n")
        return 1
    finally:
        build_lock.release(folder)


def _give_up_after(folder: str, lifetime: float) -> None:
    """A builder never lingers: past its lifetime it stops, and its compilers with it."""
    time.sleep(lifetime)
    _giving_up.set()
    print(f"[tidal] builder pid {os.getpid()} gave up after {lifetime:.0f} s", flush=True)
    if os.getsid(0) == os.getpid():  # started by _spawn: the session holds nothing but this build
        import signal
        for _ in range(50):  # ninja may start another compiler while we stop the others
            if not session_members(os.getpid()):
                break
            for pid in session_members(os.getpid()):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
    _write(os.path.join(folder, FAILED), f"the build took longer than {lifetime:.0f} s and was stopped\n")
    build_lock.release(folder)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, build_lock.TORCH_LOCK))
    os._exit(4)


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` but this one: ninja runs each compiler in a process group of
    its own, so only the session (which _spawn made new) still ties them to their builder."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat") as f:
                state, _ppid, _pgrp, session = f.read().rsplit(")", 1)[1].split()[:4]
            if int(session) == sid and int(entry) != os.getpid() and state != "Z":
                pids.append(int(entry))
    return pids


def _write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
