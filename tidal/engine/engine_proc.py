"""The engine in its own process, over ZeroMQ + msgspec (vLLM v1's split of API server and engine core).

Owns: `ProcessAsyncEngine` (the same interface as the thread-based `AsyncEngine`): it starts the
child (`python -m tidal.engine.engine_core`, whose loop `run_engine_core` owns the `LLMEngine` and
does nothing but add / abort / step, so HTTP, JSON and tokenization in the server process never
compete with it for a GIL), sends it commands and hands what comes back to the waiting streams.
Parent -> child: a PUSH socket of commands; child -> parent: a PUSH socket carrying one message
per step (all its outputs plus a stats snapshot). Messages are msgpack lists.
Lifecycle: the child runs in its own session (group signals reach only this process, which drains
the child with the shutdown command) and dies with this process (engine_core's `Lifeline`). No send
here blocks: a dead child fails the requests in flight with EngineUnavailable saying so.
Must not: know about HTTP; decide anything the engine decides (admission errors come back from it).
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

import msgspec
import zmq

from tidal.config import EngineConfig
from tidal.engine.engine_core import _dec, _enc
from tidal.engine.frontend import EngineFrontend, EngineUnavailable, RequestStream, _call, _deliver, _resolve
from tidal.errors import TidalError
from tidal.outputs import RequestOutput

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
        self._lock = threading.Lock()        # guards _pending and _streams
        self._pending: dict[str, tuple[RequestStream, object]] = {}
        self._streams: dict[str, RequestStream] = {}
        self._accepting, self._alive, self._stopping = True, False, False
        kwargs = {f.name: getattr(config, f.name) for f in fields(config)}
        # A fresh interpreter (`python -m`), not multiprocessing: spawn would re-import the caller's
        # __main__, which breaks any script without an `if __name__ == "__main__"` guard.
        # The parent-death signal fires when the *thread* that started the child exits, so it is asked
        # for only from the main thread; elsewhere the child's watchdog alone notices our death.
        flags = ("v" if verbose else "") + ("p" if threading.current_thread() is threading.main_thread() else "")
        self._proc = subprocess.Popen([sys.executable, "-m", "tidal.engine.engine_core", str(os.getpid()), self._dir,
                                       flags, json.dumps(kwargs)], start_new_session=True)
        try:
            self._await_ready(startup_timeout)
            self.tokenizer = _load_tokenizer(config)
        except BaseException:
            self._kill()
            raise
        self._alive = True
        self._receiver = threading.Thread(target=self._receive, name="tidal-engine-recv", daemon=True)
        self._receiver.start()

    def _await_ready(self, timeout: float) -> None:
        waited = 0.0
        while not self._out.poll(1000):
            waited += 1.0
            if self._proc.poll() is not None or waited > timeout:
                raise RuntimeError(f"the engine process did not start (exit code {self._proc.poll()})")
        m = _dec.decode(self._out.recv())
        if m[0] == "fatal":
            raise TidalError(m[1], param=m[2]) if m[3] else RuntimeError(m[1])
        _, self.max_model_len, self.kv_capacity_tokens, self.vocab_size, self._stats, self.default_sampling = m

    @property
    def is_running(self) -> bool:
        return self._alive and self._proc.poll() is None

    def _send(self, message: list) -> bool:
        """False when the child is not connected (it died) or the socket is closed (shutdown)."""
        with self._send_lock:
            for attempt in range(2):
                try:
                    self._cmd.send(_enc.encode(message), zmq.NOBLOCK)
                    return True
                except zmq.Again:   # no peer: the child died, or (once) its connection is still being made
                    if attempt or self._proc.poll() is not None:
                        return False
                    self._cmd.poll(1000, zmq.POLLOUT)
                except zmq.ZMQError:
                    return False
        return False

    def _submit(self, command: tuple) -> None:
        if command[0] == "add":
            _, stream, admitted, ids, params, priority = command
            with self._lock:
                if not self._alive:
                    _call(stream.loop, _resolve, admitted, EngineUnavailable("the engine stopped"))
                    return
                self._pending[stream.request_id] = (stream, admitted)
            if not self._send(["add", stream.request_id, ids, msgspec.to_builtins(params), priority]):
                with self._lock:
                    gone = self._pending.pop(stream.request_id, None)
                if gone is not None:
                    _call(stream.loop, _resolve, admitted, EngineUnavailable("the engine process is not running"))
        elif command[0] == "abort" and self._alive:
            self._send(["abort", command[1]])

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
                m = _dec.decode(self._out.recv())
                if m[0] == "stopped":
                    if not self._stopping:
                        reason = "the engine process stopped on its own (it was sent SIGTERM)"
                        logger.error(reason)
                    return
                _, replies, self._stats = m
                self._handle(replies)
        finally:
            self._close_all(reason)

    def _handle(self, replies: list) -> None:
        by_loop: dict = {}
        with self._lock:
            for r in replies:
                if r[0] in ("added", "rejected"):
                    stream, admitted = self._pending.pop(r[1], (None, None))
                    if stream is None:
                        continue
                    if r[0] == "added":
                        self._streams[r[1]] = stream
                        _call(stream.loop, _resolve, admitted, None)
                    else:
                        err = TidalError(r[2], param=r[3]) if r[4] else RuntimeError(r[2])
                        _call(stream.loop, _resolve, admitted, err)
                    continue
                if r[0] == "failed":
                    stream, item = self._streams.pop(r[1], None), RuntimeError(r[2])
                else:
                    out = msgspec.convert(r[1], RequestOutput, strict=False)
                    rid = out.request_id
                    stream, item = (self._streams.pop(rid, None) if out.finished else self._streams.get(rid)), out
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            _call(loop, _deliver, items)

    def _close_all(self, reason: str) -> None:
        with self._lock:
            self._alive = self._accepting = False
            pending, self._pending = self._pending, {}
            streams, self._streams = self._streams, {}
        for stream, admitted in pending.values():
            _call(stream.loop, _resolve, admitted, EngineUnavailable(reason))
        for stream in streams.values():
            _call(stream.loop, _deliver, [(stream, EngineUnavailable(reason))])

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        import asyncio
        self._accepting, self._stopping = False, True
        if self.is_running:
            self._send(["shutdown", drain])
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
    """The same tokenizer the engine loads (LLMEngine's rule), for the server's tokenization."""
    if config.tokenizer:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(config.tokenizer)
    from tidal.weights.loader import open_checkpoint
    return open_checkpoint(config.model, require_weights=False).load_tokenizer()
