"""The engine process's side of engine_proc.py: `python -m tidal.engine.engine_core` runs it.

Owns: `run_engine_core`, the child's side: it builds the `EngineCore` and runs the same
`EngineCoreLoop` the thread engine runs (core_loop.py), with ZeroMQ as its transport: commands come
in, and one msgpack `EngineCoreOutputs` per step (new token ids only, plus a stats snapshot) goes
back; text is made in the parent. `Lifeline`,
which ties the child's life to its parent's: the child dies with the parent at any moment
(start-up included), exits on its own SIGTERM, never blocks on a send, and removes the IPC folder.
Must not: know about HTTP or asyncio; decide anything the engine decides (a rejected request goes
back with the engine's own message); import torch before the Lifeline is in place.

Signals: the parent starts the child in its own session, so a Ctrl-C or a SIGTERM sent to the
server's process group reaches only the server, which drains the engine with the shutdown command.
A SIGTERM sent to the child itself (`kill <pid>`, a process manager) aborts what is in flight and
exits; SIGINT is ignored, since only a terminal sends it and the child is no longer in that
terminal's process group. Under systemd use KillMode=mixed, so the drain is the server's to run.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import shutil
import signal
import socket
import sys
import threading
import time

import zmq

from tidal.engine.core_io import Fatal, Stopped, command_decoder, encoder
from tidal.errors import TidalError

logger = logging.getLogger("tidal.engine")
WATCH_S = 0.25   # how often the watchdog looks at the parent where no death signal is set up (macOS)
GRACE_S = 1.5    # how long the loop gets to abort and report before the watchdog ends the process


class Lifeline:
    """Set up first thing in the child. A watchdog thread wakes on SIGTERM (the parent's death
    signal too) or sees the parent pid change; then `stop` is set and the loop aborts everything;
    if the loop does not finish within GRACE_S (or the engine is still being built, which cannot be
    interrupted) the watchdog removes the IPC folder and ends the process itself."""

    def __init__(self, parent_pid: int, ipc_dir: str, pdeathsig: bool):
        self.parent_pid, self.ipc_dir = parent_pid, ipc_dir
        self.stop = threading.Event()       # SIGTERM or the parent died: abort and exit
        self.orphaned = threading.Event()   # the parent died: nobody reads what we send
        self.state = "starting"             # then "serving" (the loop reacts to `stop`), then "done"
        self.out: zmq.Socket | None = None
        self._send_lock = threading.Lock()  # the watchdog's last message must not interleave the loop's
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # The handler itself runs only between bytecodes of the main thread, which may be busy for
        # seconds in torch; the wakeup fd is written by the C handler at once, and the watchdog reads it.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        if pdeathsig:
            _set_pdeathsig(signal.SIGTERM)
        # The parent may have died before the death signal was set: the watchdog looks first.
        threading.Thread(target=self._watch, name="tidal-engine-lifeline", daemon=True).start()

    def _parent_gone(self) -> bool:
        return os.getppid() != self.parent_pid

    def _watch(self) -> None:
        while not self._parent_gone():
            if not select.select([self._wake_r], [], [], WATCH_S)[0]:
                continue
            try:
                got = self._wake_r.recv(64)
            except BlockingIOError:
                continue
            if signal.SIGTERM in got:
                break
        # The death signal is a SIGTERM too. A parent with several threads sends it when the thread
        # that started us exits, and may still have a thread for a moment: keep looking at it.
        self._check_parent(0.1, until_orphaned=True)
        print(f"[tidal] engine process: {'the server process is gone' if self.orphaned.is_set() else 'got SIGTERM'};"
              " stopping", file=sys.stderr, flush=True)
        self.stop.set()
        if self.state == "serving":
            self._check_parent(GRACE_S)
            if self.state == "done":
                return
        msg = Stopped() if self.state != "starting" else Fatal("the engine process was stopped while starting")
        if not self.orphaned.is_set() and self._send_lock.acquire(timeout=0.3):
            try:
                if self.out is not None:
                    self.out.send(encoder.encode(msg), zmq.NOBLOCK)
                    time.sleep(0.1)   # let ZeroMQ's I/O thread write it
            except zmq.ZMQError:
                pass
        self.exit(1)

    def _check_parent(self, timeout: float, until_orphaned: bool = False) -> None:
        """For up to `timeout` seconds, or until the loop is done: set `orphaned` once the parent is gone."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.state != "done":
            if not self.orphaned.is_set() and self._parent_gone():
                self.orphaned.set()
            if until_orphaned and self.orphaned.is_set():
                return
            time.sleep(0.02)

    def send(self, message) -> bool:
        """Send to the parent without ever hanging: give up once the parent is gone, and after one
        second once `stop` is set (the parent may be alive but not reading)."""
        data, deadline = encoder.encode(message), None
        while not self.orphaned.is_set():
            if self.stop.is_set():
                deadline = deadline or time.monotonic() + 1.0
                if time.monotonic() > deadline:
                    return False
            with self._send_lock:
                try:
                    self.out.send(data, zmq.NOBLOCK)
                    return True
                except zmq.Again:
                    self.out.poll(100, zmq.POLLOUT)
        return False

    def exit(self, code: int) -> None:
        """Leave now: remove the IPC folder and skip the interpreter's teardown (torch's can be slow,
        and nothing is left to flush but stdio)."""
        if os.path.basename(self.ipc_dir).startswith("tidal-engine-"):
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _set_pdeathsig(sig: int) -> bool:
    """Linux's prctl(PR_SET_PDEATHSIG): the kernel signals us when the parent thread that started us
    exits (engine_proc.py asks for it only when that is the main thread)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0) == 0   # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def run_engine_core(config_kwargs: dict, ipc_dir: str, verbose: bool, life: Lifeline) -> int:
    """The child process. The parent controls its lifetime (shutdown command); `life` ends it early
    when the parent dies or the child itself gets SIGTERM. Returns the exit code."""
    from tidal.config import EngineConfig
    from tidal.engine.core import EngineCore
    from tidal.engine.core_io import Ready
    from tidal.engine.core_loop import EngineCoreLoop
    ctx = zmq.Context()
    cmd, out = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    cmd.connect(f"ipc://{ipc_dir}/cmd")
    out.connect(f"ipc://{ipc_dir}/out")
    life.out = out
    try:
        try:
            core = EngineCore(EngineConfig(**config_kwargs), verbose=verbose)
        except Exception as e:   # noqa: BLE001 - reported to the parent, which raises it
            life.send(Fatal(getattr(e, "message", str(e)), getattr(e, "param", None), isinstance(e, TidalError)))
            return 1
        life.state = "serving"
        life.send(Ready(core.info()))

        def next_commands(timeout: float | None) -> list:
            if timeout != 0:
                cmd.poll(-1 if timeout is None else int(timeout * 1000))
            commands = []
            while True:
                try:
                    commands.append(command_decoder.decode(cmd.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    return commands

        # while idle, wake four times a second to see `life.stop` (SIGTERM, or the parent gone)
        EngineCoreLoop(core, life.send, stop=life.stop).run(next_commands, idle_timeout=0.25)
        life.send(Stopped())
        return 0
    finally:
        with life._send_lock:
            out.close(linger=0 if life.orphaned.is_set() else 1000)
        cmd.close(linger=0)
        ctx.term()
        life.state = "done"


def main(argv: list[str]) -> None:
    """argv: parent pid, IPC folder, flags ("v": verbose, "p": set the parent-death signal), config JSON."""
    life, code = Lifeline(int(argv[0]), argv[1], pdeathsig="p" in argv[2]), 1
    try:
        code = run_engine_core(json.loads(argv[3]), argv[1], "v" in argv[2], life)
    except BaseException:   # noqa: BLE001 - still leave through life.exit, which removes the IPC folder
        logger.exception("the engine process failed")
    finally:
        life.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
