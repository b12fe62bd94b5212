"""Building the CPU kernels (kernels/cpu/build.py, build_lock.py): a dead builder's lock is taken over,
a live one is waited for visibly and never forever, each venv and clone gets its own build folder, and
a build killed mid-way still ends in loaded kernels. The end-to-end tests run in a temporary
TORCH_EXTENSIONS_DIR seeded with this session's build (ninja then only relinks), never a full rebuild."""
import contextlib
import os
import shutil
import subprocess
import sys
import time

import pytest

from tidal.kernels.cpu import build, build_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the pid names no process now
    return p.pid


def _write_lock(folder, pid, started=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, build_lock.LOCK), "w") as f:
        f.write(f"{pid} {time.time() if started is None else started}\n")


def test_dead_builders_lock_is_taken_over_with_torchs(tmp_path):
    folder = str(tmp_path / "ext")
    _write_lock(folder, _dead_pid())
    open(os.path.join(folder, build_lock.TORCH_LOCK), "w").close()  # torch's FileBaton would wait on it forever
    assert build_lock.holder(folder) is None
    assert build_lock.try_acquire(folder) is None
    with open(os.path.join(folder, build_lock.LOCK)) as f:
        assert int(f.read().split()[0]) == os.getpid()
    assert not os.path.exists(os.path.join(folder, build_lock.TORCH_LOCK))
    assert build_lock.holder(folder)[0] == os.getpid()
    build_lock.release(folder)
    assert not os.path.exists(os.path.join(folder, build_lock.LOCK))


def test_live_lock_is_kept_unless_older_than_any_builder_lives(tmp_path):
    folder = str(tmp_path / "ext")
    _write_lock(folder, os.getppid())
    assert build_lock.try_acquire(folder)[0] == os.getppid()
    build_lock.release(folder)  # not ours: stays
    assert build_lock.holder(folder)[0] == os.getppid()
    _write_lock(folder, os.getppid(), started=time.time() - build_lock.STALE_LOCK_S - 1)  # a reused pid
    assert build_lock.holder(folder) is None
    assert build_lock.try_acquire(folder) is None


def test_waiter_on_a_live_builder_says_so_and_times_out(tmp_path):
    folder = str(tmp_path / "ext")
    _write_lock(folder, os.getppid())
    lines = []
    t0 = time.time()
    with pytest.raises(build.BuildError, match="gave up waiting"):
        build.ensure_built(folder, timeout=1.0, say=lines.append, first_after=0.2, every=0.3)
    assert time.time() - t0 < 5
    assert len(lines) >= 2 and all(f"builder pid {os.getppid()}" in ln for ln in lines)
    assert os.path.join(folder, build.LOG) in lines[0]
    assert not os.path.exists(os.path.join(folder, build.LOG)), "no second builder starts beside a live one"


def test_build_folder_per_venv_clone_and_source_version(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "root"))
    here = build.build_dir()
    assert here == build.build_dir() and here.startswith(str(tmp_path / "root") + os.sep)
    assert build.build_dir(prefix="/venvs/a") != build.build_dir(prefix="/venvs/b")
    clone = tmp_path / "clone"
    clone.mkdir()
    for f in build.SOURCES + build.HEADERS:
        shutil.copy(os.path.join(build.HERE, f), clone / f)
    assert build.build_dir(src_dir=str(clone)) not in (here, build.build_dir(prefix="/venvs/a"))
    other = build.build_dir(src_dir=str(clone))
    with open(clone / build.HEADERS[0], "a") as f:
        f.write("\n// edited\n")
    assert build.build_dir(src_dir=str(clone)) != other


@pytest.fixture
def half_built(tmp_path):
    """A copy of this session's build folder in a fresh TORCH_EXTENSIONS_DIR, as a builder killed
    while linking leaves it: objects compiled, no library, no `built` mark."""
    session = os.path.dirname(build.ensure_built(say=print))
    root = tmp_path / "torch_extensions"
    folder = root / os.path.basename(session)
    shutil.copytree(session, folder, ignore=shutil.ignore_patterns(
        "*.so", build.BUILT, build.LOG, build.FAILED, build_lock.LOCK, build_lock.TORCH_LOCK, "*.tmp"))
    return str(root), str(folder)


def _python(code: str, root: str, timeout: float, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": root, **env})


def _wait_gone(pid: int, seconds: float = 10) -> bool:
    end = time.time() + seconds
    while time.time() < end and build_lock.pid_alive(pid):
        time.sleep(0.1)
    return not build_lock.pid_alive(pid)


def test_load_after_a_builder_was_killed_mid_build(half_built):
    root, folder = half_built
    dead = _dead_pid()
    _write_lock(folder, dead)
    open(os.path.join(folder, build_lock.TORCH_LOCK), "w").close()
    out = _python("from tidal.kernels import cpu; m = cpu.load(timeout=150); print('LOADED', m.__file__)",
                  root, timeout=180)
    assert out.returncode == 0, out.stderr
    assert f"LOADED {folder}" in out.stdout, out.stderr
    with open(os.path.join(folder, build.LOG)) as f:
        log = f.read()
    assert f"taking over the CPU-kernel build lock of pid {dead}" in log
    assert not os.path.exists(os.path.join(folder, build_lock.LOCK))
    builder = int(log.split("builder pid ")[1].split()[0])
    assert _wait_gone(builder), "the builder must exit once done"


def test_background_serves_torch_ops_then_switches(half_built):
    root, folder = half_built
    code = ("import time; from tidal.kernels import cpu; cpu.load_in_background(); print('AT_ONCE', cpu.ready())\n"
            "end = time.time() + 150\n"
            "while cpu.ready() is None and time.time() < end: time.sleep(0.1)\n"
            "print('LATER', cpu.ready().__file__)\n"
            "time.sleep(2)\n"  # the builder exits right after its `built` mark; it must not stay a zombie here
            "import os\n"
            "try: print('LEFT', os.waitpid(-1, os.WNOHANG))\n"  # (0, 0): still running, (pid, _): a zombie
            "except ChildProcessError: print('LEFT none')")
    out = _python(code, root, timeout=180)
    assert "AT_ONCE None" in out.stdout, out.stderr
    assert f"LATER {folder}" in out.stdout, out.stderr
    assert "LEFT none" in out.stdout, out.stdout + out.stderr


def test_builder_gives_up_after_its_lifetime_with_its_compilers(half_built):
    root, folder = half_built
    for f in os.listdir(folder):
        if f.endswith(".o"):
            os.remove(os.path.join(folder, f))  # a full compile: far longer than the lifetime below
    p = subprocess.Popen([sys.executable, "-m", "tidal.kernels.cpu.build", folder, "--lifetime", "3"], cwd=ROOT,
                         env={**os.environ, "TORCH_EXTENSIONS_DIR": root}, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen, end = set(), time.time() + 60
    while p.poll() is None and time.time() < end:  # what its session runs: it must have started compiling
        for pid in build.session_members(p.pid):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/comm") as f:
                    seen.add(f.read().strip())
        time.sleep(0.05)
    assert p.wait(timeout=5) != 0
    assert "ninja" in seen and seen & {"cc1plus", "c++", "sh"}, seen
    with open(os.path.join(folder, build.FAILED)) as f:
        assert "longer than 3 s" in f.read()
    assert build_lock.holder(folder) is None and not os.path.exists(os.path.join(folder, build_lock.LOCK))
    end = time.time() + 10  # nothing of its session (ninja, the compilers in their own groups) is left
    while build.session_members(p.pid) and time.time() < end:
        time.sleep(0.1)
    assert build.session_members(p.pid) == [], "the builder's compilers outlived it"


def test_no_ninja_falls_back_with_one_line(tmp_path):
    out = _python("from tidal.kernels import cpu; print(cpu.load(timeout=60))", str(tmp_path), timeout=90,
                  PATH=str(tmp_path / "nothing-here"))
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "CPU kernels unavailable" in ln]
    assert len(lines) == 1 and "Ninja is required" in lines[0], out.stderr


def test_bench_refuses_to_time_the_torch_ops_unless_told(monkeypatch):
    from tidal import TidalError
    from tidal.bench import _wait_for_cpu_kernels
    from tidal.kernels import cpu
    calls = []
    monkeypatch.setattr(cpu, "load", lambda *a, **k: calls.append(1))  # the build failed or timed out
    monkeypatch.setenv("TIDAL_CPU_KERNELS", "sync")
    with pytest.raises(TidalError, match="TIDAL_CPU_KERNELS=0"):
        _wait_for_cpu_kernels({"device": "cpu"})
    monkeypatch.setenv("TIDAL_CPU_KERNELS", "0")
    _wait_for_cpu_kernels({"device": "cpu"})
    assert len(calls) == 1
