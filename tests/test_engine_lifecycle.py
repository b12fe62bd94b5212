"""The engine process (`ProcessAsyncEngine`'s child) lives no longer than its parent and stops on
its own SIGTERM: a parent killed with SIGKILL while the child starts or while it generates takes
the child with it within seconds, and the IPC folder goes too; a child sent SIGTERM (or killed)
exits, and the parent's stream fails with a clear error instead of hanging.

Each test runs a small parent script in a subprocess (so it can be killed with SIGKILL) that
builds a ProcessAsyncEngine on smollm2 with dummy weights and reports on stdout."""
import os
import signal
import subprocess
import sys

import pytest

from server_fixtures import wait_until

PARENT = r"""
import asyncio, sys, threading
from tidal.config import EngineConfig
from tidal.engine.engine_proc import ProcessAsyncEngine
from tidal.sampling import SamplingParams

def build(box):
    box.append(ProcessAsyncEngine(EngineConfig(model="smollm2", dtype="float32", load_format="dummy",
                                               max_model_len=4096, num_kv_blocks=300)))

async def main():
    box = []
    if sys.argv[1] == "thread":   # a thread that ends once the engine is built must not take the child with it
        t = threading.Thread(target=build, args=(box,))
        t.start()
        t.join()
    else:
        build(box)
    engine = box[0]
    print("ready", flush=True)
    n, reason = 0, None
    try:
        async for out in engine.generate("r0", list(range(1, 9)), SamplingParams(max_tokens=4000, ignore_eos=True)):
            n += 1
            if n == 2 and not out.finished:
                print("generating", flush=True)
            reason = out.outputs[0].finish_reason
        print(f"finished {reason}", flush=True)
    except Exception as e:
        print(f"error {type(e).__name__}: {e}", flush=True)
    await engine.shutdown(drain=False, timeout=10)
    print("shut down", flush=True)

asyncio.run(main())
"""


class Parent:
    """The parent script in a subprocess; its stdout and stderr go to a file the asserts quote."""

    def __init__(self, tmp_path, where: str = "main"):
        self.log_path = tmp_path / "parent.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "TIDAL_CPU_KERNELS": "0", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-c", PARENT, where], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-3000:]

    def child(self, timeout: float = 30) -> int:
        """The engine process: the parent's child running tidal.engine.engine_core."""
        found = []
        assert wait_until(lambda: found.extend(_engine_children(self.proc.pid)) or found, timeout=timeout,
                          interval=0.02), f"no engine process appeared\n{self.log()}"
        return found[0]

    def wait_for(self, line: str, timeout: float = 60) -> None:
        assert wait_until(lambda: line in self.log() or self.proc.poll() is not None, timeout=timeout, interval=0.05)
        assert line in self.log(), f"the parent never printed {line!r}\n{self.log()}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()


@pytest.fixture
def parent(tmp_path, request):
    p = Parent(tmp_path, getattr(request, "param", "main"))
    yield p
    p.close()


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()   # [state, ppid, ...]


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode(errors="replace").split("\0")


def _engine_children(ppid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        try:
            pid = int(entry) if entry.isdigit() else None
            if pid and int(_stat(pid)[1]) == ppid and "tidal.engine.engine_core" in _cmdline(pid):
                kids.append(pid)
        except (OSError, ValueError, IndexError):
            pass
    return kids


def _gone(pid: int) -> bool:
    try:
        return _stat(pid)[0] in ("Z", "X")   # an exited child that nobody reaped yet is gone too
    except OSError:
        return True


def _ipc_dir(pid: int) -> str:
    d = _cmdline(pid)[_cmdline(pid).index("tidal.engine.engine_core") + 2]
    assert os.path.basename(d).startswith("tidal-engine-") and os.path.isdir(d), d
    return d


def _has_torch(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch_cpu" in f.read()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.mark.parametrize("moment", ["interpreter start", "engine build"])
def test_child_dies_with_parent_killed_during_startup(parent, moment):
    child = parent.child()
    ipc = _ipc_dir(child)
    if moment == "engine build":   # torch is loaded: the child is in LLMEngine(...) or close to it
        assert wait_until(lambda: _has_torch(child), timeout=30, interval=0.05), parent.log()
    assert "ready" not in parent.log(), "too late: the engine was built already"
    parent.proc.kill()
    parent.proc.wait(10)
    assert wait_until(lambda: _gone(child), timeout=3, interval=0.05), f"the child outlived its parent\n{parent.log()}"
    assert wait_until(lambda: not os.path.exists(ipc), timeout=1), f"{ipc} was left behind\n{parent.log()}"


def test_child_dies_with_parent_killed_while_generating(parent):
    child = parent.child()
    ipc = _ipc_dir(child)
    parent.wait_for("generating")
    parent.proc.kill()
    parent.proc.wait(10)
    assert wait_until(lambda: _gone(child), timeout=3, interval=0.05), f"the child outlived its parent\n{parent.log()}"
    assert wait_until(lambda: not os.path.exists(ipc), timeout=1), f"{ipc} was left behind\n{parent.log()}"


@pytest.mark.parametrize("parent, sig, says", [
    ("thread", signal.SIGTERM, "finished abort"),
    ("main", signal.SIGKILL, "error EngineUnavailable: the engine process died (exit code -9)")],
    indirect=["parent"])
def test_child_signalled_ends_the_stream_and_exits(parent, sig, says):
    child = parent.child()
    ipc = _ipc_dir(child)
    parent.wait_for("generating")
    os.kill(child, sig)
    assert wait_until(lambda: _gone(child), timeout=5, interval=0.05), f"the child ignored {sig!r}\n{parent.log()}"
    parent.wait_for("shut down", timeout=20)   # the parent does not hang on a dead child
    log = parent.log()
    assert says in log, log   # SIGTERM: the child aborted the request and said so; SIGKILL: the parent noticed
    assert parent.proc.wait(10) == 0, log
    assert not os.path.exists(ipc), f"{ipc} was left behind\n{log}"


def test_leftover_process_check_sees_children():
    """conftest's end-of-module check: a running child is reported by its command line, and so is a
    grandchild adopted by init once its parent died; a builder started detached on purpose and
    what it runs are not, nor is an exited (even unreaped) child."""
    from conftest import _live_children
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    stray = subprocess.Popen(sleeper)
    spawn = f"import subprocess as s; print(s.Popen({sleeper!r}, stdout=s.DEVNULL, stderr=s.DEVNULL).pid)"
    orphan = int(subprocess.run([sys.executable, "-c", spawn], capture_output=True, text=True, timeout=30).stdout)
    builder = subprocess.Popen([*sleeper, "tidal.kernels.cpu.build"])
    try:
        assert wait_until(lambda: "time.sleep(30)" in _live_children().get(stray.pid, ""), timeout=5)
        assert wait_until(lambda: "time.sleep(30)" in _live_children().get(orphan, ""), timeout=5)
        assert builder.pid not in _live_children()
    finally:
        for p in (stray, builder):
            p.kill()
        os.kill(orphan, signal.SIGKILL)
    assert wait_until(lambda: _gone(stray.pid), timeout=5)
    assert stray.pid not in _live_children()   # a zombie until reaped: it no longer runs
    stray.wait()
    builder.wait()
