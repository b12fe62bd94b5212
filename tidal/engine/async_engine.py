"""The engine behind the server, in this process: an `EngineCore` driven by `EngineCoreLoop` in a thread.

Owns: `AsyncEngine` (frontend.py's `EngineFrontend` over a core loop in the `tidal-engine` thread; its
`from_config(..., process=True)` gives engine_proc's process-backed one instead) and the command
queue that carries adds and aborts into the thread. `EngineFrontend`, `RequestStream` and
`EngineUnavailable` live in frontend.py and stay importable from here.
Only the engine thread touches the core (it is not thread-safe); other threads talk to it through the
command queue and read the stats snapshot that comes with every step's outputs, so a busy engine
never blocks the event loop, /health or new connections. The outputs are turned into text in the
engine thread, right after the step (the process engine does it in the server process instead).
Must not: know about HTTP, JSON or tokenization of requests (the server owns those).
"""
from __future__ import annotations

import asyncio
import logging
import threading

from tidal.config import EngineConfig
from tidal.engine.core import EngineCore
from tidal.engine.core_io import Command, Shutdown
from tidal.engine.core_loop import EngineCoreLoop
from tidal.engine.frontend import EngineFrontend, EngineUnavailable, RequestStream
from tidal.errors import TidalError

logger = logging.getLogger("tidal.engine")


class AsyncEngine(EngineFrontend):
    def __init__(self, core: EngineCore, start: bool = True):
        """core: an EngineCore (an LLMEngine's is taken from it)."""
        self.core = core = getattr(core, "core", core)
        self._start_frontend(core.tokenizer, core.info(), core.config.seed)
        self._cond = threading.Condition()
        self._inbox: list[Command] = []
        self._stopping = False
        self._closed = False   # set by the engine thread as it exits; later commands are refused
        self._error: BaseException | None = None
        self._loop = EngineCoreLoop(core, self._on_core_outputs)
        self._thread = threading.Thread(target=self._run, name="tidal-engine", daemon=True)
        if start:
            self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, verbose: bool = False, process: bool = False) -> "EngineFrontend":
        """The engine in a thread of this process, or with process=True in its own process."""
        if process:
            from tidal.engine.engine_proc import ProcessAsyncEngine
            return ProcessAsyncEngine(config, verbose=verbose)
        return cls(EngineCore(config, verbose=verbose))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._closed

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; with drain, let in-flight ones finish, else abort them. Then stop
        the thread. Waits in a worker thread so the event loop keeps streaming the drained requests."""
        self._accepting = False
        self._send(Shutdown(drain))
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, timeout)

    def _send(self, command: Command) -> bool:
        with self._cond:
            died = self._thread.ident is not None and not self._thread.is_alive()   # started, then ended
            if self._closed or died:
                return False
            self._inbox.append(command)
            self._cond.notify()
            return True

    def _next_commands(self, timeout: float | None) -> list[Command]:
        with self._cond:
            if not self._inbox and timeout != 0:
                self._cond.wait_for(lambda: self._inbox, timeout)
            commands, self._inbox = self._inbox, []
            return commands

    def _run(self) -> None:
        reason = "the engine stopped"
        try:
            self._loop.run(self._next_commands)
        except BaseException as e:   # the thread itself is dying: no request may hang waiting on it
            self._error = e
            reason = f"the engine thread stopped: {type(e).__name__}: {e}"
            logger.exception("engine thread stopped")
        finally:
            with self._cond:
                self._closed = True
                self._inbox = []
            self._close_all(reason)


__all__ = ["AsyncEngine", "EngineFrontend", "RequestStream", "EngineUnavailable", "TidalError"]
