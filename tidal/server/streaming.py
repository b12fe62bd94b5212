"""Running a request's engine streams for an HTTP handler: admission, merged outputs, client departure, SSE.

Owns: `add_requests` (every prompt admitted or none), `iterate` (one or many prompts' outputs, merged in
arrival order, metrics recorded, every unfinished stream aborted when the consumer stops: disconnect,
cancellation, error, or `ServerContext.cut_streams`), `first_output` (a streamed response starts with
its first token, so an earlier failure is an HTTP error a gateway can retry), `until_disconnect`,
`sse` and `SSEResponse` (a streaming response that aborts its requests however the stream ends).
Must not: know the JSON shapes of chat or completion responses (serving_*.py own those) or map
request fields (common.py does).
"""
from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import StreamingResponse

from tidal.engine.async_engine import RequestStream
from tidal.sampling import SamplingParams
from tidal.server.context import ServerContext
from tidal.server.errors import APIError


async def add_requests(ctx: ServerContext, base_id: str, prompts: list[list[int]], params: SamplingParams,
                       priority: int) -> list[RequestStream]:
    """Admit every prompt or none: if one is rejected, the ones already added are aborted."""
    if ctx.shutdown_message is not None:
        raise ctx.shutdown_error()
    streams: list[RequestStream] = []
    try:
        for i, ids in enumerate(prompts):
            rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
            streams.append(await ctx.engine.add_request(rid, ids, params, priority))
    except BaseException:
        for s in streams:
            s.abort()
        raise
    return streams


async def iterate(ctx: ServerContext, streams: list[RequestStream],
                  arrival: float | None = None) -> AsyncIterator[tuple[int, object]]:
    """(prompt index, RequestOutput) as outputs arrive, over all streams; records metrics (latencies
    from `arrival`, the handler's start); aborts every unfinished stream when the consumer stops
    early (disconnect, cancellation, error) or `ctx.cut_streams` raises its 503 in here."""
    trackers = [ctx.metrics.tracker(arrival) for _ in streams]
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream):
        try:
            async for out in s:
                queue.put_nowait((i, out, None))
        except BaseException as e:   # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, e))
        finally:
            queue.put_nowait((i, None, StopAsyncIteration()))
    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    ctx.live.add(queue)
    try:
        if ctx.shutdown_message is not None:
            raise ctx.shutdown_error()
        remaining = len(streams)
        while remaining:
            i, out, err = await queue.get()
            if isinstance(err, StopAsyncIteration):
                remaining -= 1
            elif err is not None:
                raise err
            else:
                trackers[i].observe(out)
                yield i, out
    finally:
        ctx.live.discard(queue)
        for t in tasks:
            t.cancel()
        for s, t in zip(streams, trackers):
            if not s.finished:
                s.abort()
            t.finish(aborted=True)   # a no-op for requests whose final output was seen


async def first_output(ctx: ServerContext, streams: list[RequestStream], arrival: float, raw: Request):
    """`iterate` over the streams, once its first output is in. A streamed response starts (status 200,
    headers) only then: a request that fails before its first token gets an HTTP error rather than a 200
    with an error event, and a replica that dies before it is a reset a gateway can retry elsewhere
    (tidal gateway's Envoy retries once). The first event then goes out with the first token, which
    is when a client would have seen content anyway."""
    outputs = iterate(ctx, streams, arrival)
    try:
        first = await until_disconnect(raw, outputs.__anext__())
    except BaseException:
        await outputs.aclose()
        raise

    async def chained():
        async with aclosing(outputs):
            yield first
            async for item in outputs:
                yield item
    return chained()


async def until_disconnect(request: Request, coro):
    """Await coro, but cancel it (which aborts its engine requests) if the client goes away first."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except BaseException:   # noqa: BLE001 - the client is gone; there is nobody to tell
            pass
        raise APIError("the client closed the connection", status=499, code="client_closed_request")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class SSEResponse(StreamingResponse):
    """Server-sent events whose `on_close` runs however the response ends: completed, client gone
    (Starlette cancels the body iterator), or failed, so engine requests are never left running."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:   # runs the generator's own cleanup now, not at garbage collection
                try:
                    await close()
                except RuntimeError:   # already running or closed: its cleanup ran or is running
                    pass


__all__ = ["add_requests", "iterate", "first_output", "until_disconnect", "sse", "SSEResponse"]
