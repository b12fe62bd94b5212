"""The FastAPI app: routes of the OpenAI-compatible API plus /health, /metrics, /tokenize, /detokenize.

Owns: `build_app(engine, served_model_name, api_key, ...)`, the route table, the lifespan (the engine
is drained and stopped when the server shuts down, after uvicorn has let in-flight requests
finish), what /v1/models and the OpenAPI description publish about the server's defaults
(max_model_len, the sampling a request leaves unset), and wiring of the error handlers and the
guard middleware.
Request rules that differ from OpenAI's API, as in vLLM: `model` may be left out (the served model
is used), and unknown top-level request fields are accepted and ignored, each name logged once as
a warning (OpenAI answers 400), so clients written for vLLM or other servers keep working.
Must not: hold request logic (serving_*.py) or start uvicorn (cli.py and uvicorn_server.py do).
"""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from tidal.engine.async_engine import AsyncEngine
from tidal.server.context import DEFAULT_MAX_SEQS_PER_REQUEST, ServerContext
from tidal.server.errors import APIError, install_error_handlers
from tidal.server.middleware import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES, GuardMiddleware
from tidal.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from tidal.server.serving_chat import _messages, create_chat_completion
from tidal.server.serving_completions import create_completion
from tidal.structured.tool_parsers import get_parser


def build_app(engine: AsyncEngine, served_model_name: str, api_key: str | None = None, *,
              model_aliases: tuple[str, ...] = (), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              shutdown_engine: bool = True, drain_timeout: float | None = None,
              allowed_hosts: list[str] | None = None, body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
              max_seqs_per_request: int = DEFAULT_MAX_SEQS_PER_REQUEST,
              default_sampling: dict | None = None, tool_parser: str = "auto") -> FastAPI:
    """`allowed_hosts`: None accepts any Host header; a list accepts loopback names plus those.
    `default_sampling`: what a request leaving a knob unset gets (e.g. the model's generation config).
    `tool_parser`: how tool_choice "auto" finds tool calls in the text (hermes, llama3_json, or auto:
    by the chat template)."""
    ctx = ServerContext(engine.tokenizer, served_model_name, model_aliases, max_model_len=engine.max_model_len,
                        kv_capacity_tokens=engine.kv_capacity_tokens, default_sampling=default_sampling,
                        max_seqs_per_request=max_seqs_per_request, engine=engine)
    parser = get_parser(tool_parser, getattr(ctx.tokenizer, "chat_template", None))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn runs this after in-flight requests have finished (SIGTERM is graceful), so the
        # drain only waits for requests whose clients left without an abort reaching the engine.
        if shutdown_engine:
            await engine.shutdown(drain=True, timeout=drain_timeout)
        ctx.close()

    app = FastAPI(title="tidal", version=_version(), lifespan=lifespan, description=_description(ctx))
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes, allowed_hosts=allowed_hosts,
                       body_timeout=body_timeout)
    bad = {400: {"description": "invalid request (OpenAI error shape)"}}

    @app.post("/v1/chat/completions", responses=bad)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(ctx, body, request, parser)

    @app.post("/v1/completions", responses=bad)
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(ctx, body, request)

    @app.get("/v1/models")
    async def models():
        cards = [{"id": name, "object": "model", "created": ctx.created, "owned_by": "tidal", "root": name,
                  "parent": None, "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
                  "default_sampling_params": dict(ctx.default_sampling),
                  "max_seqs_per_request": ctx.max_seqs_per_request}
                 for name in [served_model_name]]
        return {"object": "list", "data": cards}

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/ping")
    async def ping():
        return await health()

    @app.get("/metrics")
    async def metrics():
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize", responses=bad)
    async def tokenize(body: TokenizeRequest):
        ctx.check_model(body.model)
        ctx.warn_unknown_fields("/tokenize", body)
        if (body.prompt is None) == (body.messages is None):
            raise APIError("give exactly one of `prompt` or `messages`", param="prompt")
        if body.messages is not None:
            ids = await ctx.apply_chat_template(_messages(body), body.add_generation_prompt)
        else:
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await ctx.encode(body.prompt, add_special_tokens=special)
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": None}

    @app.post("/detokenize", responses=bad)
    async def detokenize(body: DetokenizeRequest):
        ctx.check_model(body.model)
        ctx.warn_unknown_fields("/detokenize", body)
        vocab = len(ctx.tokenizer)
        bad_ids = [t for t in body.tokens if not 0 <= t < vocab]
        if bad_ids:
            raise APIError(f"token id {bad_ids[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return {"prompt": await ctx.decode(body.tokens)}

    return app


def _description(ctx: ServerContext) -> str:
    defaults = ", ".join(f"{k}={v}" for k, v in ctx.default_sampling.items() if k != "max_tokens")
    max_tokens = ctx.default_sampling.get("max_tokens")
    return (f"OpenAI-compatible API of the tidal inference engine, serving `{ctx.served_model_name}` with a "
            f"context of {ctx.max_model_len} tokens (max_model_len, prompt plus output). A request that "
            f"leaves a sampling knob unset gets: {defaults}; max_tokens defaults to "
            f"{max_tokens if max_tokens is not None else 'the rest of the context'} for chat and to 16 for "
            f"completions. At most {ctx.max_seqs_per_request} sequences (prompts x n) per request. As in vLLM, "
            "`model` is optional and unknown request fields are ignored (and logged). GET /v1/models lists the "
            "same defaults.")


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("tidal")
    except Exception:
        return "0"
