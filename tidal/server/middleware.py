"""Checks that run before any route: the API key and the request-body size limit (pure ASGI).

Owns: `GuardMiddleware`. With an API key set, every path except the open ones (/health, /ping,
/metrics, the docs) needs `Authorization: Bearer <key>` (compared in constant time) or gets a
401. A body over the limit gets a 413 as soon as it is known to be too big, whether the client
sent Content-Length or streamed it chunked; the body is then replayed to the app, and after it
the real `receive` is passed through, so handlers still see `http.disconnect`.
Must not: parse JSON or know any route's semantics.
"""
from __future__ import annotations

import hmac
import json

from tidal.server.errors import error_body

OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc"})
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


class GuardMiddleware:
    def __init__(self, app, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            return await _send_error(send, 401, "a missing or wrong API key; send `Authorization: Bearer <key>`",
                                     "authentication_error", "invalid_api_key",
                                     [(b"www-authenticate", b"Bearer")])
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _send_error(send, 400, "the Content-Length header is not a number",
                                         "invalid_request_error", None)
            if declared > self.max_body_bytes:
                return await self._too_large(send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                return await self._too_large(send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()
        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        value = _header(scope, b"authorization") or b""
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def _too_large(self, send):
        mib = self.max_body_bytes / 2**20
        return await _send_error(send, 413, f"the request body is larger than the server's limit of {mib:g} MiB",
                                 "invalid_request_error", "request_too_large")


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


async def _send_error(send, status: int, message: str, type: str, code: str | None, headers=()):
    body = json.dumps(error_body(message, type, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
