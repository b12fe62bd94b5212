"""The engine behind the server: `LLMEngine.step()` in a background thread, driven from asyncio.

Owns: `AsyncEngine` (frontend.py's `EngineFrontend` over an engine thread in this process; its
`from_config(..., process=True)` gives engine_proc's process-backed one instead) and the command
queue that carries adds and aborts into the thread. `EngineFrontend`, `RequestStream` and
`EngineUnavailable` live in frontend.py and stay importable from here.
Only the engine thread touches the `LLMEngine` (it is not thread-safe); other threads talk to it
through the command queue and read a stats snapshot the thread publishes after every step, so a
busy engine never blocks the event loop, /health or new connections.
Must not: know about HTTP, JSON or tokenization of requests (the server owns those).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

from tidal.config import EngineConfig
from tidal.engine.frontend import EngineFrontend, EngineUnavailable, RequestStream, _call, _deliver, _resolve
from tidal.engine.llm_engine import LLMEngine
from tidal.errors import TidalError
from tidal.outputs import RequestOutput

logger = logging.getLogger("tidal.engine")


class AsyncEngine(EngineFrontend):
    def __init__(self, engine: LLMEngine, start: bool = True):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        bm = engine.block_manager
        self.kv_capacity_tokens = bm.num_blocks * bm.block_size
        self.vocab_size = getattr(getattr(engine, "runner", None), "vocab_size", None)
        self.default_sampling = dict(getattr(engine, "default_sampling", {}))
        self._cond = threading.Condition()
        self._inbox: list[tuple] = []
        self._streams: dict[str, RequestStream] = {}   # engine thread only
        self._accepting = True
        self._stop = False
        self._drain = True
        self._closed = False   # set by the engine thread as it exits; later commands are rejected
        self._error: BaseException | None = None
        self._stats = self._snapshot(0.0)
        self._thread = threading.Thread(target=self._run, name="tidal-engine", daemon=True)
        if start:
            self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, verbose: bool = False, process: bool = False) -> "EngineFrontend":
        """The engine in a thread of this process, or with process=True in its own process."""
        if process:
            from tidal.engine.engine_proc import ProcessAsyncEngine
            return ProcessAsyncEngine(config, verbose=verbose)
        return cls(LLMEngine(config, verbose=verbose))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._error is None

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; with drain, let in-flight ones finish, else abort them. Then stop
        the thread. Waits in a worker thread so the event loop keeps streaming the drained requests."""
        self._accepting = False
        with self._cond:
            self._stop, self._drain = True, drain
            self._cond.notify()
        await asyncio.to_thread(self._thread.join, timeout)

    def _submit(self, command: tuple) -> None:
        with self._cond:
            if not self._closed:
                self._inbox.append(command)
                self._cond.notify()
                return
        self._reject(command)

    def _reject(self, command: tuple) -> None:
        if command[0] == "add":   # the thread is gone: answer the waiter here instead of never
            _call(command[1].loop, _resolve, command[2], EngineUnavailable("the engine stopped"))

    # ---- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._stop or self.engine.has_unfinished_requests()):
                        self._cond.wait()   # idle: sleep until a command arrives, no busy spin
                    commands, self._inbox = self._inbox, []
                    if self._stop and not self._drain:
                        commands += [("abort", rid) for rid in list(self._streams)]
                for command in commands:
                    self._apply(command)
                if self._stop and not self.engine.has_unfinished_requests():
                    break
                if self.engine.has_unfinished_requests():
                    t0 = time.perf_counter()
                    try:
                        outputs = self.engine.step()
                    except Exception as e:   # an engine bug: fail the requests in flight, keep serving
                        logger.exception("engine step failed; aborting the requests in flight")
                        self._fail_all(e)
                        outputs = []
                    self._dispatch(outputs)
                    self._stats = self._snapshot(time.perf_counter() - t0)
                else:
                    self._stats = self._snapshot(0.0)
        except BaseException as e:   # the thread itself is dying: no request may hang waiting on it
            self._error = e
            logger.exception("engine thread stopped")
        finally:
            self._accepting = False
            with self._cond:
                self._closed = True
                leftover, self._inbox = self._inbox, []
            for command in leftover:
                self._reject(command)
            self._fail_all(EngineUnavailable("the engine stopped"), abort=False)
            self._stats = self._snapshot(0.0)

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, stream, admitted, prompt_token_ids, params, priority = command
            try:
                self.engine.add_request(stream.request_id, None, params, prompt_token_ids=prompt_token_ids,
                                        priority=priority)
            except Exception as e:   # TidalError for a bad request; anything else is reported as is
                _call(stream.loop, _resolve, admitted, e)
                return
            self._streams[stream.request_id] = stream
            _call(stream.loop, _resolve, admitted, None)
        elif command[0] == "abort":
            out = self.engine.abort_request(command[1])
            if out is not None:
                self._dispatch([out])

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their loops: one call_soon_threadsafe per loop per step, not per output."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.pop(out.request_id) if out.finished else self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            if not _call(loop, _deliver, items):   # that loop is gone: nobody reads these requests
                for stream, out in items:
                    if not out.finished:
                        self.engine.abort_request(stream.request_id)
                        self._streams.pop(stream.request_id, None)

    def _fail_all(self, error: BaseException, abort: bool = True) -> None:
        streams, self._streams = self._streams, {}
        for rid, stream in streams.items():
            if abort:
                try:
                    self.engine.abort_request(rid)
                except Exception:
                    logger.exception("abort of %s failed", rid)
            _call(stream.loop, _deliver, [(stream, error)])

    def _snapshot(self, step_seconds: float) -> dict:
        e = self.engine
        return {"num_running": e.num_running, "num_waiting": e.num_waiting, "kv": e.kv_stats(),
                "counters": dict(e.stats), "num_streams": len(self._streams), "last_step_seconds": step_seconds}


__all__ = ["AsyncEngine", "EngineFrontend", "RequestStream", "EngineUnavailable", "TidalError"]
