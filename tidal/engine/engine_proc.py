"""The engine in its own process: `tidal serve --engine-process`.

Owns: `ProcessAsyncEngine`, an `EngineFrontend` that starts a child (`python -m tidal.engine.engine_core`,
which runs the `EngineCore` under the same `EngineCoreLoop` as the thread engine, so HTTP, JSON,
tokenization and detokenization in the server process never compete with it for a GIL), sends it
commands and turns what comes back into text and streams (frontend.py's output processing, in the
`tidal-engine-recv` thread). Parent -> child: a PUSH socket of msgpack commands (core_io.py:
AddRequests, AbortRequests, Shutdown); child -> parent: a PUSH socket carrying one `EngineCoreOutputs`
per step, new token ids only.
Lifecycle: the child runs in its own session (group signals reach only this process, which drains
the child with the shutdown command) and dies with this process (engine_core's `Lifeline`). No send
here blocks: a dead child fails the requests in flight with EngineUnavailable saying so.
Must not: know about HTTP; decide anything the core decides.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import fields

import zmq

from tidal.config import EngineConfig
from tidal.engine.core_io import (Command, EngineCoreOutputs, Fatal, Ready, Shutdown, Stopped, encoder,
                                  reply_decoder)
from tidal.engine.frontend import EngineFrontend
from tidal.errors import TidalError

logger = logging.getLogger("tidal.engine")


class ProcessAsyncEngine(EngineFrontend):
    def __init__(self, config: EngineConfig, verbose: bool = False, startup_timeout: float = 1800.0):
        self._dir = tempfile.mkdtemp(prefix="tidal-engine-")
        cmd_addr, out_addr = f"ipc://{self._dir}/cmd", f"ipc://{self._dir}/out"
        self._ctx = zmq.Context()
        self._cmd, self._out = self._ctx.socket(zmq.PUSH), self._ctx.socket(zmq.PULL)
        self._cmd.setsockopt(zmq.SNDHWM, 0)   # commands queue while the child steps; sends never wait
        self._cmd.bind(cmd_addr)
        self._out.bind(out_addr)
        self._send_lock = threading.Lock()   # zmq sockets are not thread-safe; requests come from any loop
        self._alive, self._stopping = False, False
        kwargs = {f.name: getattr(config, f.name) for f in fields(config)}
        # A fresh interpreter (`python -m`), not multiprocessing: spawn would re-import the caller's
        # __main__, which breaks any script without an `if __name__ == "__main__"` guard.
        # The parent-death signal fires when the *thread* that started the child exits, so it is asked
        # for only from the main thread; elsewhere the child's watchdog alone notices our death.
        flags = ("v" if verbose else "") + ("p" if threading.current_thread() is threading.main_thread() else "")
        self._proc = subprocess.Popen([sys.executable, "-m", "tidal.engine.engine_core", str(os.getpid()), self._dir,
                                       flags, json.dumps(kwargs)], start_new_session=True)
        try:
            info = self._await_ready(startup_timeout)
            self._start_frontend(_load_tokenizer(config), info, config.seed)
        except BaseException:
            self._kill()
            raise
        self._alive = True
        self._receiver = threading.Thread(target=self._receive, name="tidal-engine-recv", daemon=True)
        self._receiver.start()

    def _await_ready(self, timeout: float):
        waited = 0.0
        while not self._out.poll(1000):
            waited += 1.0
            if self._proc.poll() is not None or waited > timeout:
                raise RuntimeError(f"the engine process did not start (exit code {self._proc.poll()})")
        m = reply_decoder.decode(self._out.recv())
        if isinstance(m, Fatal):
            raise TidalError(m.message, param=m.param) if m.user_error else RuntimeError(m.message)
        if not isinstance(m, Ready):
            raise RuntimeError(f"the engine process sent {type(m).__name__} before it was ready")
        return m.info

    @property
    def is_running(self) -> bool:
        return self._alive and self._proc.poll() is None

    def _send(self, command: Command) -> bool:
        """False when the child is not connected (it died) or the socket is closed (shutdown)."""
        with self._send_lock:
            for attempt in range(2):
                try:
                    self._cmd.send(encoder.encode(command), zmq.NOBLOCK)
                    return True
                except zmq.Again:   # no peer: the child died, or (once) its connection is still being made
                    if attempt or self._proc.poll() is not None:
                        return False
                    self._cmd.poll(1000, zmq.POLLOUT)
                except zmq.ZMQError:
                    return False
        return False

    def _receive(self) -> None:
        reason = "the engine stopped"
        try:
            while True:
                if not self._out.poll(1000):
                    if self._proc.poll() is not None:
                        reason = f"the engine process died (exit code {self._proc.returncode}); its log says why"
                        logger.error(reason)
                        return
                    continue
                m = reply_decoder.decode(self._out.recv())
                if isinstance(m, Stopped):
                    if not self._stopping:
                        reason = "the engine process stopped on its own (it was sent SIGTERM)"
                        logger.error(reason)
                    return
                if isinstance(m, EngineCoreOutputs):
                    self._on_core_outputs(m)
        finally:
            self._alive = False
            self._close_all(reason)

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        import asyncio
        self._accepting, self._stopping = False, True
        if self.is_running:
            self._send(Shutdown(drain))
        await asyncio.to_thread(self._receiver.join, timeout)
        try:
            await asyncio.to_thread(self._proc.wait, 10)
        except subprocess.TimeoutExpired:
            pass
        self._kill()

    def _kill(self) -> None:
        """SIGTERM first (the child aborts, removes the IPC folder and exits within seconds), then SIGKILL."""
        for signal_child, wait in ((self._proc.terminate, 3), (self._proc.kill, 5)):
            if self._proc.poll() is None:
                signal_child()
                try:
                    self._proc.wait(wait)
                except subprocess.TimeoutExpired:
                    pass
        with self._send_lock:
            self._cmd.close(linger=0)
        self._out.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)


def _load_tokenizer(config: EngineConfig):
    """The same tokenizer the engine core loads, for the server's tokenization and detokenization."""
    from tidal.weights.loader import open_checkpoint
    return open_checkpoint(config.model, require_weights=False).load_tokenizer(config.tokenizer)
