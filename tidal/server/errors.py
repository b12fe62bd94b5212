"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Owns: `APIError` (a 4xx the serving code raises on purpose), `error_response`, and the exception
handlers that turn validation errors, TidalError, HTTP errors and anything unexpected into that
shape, so a client never sees a traceback or FastAPI's `{"detail": ...}`.
Must not: decide what is an error (serving code and the engine do); it only formats them.
"""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from tidal.engine.async_engine import EngineUnavailable
from tidal.errors import TidalError

logger = logging.getLogger("tidal.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str | None = None, headers: dict | None = None) -> JSONResponse:
    type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def from_exception(exc: BaseException) -> tuple[int, dict]:
    """Status and body for an exception raised while serving (also used inside SSE streams)."""
    if isinstance(exc, APIError):
        return exc.status, error_body(exc.message, exc.type, exc.param, exc.code)
    if isinstance(exc, TidalError):
        return 400, error_body(exc.message, "invalid_request_error", exc.param)
    if isinstance(exc, EngineUnavailable):
        return 503, error_body(str(exc), "service_unavailable_error")
    logger.error("internal error while serving a request", exc_info=exc)
    return 500, error_body(f"internal server error ({type(exc).__name__}); see the server log", "internal_error")


# A union member's tag in a validation error's loc (prompt.str, prompt.list[int], ...), as opposed
# to a field name (snake_case) or a list index.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[A-Z]\w*|.*\[.*\])$")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "the request body is invalid", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})", None
    locs = [[str(p) for p in e.get("loc", ()) if p != "body"] for e in errors]
    loc, msg, used = locs[0], first.get("msg", "invalid value"), 1
    if first.get("type") == "missing" and not loc:
        return "the request needs a JSON body", None
    # A value matching no member of a union gives one error per member; report the field once.
    tag = next((i for i, part in enumerate(loc) if _UNION_TAG.match(part)), None)
    if tag is not None:
        group = [i for i, other in enumerate(locs) if other[:tag] == loc[:tag] and len(other) > tag
                 and _UNION_TAG.match(other[tag])]
        msgs = list(dict.fromkeys(errors[i].get("msg", "") for i in group))
        loc, used = loc[:tag], len(group)
        msg = msgs[0] if len(msgs) == 1 else "has the wrong type or value (" + "; or ".join(msgs[:3]) + ")"
    param = ".".join(loc) or None
    where = f"`{param}`: " if param else ""
    extra = f" (and {len(errors) - used} more problem(s))" if len(errors) > used else ""
    return f"{where}{msg}{extra}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        ctype = request.headers.get("content-type", "")
        if param is None and "json" not in ctype and request.method == "POST":
            message = f"send the body as JSON with `Content-Type: application/json` (got {ctype or 'none'!r})"
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    @app.exception_handler(TidalError)
    @app.exception_handler(EngineUnavailable)
    async def _known(request: Request, exc: Exception):
        status, body = from_exception(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        status, body = from_exception(exc)
        return JSONResponse(body, status_code=status)
