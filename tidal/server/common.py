"""What chat and completions share: request -> SamplingParams, the per-request limits, running
engine requests until done, until the client leaves or until the shutdown cut, and SSE.

Owns: `Prepared` (a request checked and tokenized: what serving_*.prepare_* hand to the engine,
the server's frontend or `tidal batch`'s LLMEngine alike), `usage`, `sampling_params` (with `structured_outputs`, the request's grammar constraint), `check_fits` / `check_num_seqs` (what a request may ask for), `add_requests`
and `iterate` (one or many prompts, merged in arrival order, aborted when the client goes away, the
handler is cancelled or `ServerContext.cut_streams` ends them), `first_output` (a stream's response
starts with its first token, so an earlier failure is an HTTP error a gateway can retry), `SSEResponse` (a streaming response
that aborts its requests however the stream ends) and `sse`. `ServerContext` lives in context.py.
Must not: know the JSON shapes of chat or completion responses (serving_*.py own those).
"""
from __future__ import annotations

import asyncio
import json
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import StreamingResponse

from tidal.engine.async_engine import RequestStream
from tidal.sampling import SamplingParams
from tidal.server.context import ServerContext
from tidal.server.errors import APIError
from tidal.server.protocol import MAX_N
from tidal.errors import TidalError
from tidal.structured.compiler import check as check_grammar
from tidal.structured.params import from_openai_request


@dataclass
class Prepared:
    """A request checked and tokenized (serving_chat.prepare_chat, serving_completions.prepare_completion),
    ready to be added to an engine; the same object then shapes the response body."""
    prompts: list[list[int]]
    params: SamplingParams
    tools: object = None              # chat: its serving_tools.ChatTools (the output may be tool_calls)
    echo: list[str] | None = None     # completions with echo=true: each prompt's text

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprob_value(v: float) -> float:
    """-inf (a token the sampler masked) and NaN are not JSON; OpenAI's floor is -9999."""
    return v if v == v and v > -9999.0 else -9999.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(req, max_tokens: int | None, logprobs: int | None, n: int,
                    defaults: dict | None = None) -> SamplingParams:
    """Map request fields onto SamplingParams, a knob the request leaves unset (None) taking its
    value from `defaults` (ServerContext.default_sampling); its checks raise TidalError -> 400."""
    for stop in [req.stop] if isinstance(req.stop, str) else req.stop or ():
        ServerContext.check_unicode(stop, "stop")
    for word in req.bad_words or ():
        ServerContext.check_unicode(word, "bad_words")
    defaults = defaults or {}
    if max_tokens is None:
        max_tokens = defaults.get("max_tokens")
    kw = dict(n=n, max_tokens=max_tokens, stop=req.stop, seed=req.seed, logprobs=logprobs,
              ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, stop_token_ids=req.stop_token_ids,
              skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
              logit_bias=req.logit_bias, allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words)
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                 "repetition_penalty"):
        value = getattr(req, name)
        if value is None:
            value = defaults.get(name)
        if value is not None:   # still None: SamplingParams' neutral default (OpenAI's temperature is 1)
            kw[name] = value
    kw["structured_outputs"] = structured_outputs(req)
    return SamplingParams(**kw)


def structured_outputs(req):
    """The request's one output constraint (response_format, vLLM's guided_* or structured_outputs),
    checked by xgrammar now, so a bad schema, regex or grammar is a 400 naming the field it came in."""
    rf = getattr(req, "response_format", None)
    fields = {"response_format": rf.as_dict() if rf is not None and rf.type != "text" else None,
              "guided_json": req.guided_json, "guided_regex": req.guided_regex, "guided_choice": req.guided_choice,
              "guided_grammar": req.guided_grammar, "structured_outputs": req.structured_outputs}
    spec = from_openai_request(fields["response_format"], **{k: v for k, v in fields.items() if k != "response_format"})
    if spec is not None:
        source = next(k for k, v in fields.items() if v is not None)
        try:
            check_grammar(spec)
        except TidalError as e:
            raise APIError(e.message.replace("structured_outputs", source, 1), param=source) from None
    return spec


def check_request(ctx: ServerContext, num_prompts: int, params: SamplingParams) -> None:
    """What can be refused before any tokenizing: too many sequences for one request, and a
    min_tokens that no prompt leaves room for."""
    seqs, cap = num_prompts * params.n, ctx.max_seqs_per_request
    if seqs > cap:
        asked = f"{num_prompts} prompts x n={params.n} = {seqs} sequences" if num_prompts > 1 else f"n={params.n}"
        raise APIError(f"this request asks for {asked}; the server runs at most {cap} sequences per request "
                       "(--max-seqs-per-request); split it into smaller requests",
                       param="n" if num_prompts == 1 or params.n > 1 else "prompt")
    if params.min_tokens >= ctx.max_model_len:
        raise APIError(f"min_tokens={params.min_tokens} can never be reached: this model's context is "
                       f"{ctx.max_model_len} tokens, prompt included", param="min_tokens")


def check_fits(ctx: ServerContext, prompt_len: int, params: SamplingParams) -> None:
    """Reject max_tokens or min_tokens past the context, and n samples that the whole KV cache could
    never hold."""
    if params.n > MAX_N:
        raise APIError(f"n must be at most {MAX_N}, got {params.n}", param="n")
    limit = ctx.max_model_len
    if params.max_tokens is not None and prompt_len < limit < prompt_len + params.max_tokens:
        # Like OpenAI and vLLM: an error, not a silent cut at the context (a too-long prompt is the
        # engine's error, with param "prompt").
        raise APIError(f"this model's context is {limit} tokens and the prompt has {prompt_len}, so max_tokens can be "
                       f"at most {limit - prompt_len}; you asked for {params.max_tokens}", param="max_tokens")
    if prompt_len < limit < prompt_len + params.min_tokens:
        raise APIError(f"this model's context is {limit} tokens and the prompt has {prompt_len}, so at most "
                       f"{limit - prompt_len} tokens can be generated; min_tokens={params.min_tokens} can never be "
                       "reached", param="min_tokens")
    per_seq = min(prompt_len + (params.max_tokens or ctx.max_model_len), ctx.max_model_len)
    need = per_seq * params.n
    if params.n > 1 and need > ctx.kv_capacity_tokens:
        raise APIError(f"n={params.n} samples of up to {per_seq} tokens need {need} tokens of KV cache but it holds "
                       f"{ctx.kv_capacity_tokens}; lower n or max_tokens", param="n")


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


__all__ = ["ServerContext", "Prepared", "usage", "logprob_value", "sampling_params", "check_request", "check_fits", "add_requests",
           "iterate", "first_output", "until_disconnect", "sse", "SSEResponse", "new_id"]
