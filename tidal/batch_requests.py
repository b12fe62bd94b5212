"""`tidal batch`'s lines: one input line -> an engine request, one finished request -> an output record.

Owns: checking a line's envelope (JSON, custom_id, method, url, body), validating its body exactly
as the server does and turning it into prompts and `SamplingParams` (`_prepare`), the error record
for a line that fails, and the OpenAI batch record of a finished line, with usage and logprobs.
Must not: read or write files, hold requests in flight or drive the engine (batch.py does those);
define request shapes or sampling rules: bodies are validated by the server's protocol models and
mapped by its `sampling_params`, so a body means the same here as over HTTP.
"""
from __future__ import annotations

import json
import time
import uuid

from tidal.errors import TidalError

# The server modules (request models, sampling mapping, logprob shapes) are imported inside the
# functions that use them: they pull in torch and fastapi (~2 s), which `tidal --help` must not pay.
_URLS = ("/v1/chat/completions", "/v1/completions")


class _Ctx:
    """The slice of the server's context that check_fits and the logprob formatters read."""

    def __init__(self, engine):
        self.tokenizer = engine.tokenizer
        self.default_sampling = dict(getattr(engine, "default_sampling", {}))   # the model's, as the server uses
        bm = engine.block_manager
        self.engine = type("EngineLimits", (), {"max_model_len": engine.max_model_len,
                                                "kv_capacity_tokens": bm.num_blocks * bm.block_size})

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


class _Job:
    """One input line in the engine: its prompts (a completions line may hold several) and their results."""

    def __init__(self, custom_id, chat, req, prompts, tools=None):
        self.custom_id, self.chat, self.req, self.prompts = custom_id, chat, req, prompts
        self.tools = tools   # a chat line's serving_tools.ChatTools: its output may be tool_calls
        self.finals, self.remaining = [None] * len(prompts), len(prompts)


def _line_error(lineno, custom_id, code, message, status=None, body=None, param=None) -> dict:
    response = None if status is None else {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}",
                                            "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response,
            "error": {"code": code, "message": message, "param": param, "line": lineno}}


def _parse(lineno: int, raw: bytes) -> tuple[str | None, dict | None, dict | None]:
    """-> (custom_id or None, the line, an error record if the line is not a usable batch request)."""
    try:
        line = json.loads(raw)
    except ValueError as e:
        return None, None, _line_error(lineno, None, "invalid_json", f"line {lineno} is not valid JSON ({e})")
    cid = line.get("custom_id") if isinstance(line, dict) else None
    if not isinstance(cid, str) or not cid:
        return None, None, _line_error(lineno, None, "invalid_request",
                                       f"line {lineno} needs to be a JSON object with a non-empty string `custom_id`")
    if line.get("method", "POST") != "POST":
        return cid, line, _line_error(lineno, cid, "invalid_method", f"method must be POST, not {line['method']!r}")
    if line.get("url") not in _URLS:
        return cid, line, _line_error(lineno, cid, "invalid_url",
                                      f"url must be one of {sorted(_URLS)}, not {line.get('url')!r}")
    if not isinstance(line.get("body"), dict):
        return cid, line, _line_error(lineno, cid, "missing_body", "the line needs a `body` object (the request)")
    return cid, line, None


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool, tools=None) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise TidalError("this model has no chat template; use /v1/completions lines", param="messages")
    try:
        out = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                            tokenize=True)
    except Exception as e:   # jinja's TemplateError and the tokenizer's ValueError: the messages' fault
        if isinstance(e, (ValueError, TypeError, KeyError)) or type(e).__module__.startswith("jinja2"):
            raise TidalError(f"the chat template rejected these messages: {e}", param="messages")
        raise
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _prepare(ctx: _Ctx, cid: str, line: dict) -> tuple[_Job, object]:
    """Validate the body like the server does -> (job, SamplingParams); raises on a bad body."""
    from tidal.server import serving_chat
    from tidal.server.common import check_fits, sampling_params
    from tidal.server.errors import APIError
    from tidal.server.protocol import ChatCompletionRequest, CompletionRequest
    from tidal.server.serving_tools import ChatTools
    from tidal.structured.tool_parsers import get_parser
    chat = line["url"] == "/v1/chat/completions"
    req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(line["body"])
    tools = None
    if chat:
        template = getattr(ctx.tokenizer, "chat_template", None)
        messages = serving_chat._messages(req)
        tools = ChatTools(req.tools, req.tool_choice, get_parser("auto", template), req.parallel_tool_calls)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = tools.constrain(sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                                 req.n, ctx.default_sampling))
        messages, template_tools = tools.template_inputs(messages, template)
        prompts = [_chat_ids(ctx.tokenizer, messages, req.add_generation_prompt, template_tools)]
    else:
        if req.suffix or (req.best_of is not None and req.best_of != req.n):
            raise APIError("suffix and best_of (other than n) are not supported; drop them", param="suffix")
        if req.echo and req.logprobs is not None:
            raise APIError("echo together with logprobs is not supported yet", param="echo")
        items = [req.prompt] if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) \
            else list(req.prompt)
        prompts = [ctx.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in items]
        if not prompts or not all(prompts):
            raise APIError("`prompt` is empty; give at least one token", param="prompt")
        params = sampling_params(req, req.max_tokens, req.logprobs, req.n, ctx.default_sampling)
    for ids in prompts:
        check_fits(ctx, len(ids), params)
    return _Job(cid, chat, req, prompts, tools), params


def _success(ctx: _Ctx, job: _Job, model: str) -> tuple[dict, int]:
    from tidal.server import serving_chat, serving_completions
    req, choices, completion_tokens = job.req, [], 0
    for i, final in enumerate(job.finals):
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            choice = {"index": i * req.n + c.index, "logprobs": None, "finish_reason": c.finish_reason,
                      "stop_reason": c.stop_reason}
            if job.chat:
                choice["message"], choice["finish_reason"] = job.tools.message(c.text, c.finish_reason)
                if req.logprobs:
                    choice["logprobs"] = serving_chat._logprobs(ctx, c.token_ids, c.logprobs, req.top_logprobs or 0)
            else:
                choice["text"] = (ctx.tokenizer.decode(job.prompts[i]) if req.echo else "") + c.text
                if c.logprobs is not None:
                    choice["logprobs"] = serving_completions._logprobs(ctx, c.token_ids, c.logprobs, 0)
            choices.append(choice)
    prompt_tokens = sum(len(p) for p in job.prompts)
    body = {"id": f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if job.chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
    record = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": job.custom_id,
              "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body}, "error": None}
    return record, completion_tokens
