"""What the server talks to: the engine interface, independent of where the engine core runs.

Owns: `EngineFrontend` (add_request / generate / abort / stats): it checks and fans out each request
(input_processor.py) in the caller's thread, carries commands to the core over one hook a subclass
fills (`_send`: a queue to a thread in async_engine.py, a socket to a process in engine_proc.py), and
turns the core's outputs (new token ids) into `RequestOutput`s with text and stop strings
(output_processor.py) in whichever thread receives them (`_on_core_outputs`), handing each to the
asyncio loop that asked. Also `RequestStream` (one request's outputs) and `EngineUnavailable`.
Thread-safety: requests come from any event loop and outputs from the receiving thread; `_lock`
guards the output processor and the streams.
Must not: run or own the core; know about HTTP, JSON or tokenization of requests.
"""
from __future__ import annotations

import abc
import asyncio
import threading
from typing import AsyncIterator

import msgspec

from tidal.engine.core_io import AbortRequests, AddRequests, Command, CoreInfo, CoreStats, EngineCoreOutputs
from tidal.engine.input_processor import InputProcessor
from tidal.engine.output_processor import OutputProcessor
from tidal.errors import TidalError
from tidal.outputs import RequestOutput
from tidal.sampling import SamplingParams


class EngineUnavailable(RuntimeError):
    """The engine is shutting down or its thread died; the request was not (or no longer is) served."""


class RequestStream:
    """Outputs of one request, in step order, for the asyncio loop that added it. Iterating ends
    after the output with `finished=True`; an engine failure is raised from `__anext__`."""

    def __init__(self, engine: "EngineFrontend", request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.finished = False
        self._engine = engine
        self._queue: asyncio.Queue = asyncio.Queue()

    def _put(self, item) -> None:   # runs on self.loop
        self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Stop the request (its KV blocks return to the pool); a no-op once it has finished."""
        if not self.finished:
            self.finished = True
            self._engine._abort(self.request_id)


class EngineFrontend(abc.ABC):
    """What the server calls. A subclass calls `_start_frontend` once the core is up, carries commands to
    it (`_send`), says whether it runs (`is_running`), and calls `_on_core_outputs` with what the core
    emits and `_close_all` when it is gone."""

    tokenizer = None
    max_model_len: int
    kv_capacity_tokens: int
    vocab_size: int | None = None
    default_sampling: dict = {}   # the model's generation-config defaults (EngineCore.default_sampling)
    _accepting = True

    def _start_frontend(self, tokenizer, info: CoreInfo, seed: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len, self.vocab_size = info.max_model_len, info.vocab_size
        self.kv_capacity_tokens = info.kv_capacity_tokens
        self.default_sampling = dict(info.default_sampling)
        self._inputs = InputProcessor(tokenizer, info, seed)
        self._outputs = OutputProcessor(tokenizer)
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._closed_reason: str | None = None
        self._set_stats(info.stats)

    @property
    @abc.abstractmethod
    def is_running(self) -> bool: ...

    @abc.abstractmethod
    def _send(self, command: Command) -> bool:
        """Carry a command to the core; False when it can no longer take one (stopped or dead)."""

    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          priority: int = 0) -> RequestStream:
        """Check the request and queue it. Raises TidalError for a request the engine cannot serve (prompt
        too long, a bad schema, ...) and EngineUnavailable when it is shutting down."""
        if not self._accepting or not self.is_running:
            raise EngineUnavailable("the engine is shutting down or has stopped; retry on another replica")
        params, children = self._inputs.process(request_id, prompt_token_ids, params, priority)
        stream = RequestStream(self, request_id, asyncio.get_running_loop())
        with self._lock:
            if self._closed_reason is not None:
                raise EngineUnavailable(self._closed_reason)
            if request_id in self._streams:
                raise TidalError(f"request id '{request_id}' is already in use", param="request_id")
            self._outputs.add(request_id, None, prompt_token_ids, params, children[0].arrival_time)
            self._streams[request_id] = stream
        if not self._send(AddRequests(children)):
            with self._lock:
                self._outputs.abort(request_id)
                self._streams.pop(request_id, None)
            raise EngineUnavailable("the engine stopped")
        return stream

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        stream = await self.add_request(request_id, prompt_token_ids, params, priority)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()   # closed or cancelled early: free the request's blocks now

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        with self._lock:
            out, running = self._outputs.abort(request_id)
            stream = self._streams.pop(request_id, None)
        if running:
            self._send(AbortRequests(running))
        if stream is not None and out is not None:
            _call(stream.loop, _deliver, [(stream, out)])

    def _on_core_outputs(self, outs: EngineCoreOutputs) -> None:
        """One step's outputs from the core (the receiving thread): text, stop strings, then to each loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        drop: list[str] = []
        with self._lock:
            results, stopped = self._outputs.process(outs.outputs)
            for out in results:
                stream = self._streams.pop(out.request_id) if out.finished else self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, out))
            for core_id, message in outs.failed.items():
                parent, siblings = self._outputs.fail(core_id)
                drop += siblings
                stream = self._streams.pop(parent, None) if parent is not None else None
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, RuntimeError(message)))
            self._set_stats(outs.stats)
        if stopped:
            self._send(AbortRequests(stopped, reason="stop"))
        if drop:
            self._send(AbortRequests(drop))
        for loop, items in by_loop.items():
            if not _call(loop, _deliver, items):   # that loop is gone: nobody reads these requests
                for stream, _ in items:
                    self._abort(stream.request_id)

    def _close_all(self, reason: str) -> None:
        """The core is gone: every request still waiting fails with EngineUnavailable(reason)."""
        with self._lock:
            self._accepting = False
            self._closed_reason = reason
            streams, self._streams = self._streams, {}
            for rid in streams:
                self._outputs.abort(rid)
        for stream in streams.values():
            _call(stream.loop, _deliver, [(stream, EngineUnavailable(reason))])

    def _set_stats(self, stats: CoreStats) -> None:
        self._stats = {**msgspec.structs.asdict(stats), "num_streams": len(self._streams)}

    def stats(self) -> dict:
        """Latest snapshot from the engine: num_running, num_waiting, kv (used, total, usage,
        prefix_queries, prefix_hits, hit_rate), counters (the engine's stats dict)."""
        return dict(self._stats)


def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:   # the loop is closed
        return False


def _deliver(items: list) -> None:
    for stream, item in items:
        stream._put(item)
