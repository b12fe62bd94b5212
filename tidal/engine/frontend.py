"""What the server talks to: the engine interface, independent of where the engine runs.

Owns: `EngineFrontend` (add_request / generate / abort / stats, over two hooks a subclass fills:
`_submit` carries a command to the engine, `is_running` says whether it runs), `RequestStream`
(one request's outputs, handed back to the asyncio loop that asked for them), `EngineUnavailable`,
and the helpers an engine-side thread uses to reach a loop (`_call`, `_resolve`, `_deliver`).
Must not: run or own an engine (async_engine.py runs it in a thread, engine_proc.py in a
process); know about HTTP, JSON or tokenization of requests.
"""
from __future__ import annotations

import abc
import asyncio
from typing import AsyncIterator

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
            self._engine._submit(("abort", self.request_id))


class EngineFrontend(abc.ABC):
    """What the server calls: add_request / generate / abort / stats. Subclasses carry commands to
    the engine (`_submit`) and say whether it runs (`is_running`): a thread in async_engine.py, a
    process in engine_proc.py."""

    tokenizer = None
    max_model_len: int
    kv_capacity_tokens: int
    vocab_size: int | None = None
    default_sampling: dict = {}   # the model's generation-config defaults (LLMEngine.default_sampling)
    _accepting = True
    _stats: dict

    @property
    @abc.abstractmethod
    def is_running(self) -> bool: ...

    @abc.abstractmethod
    def _submit(self, command: tuple) -> None: ...

    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          priority: int = 0) -> RequestStream:
        """Queue a request and wait until the engine has admitted it. Raises TidalError for a request
        the engine rejects (prompt too long, ...) and EngineUnavailable when it is shutting down."""
        if not self._accepting or not self.is_running:
            raise EngineUnavailable("the engine is shutting down or has stopped; retry on another replica")
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id, loop)
        admitted = loop.create_future()
        self._submit(("add", stream, admitted, list(prompt_token_ids), params, priority))
        try:
            await admitted
        except asyncio.CancelledError:
            # The caller went away between queueing and admission: make sure nothing keeps running.
            stream.abort()
            raise
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
        self._submit(("abort", request_id))

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


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():   # the waiter was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _deliver(items: list) -> None:
    for stream, item in items:
        stream._put(item)
