"""`tidal batch`'s lines: one input line -> an engine request, one finished request -> an output record.

Owns: checking a line's envelope (JSON, custom_id, method, url, body), `LineRequests` (a line's body
through the server's own request handling: its protocol models, a real `ServerContext` built from
the offline engine's figures, serving_*.prepare_* and the response bodies of serving_*), the error
record for a line that fails (the server's error body for the same request), and the OpenAI batch
record wrapped around a finished line's response body.
Must not: read or write files, hold requests in flight or drive the engine (batch.py does those);
define request shapes, checks, sampling rules or response shapes: the server's code does all of
that, so a body means the same here as over HTTP. The one difference: a line's `model` is not
checked (batch files name the model they were written for; the output names the one that ran).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from tidal.errors import TidalError

# The server modules (request models, preparation, response bodies) are imported inside the
# functions that use them: they pull in torch and fastapi (~2 s), which `tidal --help` must not pay.
_URLS = ("/v1/chat/completions", "/v1/completions")


class _Job:
    """One input line in the engine: its request, its prepared prompts (a completions line may hold
    several) and their results."""

    def __init__(self, custom_id, chat, req, prep):
        self.custom_id, self.chat, self.req, self.prep = custom_id, chat, req, prep
        self.finals, self.remaining = [None] * len(prep.prompts), len(prep.prompts)


class LineRequests:
    """The server's request handling for batch lines: a `ServerContext` over the offline engine's
    tokenizer, context length, KV capacity and generation-config defaults (no frontend: batch.py
    adds the requests to its own LLMEngine), and an event loop for its tokenizer calls."""

    def __init__(self, engine):
        from pydantic import ValidationError

        from tidal.server.context import ServerContext
        from tidal.server.errors import APIError
        bm = engine.block_manager
        self.model = engine.config.model
        self.ctx = ServerContext(engine.tokenizer, self.model, max_model_len=engine.max_model_len,
                                 kv_capacity_tokens=bm.num_blocks * bm.block_size,
                                 default_sampling=getattr(engine, "default_sampling", None))
        self.loop = asyncio.new_event_loop()
        self.errors = (ValidationError, APIError, TidalError)   # a line's own fault: its error record

    def prepare(self, cid: str, line: dict) -> _Job:
        """Validate and prepare the body exactly as the server does; raises one of `self.errors`."""
        from tidal.server.protocol import ChatCompletionRequest, CompletionRequest
        from tidal.server.serving_chat import prepare_chat
        from tidal.server.serving_completions import prepare_completion
        chat = line["url"] == "/v1/chat/completions"
        req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(line["body"])
        prep = self.loop.run_until_complete(prepare_chat(self.ctx, req) if chat else prepare_completion(self.ctx, req))
        return _Job(cid, chat, req, prep)

    def error_record(self, lineno: int, cid: str, exc: BaseException) -> dict:
        """The record of a line that failed with one of `self.errors`: the status and body the server answers."""
        from pydantic import ValidationError

        from tidal.server.errors import _validation_message, error_body, from_exception
        if isinstance(exc, ValidationError):   # FastAPI's validation handler, as in errors.install_error_handlers
            message, param = _validation_message(exc)
            status, body = 400, error_body(message, "invalid_request_error", param)
        else:
            status, body = from_exception(exc)
        err = body["error"]
        return _line_error(lineno, cid, err["code"] or err["type"], err["message"], status, body, err["param"])

    def success(self, job: _Job) -> tuple[dict, int]:
        """-> (the line's record, its completion tokens)."""
        from tidal.server.common import new_id
        from tidal.server.serving_chat import chat_completion_body
        from tidal.server.serving_completions import completion_body
        head = {"id": new_id("chatcmpl" if job.chat else "cmpl"), "created": int(time.time()), "model": self.model}
        body = chat_completion_body(self.ctx, job.req, job.prep, head, job.finals[0]) if job.chat \
            else completion_body(self.ctx, job.req, job.prep, head, job.finals)
        record = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": job.custom_id,
                  "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
                  "error": None}
        return record, body["usage"]["completion_tokens"]

    def close(self) -> None:
        for task in asyncio.all_tasks(self.loop):   # one cut short by Ctrl-C
            task.cancel()
        self.loop.close()
        self.ctx.close()


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
