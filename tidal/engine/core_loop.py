"""The one loop that drives an `EngineCore`, in a thread (async_engine.py) or a child process (engine_core.py).

Owns: `EngineCoreLoop.run`: take the commands that arrived (add, abort, shutdown), step the core while
it has work, and emit one `EngineCoreOutputs` per step (new tokens only, plus a stats snapshot); sleep
without spinning while idle; fail what is in flight when a step raises (an engine bug) and keep
serving; on shutdown either drain or abort what runs. Where the commands come from and where the
outputs go are the caller's two callables, so the thread and the process differ only in transport.
Must not: know about asyncio, streams, text or sockets.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from tidal.engine.core_io import AbortRequests, AddRequests, Command, EngineCoreOutputs, Shutdown

logger = logging.getLogger("tidal.engine")


class EngineCoreLoop:
    def __init__(self, core, emit: Callable[[EngineCoreOutputs], None], stop: threading.Event | None = None):
        """core: an EngineCore (or anything with its add_requests / abort_requests / step /
        has_unfinished_requests / snapshot). emit: called from the loop's thread with each step's outputs.
        stop: set from outside (a signal, the parent's death) to abort everything and return."""
        self.core, self.emit, self.stop = core, emit, stop
        self.live: set[str] = set()   # core ids added and not yet finished

    def run(self, next_commands: Callable[[float | None], list[Command]], idle_timeout: float | None = None) -> None:
        """Loop until a Shutdown command has been carried out. `next_commands(timeout)` returns the commands
        that arrived, waiting up to `timeout` seconds (None: until one comes) when there are none yet;
        `idle_timeout` bounds that wait while idle, so `stop` is seen."""
        shutting_down = drain = False
        core = self.core
        while True:
            commands = next_commands(0 if core.has_unfinished_requests() else idle_timeout)
            if self.stop is not None and self.stop.is_set():
                commands.append(Shutdown(drain=False))
            outputs, failed = [], {}
            for c in commands:
                if isinstance(c, AddRequests):
                    core.add_requests(c.requests)
                    self.live.update(r.request_id for r in c.requests)
                elif isinstance(c, AbortRequests):
                    outputs += core.abort_requests(c.request_ids, c.reason)
                elif isinstance(c, Shutdown):
                    drain = c.drain if not shutting_down else drain and c.drain   # a later hard stop wins
                    shutting_down = True
            if shutting_down and not drain and self.live:
                outputs += core.abort_requests(sorted(self.live))
            if any(isinstance(c, AddRequests) for c in commands) and core.has_unfinished_requests():
                # new requests show in the stats (waiting) now, not after a step that may take seconds:
                # a gateway polling /metrics would otherwise send a burst here on a stale, idle picture
                self._emit(outputs, {}, 0.0)
                outputs = []
            seconds = 0.0
            if core.has_unfinished_requests():
                t0 = time.perf_counter()
                try:
                    outputs += core.step()
                except Exception as e:   # noqa: BLE001 - an engine bug: fail what is in flight, keep serving
                    logger.exception("engine step failed; failing the requests in flight")
                    message = f"engine step failed: {type(e).__name__}: {e}"
                    ids = sorted(self.live)
                    core.abort_requests(ids)
                    failed = dict.fromkeys(ids, message)
                seconds = time.perf_counter() - t0
            if outputs or commands or failed:
                self._emit(outputs, failed, seconds)
            if shutting_down and not core.has_unfinished_requests():
                return

    def _emit(self, outputs: list, failed: dict, seconds: float) -> None:
        for o in outputs:
            if o.finish_reason is not None:
                self.live.discard(o.request_id)
        self.live.difference_update(failed)
        self.emit(EngineCoreOutputs(outputs, self.core.snapshot(seconds), failed))
