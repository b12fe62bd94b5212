"""POST /v1/chat/completions: messages -> chat template -> engine -> chat.completion(.chunk) JSON.

Owns: validating what only chat has (messages, response_format, top_logprobs) and the rest of a
request's preparation (`prepare_chat`), the `chat.completion` body (`chat_completion_body`); `tidal
batch` runs those two as well. Also the `chat.completion.chunk` SSE stream (role chunk first, text
or tool-call deltas, one finish chunk per choice, optional usage chunk, `[DONE]`), and chat logprobs.
Tools (`tools`, `tool_choice`, `tool_calls` in the output) are serving_tools.py's.
Must not: tokenize outside the tokenizer worker or touch the engine other than through common.py.
"""
from __future__ import annotations

import json
import time
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import JSONResponse

from tidal.server.common import (Prepared, ServerContext, check_fits, check_request, logprob_value, new_id,
                                 sampling_params, usage)
from tidal.server.streaming import SSEResponse, add_requests, first_output, iterate, sse, until_disconnect
from tidal.server.errors import APIError, from_exception
from tidal.server.protocol import ChatCompletionRequest
from tidal.server.serving_tools import ChatTools
from tidal.structured.tool_parsers import get_parser


def _messages(req: ChatCompletionRequest) -> list[dict]:
    if not req.messages:
        raise APIError("`messages` is empty; give at least one message", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or not isinstance(part.text, str):
                    raise APIError(f"messages[{i}] has a `{part.type}` content part; this model takes text only",
                                   param=f"messages.{i}.content")
                texts.append(part.text)
            content = "\n".join(texts)
        # The template knows system/user/assistant; "developer" is OpenAI's newer name for system.
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name:
            msg["name"] = m.name
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            msg["tool_calls"] = [_earlier_call(c, f"messages.{i}.tool_calls.{j}") for j, c in enumerate(m.tool_calls)]
        out.append(msg)
    return out


def _earlier_call(call, param: str) -> dict:
    """An assistant message's tool call as templates read it: arguments as an object (vLLM does too)."""
    try:
        args = json.loads(call.function.arguments)
    except ValueError:
        args = None
    if not isinstance(args, dict):
        raise APIError(f"`{param}.function.arguments` must be a JSON object's text", param=f"{param}.function.arguments")
    return {"id": call.id or "", "type": "function", "function": {"name": call.function.name, "arguments": args}}


def _logprob_entry(ctx: ServerContext, token_id: int, lp: dict[int, float], top: int) -> dict:
    def item(tid: int, value: float) -> dict:
        s = ctx.decode_token(tid)
        return {"token": s, "logprob": logprob_value(value), "bytes": list(s.encode("utf-8"))}
    entry = item(token_id, lp[token_id])
    ranked = sorted(lp.items(), key=lambda kv: kv[1], reverse=True)[:top]
    entry["top_logprobs"] = [item(t, v) for t, v in ranked]
    return entry


def _logprobs(ctx, token_ids, logprobs, top) -> dict | None:
    if logprobs is None:
        return None
    return {"content": [_logprob_entry(ctx, t, lp, top) for t, lp in zip(token_ids, logprobs)]}


async def prepare_chat(ctx: ServerContext, req: ChatCompletionRequest, tool_parser=None) -> Prepared:
    """Everything between a validated body and the engine: the checks, SamplingParams (the context's
    defaults for unset knobs), tools, the chat template. The server and `tidal batch` both call it.
    `tool_parser`: how tool_choice "auto" reads calls from the text (default: the template's format)."""
    messages = _messages(req)
    tools = ChatTools(req.tools, req.tool_choice, tool_parser or get_parser("auto", ctx.tokenizer.chat_template),
                      req.parallel_tool_calls)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
    ctx.warn_unknown_fields("/v1/chat/completions", req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = tools.constrain(sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                             req.n, ctx.default_sampling))
    check_request(ctx, 1, params)
    messages, template_tools = tools.template_inputs(messages, ctx.tokenizer.chat_template)
    prompt_ids = await ctx.apply_chat_template(messages, req.add_generation_prompt, tools=template_tools)
    check_fits(ctx, len(prompt_ids), params)
    return Prepared([prompt_ids], params, tools=tools)


def chat_completion_body(ctx: ServerContext, req: ChatCompletionRequest, prep: Prepared, head: dict,
                         final) -> dict:
    """The `chat.completion` body of a finished request (`head`: id, created, model)."""
    choices, completion_tokens = [], 0
    for c in final.outputs:
        completion_tokens += len(c.token_ids)
        message, finish_reason = prep.tools.message(c.text, c.finish_reason)
        choices.append({"index": c.index, "message": message,
                        "logprobs": _logprobs(ctx, c.token_ids, c.logprobs, req.top_logprobs or 0)
                        if req.logprobs else None,
                        "finish_reason": finish_reason, "stop_reason": c.stop_reason})
    return {**head, "object": "chat.completion", "choices": choices,
            "usage": usage(prep.prompt_tokens, completion_tokens)}


async def create_chat_completion(ctx: ServerContext, req: ChatCompletionRequest, raw: Request, tool_parser=None):
    arrival = time.monotonic()
    model = ctx.check_model(req.model)
    prep = await prepare_chat(ctx, req, tool_parser)
    rid = new_id("chatcmpl")
    streams = await add_requests(ctx, rid, prep.prompts, prep.params, req.priority)
    head = {"id": rid, "created": int(time.time()), "model": model}
    if req.stream:
        opts = req.stream_options
        outputs = await first_output(ctx, streams, arrival, raw)
        gen = _stream(outputs, head, prep.prompt_tokens, req.n, req.top_logprobs or 0, prep.tools,
                      bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats), ctx)
        return SSEResponse(gen, on_close=lambda: [s.abort() for s in streams])
    final = await until_disconnect(raw, _last(ctx, streams, arrival))
    return JSONResponse(chat_completion_body(ctx, req, prep, head, final))


async def _last(ctx, streams, arrival):
    final = None
    async with aclosing(iterate(ctx, streams, arrival)) as outputs:
        async for _, out in outputs:
            final = out
    return final


async def _stream(outputs, head, prompt_len, n, top, tools, include_usage, continuous_usage, ctx):
    head = {**head, "object": "chat.completion.chunk"}
    sent_tokens, finished = [0] * n, [False] * n
    states = [tools.stream() for _ in range(n)]

    def chunk(choices, usage_now=False):
        body = {**head, "choices": choices}
        if include_usage or continuous_usage:
            body["usage"] = usage(prompt_len, sum(sent_tokens)) if continuous_usage and usage_now else None
        return sse(body)

    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(n)])
        async with aclosing(outputs):
            async for _, out in outputs:
                rounds: list[list[dict]] = []   # a choice's k-th event goes out in the k-th chunk
                for c in out.outputs:
                    i = c.index
                    if finished[i]:
                        continue
                    new_ids = c.token_ids[sent_tokens[i]:]
                    events = states[i].feed(c.text, c.delta_text, c.finish_reason)
                    if not events and c.logprobs is not None and new_ids:
                        events = [({}, None)]
                    if not events:
                        continue
                    lps = _logprobs(ctx, new_ids, c.logprobs[sent_tokens[i]:], top) if c.logprobs is not None else None
                    sent_tokens[i] = len(c.token_ids)
                    finished[i] = c.finish_reason is not None
                    for k, (delta, reason) in enumerate(events):
                        if k == len(rounds):
                            rounds.append([])
                        rounds[k].append({"index": i, "delta": delta, "logprobs": lps if k == 0 else None,
                                          "finish_reason": reason,
                                          "stop_reason": c.stop_reason if reason is not None else None})
                for choices in rounds:
                    yield chunk(choices, usage_now=True)
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(prompt_len, sum(sent_tokens))})
    except Exception as e:   # after the 200 went out, an error can only be an event in the stream
        yield sse(from_exception(e)[1])
    yield sse("[DONE]")

