"""Test-session setup: build the CPU kernels before any test runs, so a run never switches
from the torch ops to the compiled kernel half way (results must not depend on timing); a fixed
fake hardware profile; and a check that no test module leaves a process running."""
import os
import sys
import time

import pytest

os.environ.setdefault("TIDAL_CPU_KERNELS", "sync")
sys.path.insert(0, os.path.dirname(__file__))


def _install_fake_profile() -> None:
    """--policy auto needs this machine's hardware profile; tests use a fixed fake one
    (TIDAL_HARDWARE_PROFILE) instead of measuring, so they are fast and do not depend on the load."""
    import tempfile

    from fake_profiles import cpu_profile
    from tidal.plan.hardware import save_profile
    path = os.path.join(tempfile.mkdtemp(prefix="tidal-test-"), "hardware-cpu.json")
    save_profile(cpu_profile(), path)
    os.environ["TIDAL_HARDWARE_PROFILE"] = path


_install_fake_profile()


# Every process a test starts inherits this (tests pass {**os.environ, ...}), so one that outlives its
# parent and was adopted by init is still found; another engineer's pytest has another value.
_MARK = f"TIDAL_TEST_SESSION={os.getpid()}".encode()
os.environ["TIDAL_TEST_SESSION"] = str(os.getpid())
# The CPU kernels' builder runs detached on purpose and may outlive the test that started it.
_MAY_OUTLIVE_A_TEST = ("tidal.kernels.cpu.build",)


def _proc(pid: int) -> tuple[str, int, str, bytes]:
    """state, ppid, command line, environment of a process (OSError once it is gone)."""
    with open(f"/proc/{pid}/stat") as f:
        state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    with open(f"/proc/{pid}/environ", "rb") as f:
        return state, int(ppid), cmdline, f.read()


def _may_outlive(pid: int, cmdline: str, ppid: int) -> bool:
    """The kernel builder, or something it runs (ninja, the compiler)."""
    while True:
        if any(a in cmdline for a in _MAY_OUTLIVE_A_TEST):
            return True
        if ppid <= 1 or ppid == os.getpid():
            return False
        _, ppid, cmdline, _ = _proc(ppid)


def _live_children() -> dict[int, str]:
    """Processes this test session started, directly or not, that still run (a zombie has exited),
    except the kernel builder and what it runs: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            state, ppid, cmdline, environ = _proc(int(entry))
            ours = ppid == os.getpid() or _MARK in environ.split(b"\0")
            if ours and state not in ("Z", "X") and not _may_outlive(int(entry), cmdline, ppid):
                found[int(entry)] = cmdline
        except (OSError, ValueError):
            continue   # exited meanwhile
    return found


@pytest.fixture(scope="module", autouse=True)
def no_process_left_behind():
    """After each test module, no process a test started may still run (an engine process or a
    server left behind keeps gigabytes and, on a GPU, the device). Children get 10 s to exit."""
    yield
    if not os.path.isdir("/proc/self"):
        return   # not Linux: nothing to scan
    deadline = time.monotonic() + 10
    while (left := _live_children()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, "processes left running after this module's tests:\n" + "\n".join(
        f"  pid {pid}: {cmd[:300]}" for pid, cmd in left.items())


@pytest.fixture(autouse=True)
def _transformers_tokenizer_by_default():
    """`tidal chat` / `generate` switch GGUF checkpoints to the light tokenizer for their one-shot
    process (weights/loader.use_light_tokenizer); a test that runs them in-process must not leave the
    switch on for the tests after it."""
    yield
    from tidal.weights.loader import use_light_tokenizer
    use_light_tokenizer(False)


@pytest.fixture(scope="module")
def w8a8_ext():
    """The compiled CPU kernels, for tests of the w8a8 path (skipped where torch has no CPU int8 GEMM)."""
    from tidal.kernels import cpu, quant_ops
    e = cpu.load()
    assert e is not None, "the CPU kernels failed to build (see stderr)"
    if not quant_ops._has_int_mm():
        pytest.skip("this torch has no CPU int8 GEMM (torch._int_mm)")
    return e
