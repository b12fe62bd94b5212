"""The engine in its own process, over ZeroMQ + msgspec (vLLM v1's split of API server and engine core).

Owns: `ProcessAsyncEngine` (the same interface as the thread-based `AsyncEngine`) and
`run_engine_core`, the child's loop. The child owns the `LLMEngine` and does nothing but
add / abort / step, so HTTP, JSON and tokenization in the server process never compete with it
for a GIL. Parent -> child: a PUSH socket of commands; child -> parent: a PUSH socket carrying
one message per step (all its outputs plus a stats snapshot). Messages are msgpack lists.
Must not: know about HTTP; decide anything the engine decides (admission errors come back from it).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import fields

import msgspec
import zmq

from tidal.config import EngineConfig
from tidal.engine.async_engine import EngineFrontend, EngineUnavailable, RequestStream, _call, _deliver, _resolve
from tidal.errors import TidalError
from tidal.outputs import RequestOutput
from tidal.sampling import SamplingParams

logger = logging.getLogger("tidal.engine")
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def _snapshot(engine) -> dict:
    return {"num_running": engine.num_running, "num_waiting": engine.num_waiting, "kv": engine.kv_stats(),
            "counters": dict(engine.stats), "num_streams": 0, "last_step_seconds": 0.0}


def run_engine_core(config_kwargs: dict, cmd_addr: str, out_addr: str, verbose: bool) -> None:
    """The child process. The parent controls its lifetime (shutdown command), so a Ctrl-C or a
    SIGTERM sent to the whole process group must not kill it in the middle of a drain."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from tidal.engine.llm_engine import LLMEngine
    ctx = zmq.Context()
    cmd, out = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    cmd.connect(cmd_addr)
    out.connect(out_addr)
    parent = os.getppid()
    try:
        engine = LLMEngine(EngineConfig(**config_kwargs), verbose=verbose)
    except Exception as e:   # noqa: BLE001 - reported to the parent, which raises it
        out.send(_enc.encode(["fatal", getattr(e, "message", str(e)), getattr(e, "param", None),
                              isinstance(e, TidalError)]))
        return
    bm = engine.block_manager
    out.send(_enc.encode(["ready", engine.max_model_len, bm.num_blocks * bm.block_size, engine.runner.vocab_size,
                          _snapshot(engine)]))
    stop = drain = False
    live: set[str] = set()   # requests added and not yet finished
    while True:
        busy = engine.has_unfinished_requests()
        if not cmd.poll(0 if busy else 1000):
            if not busy and os.getppid() != parent:   # the parent died without telling us
                break
        messages = []
        while True:
            try:
                messages.append(_dec.decode(cmd.recv(zmq.NOBLOCK)))
            except zmq.Again:
                break
        reply = []
        for m in messages:
            if m[0] == "add":
                _, rid, ids, params, priority = m
                try:
                    engine.add_request(rid, None, SamplingParams(**params), prompt_token_ids=ids, priority=priority)
                    live.add(rid)
                    reply.append(["added", rid])
                except Exception as e:   # noqa: BLE001 - the request's error, sent to its caller
                    reply.append(["rejected", rid, getattr(e, "message", str(e)), getattr(e, "param", None),
                                  isinstance(e, TidalError)])
            elif m[0] == "shutdown":
                stop, drain = True, m[1]
            for rid in ([m[1]] if m[0] == "abort" else list(live) if m[0] == "shutdown" and not drain else []):
                o = engine.abort_request(rid)
                live.discard(rid)
                if o is not None:
                    reply.append(["output", msgspec.to_builtins(o)])
        if engine.has_unfinished_requests():
            try:
                outputs = engine.step()
            except Exception as e:   # noqa: BLE001 - an engine bug: fail what is in flight, keep serving
                logger.exception("engine step failed")
                outputs = []
                for rid in list(live):
                    engine.abort_request(rid)
                    reply.append(["failed", rid, f"engine step failed: {type(e).__name__}: {e}"])
                live.clear()
            for o in outputs:
                if o.finished:
                    live.discard(o.request_id)
                reply.append(["output", msgspec.to_builtins(o)])
        if reply or messages:
            out.send(_enc.encode(["batch", reply, _snapshot(engine)]))
        if stop and not engine.has_unfinished_requests():
            break
    out.send(_enc.encode(["stopped"]))
    out.close(linger=2000)
    cmd.close(linger=0)
    ctx.term()


class ProcessAsyncEngine(EngineFrontend):
    def __init__(self, config: EngineConfig, verbose: bool = False, startup_timeout: float = 1800.0):
        self._dir = tempfile.mkdtemp(prefix="tidal-engine-")
        cmd_addr, out_addr = f"ipc://{self._dir}/cmd", f"ipc://{self._dir}/out"
        self._ctx = zmq.Context()
        self._cmd, self._out = self._ctx.socket(zmq.PUSH), self._ctx.socket(zmq.PULL)
        self._cmd.bind(cmd_addr)
        self._out.bind(out_addr)
        self._send_lock = threading.Lock()   # zmq sockets are not thread-safe; requests come from any loop
        self._lock = threading.Lock()        # guards _pending and _streams
        self._pending: dict[str, tuple[RequestStream, object]] = {}
        self._streams: dict[str, RequestStream] = {}
        self._accepting, self._alive = True, False
        kwargs = {f.name: getattr(config, f.name) for f in fields(config)}
        # A fresh interpreter (`python -m`), not multiprocessing: spawn would re-import the caller's
        # __main__, which breaks any script without an `if __name__ == "__main__"` guard.
        self._proc = subprocess.Popen([sys.executable, "-m", "tidal.engine.engine_proc", json.dumps(kwargs),
                                       cmd_addr, out_addr, "1" if verbose else "0"])
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
        _, self.max_model_len, self.kv_capacity_tokens, self.vocab_size, self._stats = m

    @property
    def is_running(self) -> bool:
        return self._alive and self._proc.poll() is None

    def _send(self, message: list) -> None:
        with self._send_lock:
            try:
                self._cmd.send(_enc.encode(message))
            except zmq.ZMQError:   # closed by shutdown meanwhile: the engine is gone anyway
                pass

    def _submit(self, command: tuple) -> None:
        if command[0] == "add":
            _, stream, admitted, ids, params, priority = command
            with self._lock:
                if not self._alive:
                    _call(stream.loop, _resolve, admitted, EngineUnavailable("the engine stopped"))
                    return
                self._pending[stream.request_id] = (stream, admitted)
            self._send(["add", stream.request_id, ids, msgspec.to_builtins(params), priority])
        elif command[0] == "abort" and self._alive:
            self._send(["abort", command[1]])

    def _receive(self) -> None:
        try:
            while True:
                if not self._out.poll(1000):
                    if self._proc.poll() is not None:
                        logger.error("the engine process died (exit code %s)", self._proc.returncode)
                        return
                    continue
                m = _dec.decode(self._out.recv())
                if m[0] == "stopped":
                    return
                _, replies, self._stats = m
                self._handle(replies)
        finally:
            self._close_all()

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

    def _close_all(self) -> None:
        with self._lock:
            self._alive = self._accepting = False
            pending, self._pending = self._pending, {}
            streams, self._streams = self._streams, {}
        for stream, admitted in pending.values():
            _call(stream.loop, _resolve, admitted, EngineUnavailable("the engine stopped"))
        for stream in streams.values():
            _call(stream.loop, _deliver, [(stream, EngineUnavailable("the engine stopped"))])

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        import asyncio
        self._accepting = False
        if self.is_running:
            self._send(["shutdown", drain])
        await asyncio.to_thread(self._receiver.join, timeout)
        try:
            await asyncio.to_thread(self._proc.wait, 10)
        except subprocess.TimeoutExpired:
            pass
        self._kill()

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
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


if __name__ == "__main__":
    run_engine_core(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1")
