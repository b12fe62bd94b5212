"""The CPU-kernel build folder's lock: one builder at a time, and never stuck behind a dead one.

Owns: `builder.lock` in a build folder, an O_CREAT|O_EXCL file holding "<pid> <start time>" of the
builder process that compiles there; `try_acquire` takes it (or takes it over when its owner is
gone), `holder` says who has it, `release` drops it. Every torch build in the folder goes through
this lock first, so whoever holds it also owns torch's own `lock` file (torch's FileBaton, which
waits forever on a file a killed build left) and removes any it finds.
Must not: compile, spawn or wait; build.py does that.
"""
from __future__ import annotations

import contextlib
import os
import time

LOCK = "builder.lock"
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton
# A builder gives up after 15 min (build.BUILDER_LIFETIME_S), so a lock older than this is stale
# even when its pid is alive again: the pid was reused by an unrelated process.
STALE_LOCK_S = 20 * 60
_UNWRITTEN_S = 60  # a lock just created whose "<pid> <time>" is not written yet


def holder(folder: str) -> tuple[int, float] | None:
    """(pid, start time) of a live builder holding the folder's lock, or None when the lock is free
    or stale (its process is gone, or it is older than any builder lives)."""
    owner = _read(folder)
    if owner is None or time.time() - owner[1] > (STALE_LOCK_S if owner[0] else _UNWRITTEN_S):
        return None
    return owner if owner[0] == 0 or pid_alive(owner[0]) else None


def _read(folder: str) -> tuple[int, float] | None:
    path = os.path.join(folder, LOCK)
    try:
        with open(path) as f:
            text = f.read()
        mtime = os.path.getmtime(path)
    except OSError:
        return None
    try:
        return int(text.split()[0]), float(text.split()[1])
    except (ValueError, IndexError):  # created, "<pid> <time>" not yet written (pid 0): live for a moment
        return 0, mtime


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:  # a killed builder nobody has reaped yet still answers kill(0): a zombie is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def try_acquire(folder: str) -> tuple[int, float] | None:
    """Take the lock for this process. Returns None when taken, else the live holder's (pid, time).
    A stale lock is taken over, and torch's `lock` removed with it."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK)
    with _guard(folder):  # two takers of one stale lock must not both remove it and both build
        owner = holder(folder)
        if owner is not None:
            return owner
        stale = _read(folder)
        if stale is not None:
            print(f"[tidal] taking over the CPU-kernel build lock of pid {stale[0]} (that process is gone)",
                  flush=True)
            os.remove(path)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {time.time():.3f}\n")
    with contextlib.suppress(FileNotFoundError):  # left by a build killed mid-way: nobody else builds now
        os.remove(os.path.join(folder, TORCH_LOCK))
    return None


def release(folder: str) -> None:
    """Drop the lock if this process holds it (never someone else's that took over ours)."""
    path = os.path.join(folder, LOCK)
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(path) as f:
            if int(f.read().split()[0]) == os.getpid():
                os.remove(path)


@contextlib.contextmanager
def _guard(folder: str):
    """An flock around the check-and-take: the kernel drops it when its process dies, so it is never stale."""
    try:
        import fcntl
    except ImportError:  # not POSIX: O_EXCL alone
        yield
        return
    with open(os.path.join(folder, "builder.guard"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
