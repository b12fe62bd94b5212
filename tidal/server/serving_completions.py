"""POST /v1/completions: prompt(s) -> engine -> text_completion JSON or SSE chunks.

Owns: the prompt forms (a string, a list of token ids, a list of strings or of token-id lists,
i.e. a batch), echo, the legacy logprobs shape (tokens / token_logprobs / top_logprobs /
text_offset), and choice numbering for batches (prompt i, sample j -> index i * n + j). A request's
preparation (`prepare_completion`) and its `text_completion` body (`completion_body`) are what
`tidal batch` runs too.
Must not: touch the engine other than through common.py.
"""
from __future__ import annotations

import time
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import JSONResponse

from tidal.server.common import (Prepared, ServerContext, check_fits, check_request, logprob_value, new_id,
                                 sampling_params, usage)
from tidal.server.streaming import SSEResponse, add_requests, first_output, iterate, sse, until_disconnect
from tidal.server.context import LONG_CHARS
from tidal.server.errors import APIError, from_exception
from tidal.server.protocol import CompletionRequest


def _items(prompt) -> list:
    """The prompts of a request: one string or token-id list, or a batch of them."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("`prompt` is empty; give a string, a list of token ids, or a list of prompts",
                       param="prompt")
    return [prompt] if isinstance(prompt[0], int) else list(prompt)


async def _prompts(ctx: ServerContext, items: list) -> list[list[int]]:
    texts = [p for p in items if isinstance(p, str)]
    for text in texts:   # refuse a batch with a prompt that cannot fit before tokenizing any of it
        ctx.check_length(len(text))
    long = sum(map(len, texts)) > LONG_CHARS   # a big batch of short prompts is long work too
    out = []
    for p in items:
        ids = await ctx.encode(p, long=long) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError("a prompt is empty; give at least one token", param="prompt")
        out.append(ids)
    return out


def _logprobs(ctx: ServerContext, token_ids, logprobs, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp in zip(token_ids, logprobs):
        s = ctx.decode_token(tid)
        tokens.append(s)
        token_lps.append(logprob_value(lp[tid]))
        tops.append({ctx.decode_token(t): logprob_value(v) for t, v in lp.items()})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


async def prepare_completion(ctx: ServerContext, req: CompletionRequest) -> Prepared:
    """Everything between a validated body and the engine: the checks, SamplingParams (the context's
    defaults for unset knobs), the prompts' tokens, echo. The server and `tidal batch` both call it."""
    if req.suffix:
        raise APIError("suffix is not supported; drop it", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError("best_of other than n is not supported; drop best_of", param="best_of")
    if req.echo and req.logprobs is not None:
        raise APIError("echo together with logprobs is not supported yet", param="echo")
    ctx.warn_unknown_fields("/v1/completions", req)
    items = _items(req.prompt)
    params = sampling_params(req, req.max_tokens, req.logprobs, req.n, ctx.default_sampling)
    check_request(ctx, len(items), params)
    prompts = await _prompts(ctx, items)
    for ids in prompts:
        check_fits(ctx, len(ids), params)
    echo = [await ctx.decode(ids) for ids in prompts] if req.echo else None
    return Prepared(prompts, params, echo=echo)


def completion_body(ctx: ServerContext, req: CompletionRequest, prep: Prepared, head: dict, finals: list) -> dict:
    """The `text_completion` body of a finished request (`head`: id, created, model; `finals`: the
    last output of each prompt)."""
    choices, completion_tokens = [], 0
    for i, final in enumerate(finals):
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            prefix = prep.echo[i] if prep.echo else ""
            choices.append({"index": i * req.n + c.index, "text": prefix + c.text,
                            "logprobs": _logprobs(ctx, c.token_ids, c.logprobs, 0) if c.logprobs is not None else None,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return {**head, "object": "text_completion", "choices": choices,
            "usage": usage(prep.prompt_tokens, completion_tokens)}


async def create_completion(ctx: ServerContext, req: CompletionRequest, raw: Request):
    arrival = time.monotonic()
    model = ctx.check_model(req.model)
    prep = await prepare_completion(ctx, req)
    rid = new_id("cmpl")
    streams = await add_requests(ctx, rid, prep.prompts, prep.params, req.priority)
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
    if req.stream:
        opts = req.stream_options
        outputs = await first_output(ctx, streams, arrival, raw)
        gen = _stream(outputs, len(streams), head, prep.prompt_tokens, req.n, prep.echo,
                      bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats), ctx)
        return SSEResponse(gen, on_close=lambda: [s.abort() for s in streams])
    finals = await until_disconnect(raw, _collect(ctx, streams, arrival))
    return JSONResponse(completion_body(ctx, req, prep, head, finals))


async def _collect(ctx, streams, arrival):
    finals = [None] * len(streams)
    async with aclosing(iterate(ctx, streams, arrival)) as outputs:
        async for i, out in outputs:
            finals[i] = out
    return finals


async def _stream(outputs, num_prompts, head, prompt_tokens, n, echo, include_usage, continuous_usage, ctx):
    sent = [[0] * n for _ in range(num_prompts)]        # tokens already sent, per prompt and sample
    offsets = [[0] * n for _ in range(num_prompts)]     # text offset for logprobs
    finished = [[False] * n for _ in range(num_prompts)]

    def chunk(choices):
        body = {**head, "choices": choices}
        if include_usage or continuous_usage:
            done = sum(map(sum, sent))
            body["usage"] = usage(prompt_tokens, done) if continuous_usage else None
        return sse(body)

    try:
        if echo:
            yield chunk([{"index": i * n + j, "text": echo[i], "logprobs": None, "finish_reason": None}
                         for i in range(num_prompts) for j in range(n)])
        async with aclosing(outputs):
            async for i, out in outputs:
                choices = []
                for c in out.outputs:
                    j = c.index
                    if finished[i][j]:
                        continue
                    new_ids = c.token_ids[sent[i][j]:]
                    if not (c.delta_text or c.finish_reason or (c.logprobs is not None and new_ids)):
                        continue
                    lps = None
                    if c.logprobs is not None:
                        lps = _logprobs(ctx, new_ids, c.logprobs[sent[i][j]:], offsets[i][j])
                        offsets[i][j] += sum(len(t) for t in lps["tokens"])
                    sent[i][j] = len(c.token_ids)
                    finished[i][j] = c.finish_reason is not None
                    choices.append({"index": i * n + j, "text": c.delta_text, "logprobs": lps,
                                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
                if choices:
                    yield chunk(choices)
        if include_usage:
            done = sum(map(sum, sent))
            yield sse({**head, "choices": [], "usage": usage(prompt_tokens, done)})
    except Exception as e:   # after the 200 went out, an error can only be an event in the stream
        yield sse(from_exception(e)[1])
    yield sse("[DONE]")
