"""Checks that run before any route: the Host header, the API key, the request-body size limit and
how long the body may take to arrive (pure ASGI).

Owns: `GuardMiddleware`. With `allowed_hosts` set (the server binds loopback and has no API key, or
--allowed-hosts was given), a Host header that is neither a loopback name/IP nor listed gets a 400,
which closes DNS rebinding (a web page whose name resolves to 127.0.0.1 still sends its own Host).
With an API key set, every path except the open ones (/health, /ping, /metrics, the docs) needs
`Authorization: Bearer <key>` (compared in constant time) or gets a 401. A body over the limit gets
a 413 as soon as it is known to be too big, whether the client sent Content-Length or streamed it
chunked; a body that takes longer than `body_timeout` gets a 408. The body is then replayed to the
app, and after it the real `receive` is passed through, so handlers still see `http.disconnect`.
Must not: parse JSON or know any route's semantics.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json

from tidal.server.errors import error_body

OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc"})
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 60.0


class GuardMiddleware:
    def __init__(self, app, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 allowed_hosts: list[str] | None = None, body_timeout: float | None = DEFAULT_BODY_TIMEOUT):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = None if allowed_hosts is None else {_host_name(h.encode()) for h in allowed_hosts}
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.allowed_hosts is not None and not self._host_allowed(scope):
            return await _send_error(send, 400, "the Host header names neither this machine's loopback address nor "
                                     "one in --allowed-hosts; start the server with --allowed-hosts NAME to "
                                     "accept it", "invalid_request_error", "invalid_host")
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
        try:
            async with asyncio.timeout(self.body_timeout):
                chunks = await self._read_body(receive)
        except TimeoutError:
            return await _send_error(send, 408, f"the request body did not arrive within {self.body_timeout:g} s",
                                     "invalid_request_error", "request_timeout", [(b"connection", b"close")])
        if chunks is None:   # the client left
            return
        if chunks is _TOO_LARGE:
            return await self._too_large(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()
        await self.app(scope, replay, send)

    async def _read_body(self, receive):
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                return _TOO_LARGE
            chunks.append(body)
            if not message.get("more_body", False):
                return chunks

    def _host_allowed(self, scope) -> bool:
        value = _header(scope, b"host")
        if value is None:   # HTTP/1.0 without Host: no browser sends that
            return True
        name = _host_name(value)
        if name in self.allowed_hosts or "*" in self.allowed_hosts or name == "localhost":
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def _authorized(self, scope) -> bool:
        value = _header(scope, b"authorization") or b""
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def _too_large(self, send):
        mib = self.max_body_bytes / 2**20
        return await _send_error(send, 413, f"the request body is larger than the server's limit of {mib:g} MiB",
                                 "invalid_request_error", "request_too_large")


_TOO_LARGE = object()


def _host_name(value: bytes) -> str:
    """`Host` header -> lower-case name without port or brackets: b"[::1]:8000" -> "::1"."""
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


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
