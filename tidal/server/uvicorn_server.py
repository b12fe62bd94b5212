"""uvicorn, set up for a server whose clients cannot all be trusted.

Owns: `make_server(app, ...)` -> `TidalServer`, and the HTTP/1.1 connection guards of `_GuardedH11`
(uvicorn's h11 protocol underneath):
- a request head (request line and headers) must be complete within `header_timeout` of the
  connection opening, or of a request's first byte after a keep-alive pause; otherwise the
  connection closes (with a 408 if part of a head had arrived). uvicorn alone never times out a
  connection before its first request, so a silent or slowloris client held it open for good;
- past `max_connections` open connections, a request gets a 503 and its connection closes;
- a request h11 cannot parse (a malformed Content-Length, ...) gets a 400 in the OpenAI error
  shape instead of uvicorn's text/plain one.
`TidalServer` makes --shutdown-timeout end requests cleanly: when it runs out, `on_drain_timeout`
ends every request still in flight with an error (an SSE error event then [DONE], or a 503), and
uvicorn's own cancellation (which drops streams mid-event and logs tracebacks) only backs that up
CUT_GRACE seconds later.
Must not: define routes or know what a request means (app.py and the serving modules do).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from tidal.server.errors import error_body

logger = logging.getLogger("tidal.server")

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_KEEP_ALIVE = 5
DEFAULT_MAX_CONNECTIONS = 1024
CUT_GRACE = 3.0   # seconds between ending requests with an error and uvicorn cancelling what is left


def _json(message: str, code: str, type: str = "invalid_request_error") -> bytes:
    return json.dumps(error_body(message, type, None, code)).encode()


def _raw_response(status: int, reason: str, body: bytes) -> bytes:
    """A whole response written past h11, for a connection whose request never arrived."""
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


async def _over_capacity(scope, receive, send) -> None:
    body = _json("the server has too many open connections; retry shortly", "too_many_connections",
                 "service_unavailable_error")
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body})


class _GuardedH11(H11Protocol):
    header_timeout: float | None = DEFAULT_HEADER_TIMEOUT
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS
    _last_capacity_warning = 0.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._partial_head = False
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self.app = _over_capacity   # this connection's request gets a 503, then it closes
            now = time.monotonic()
            if now - _GuardedH11._last_capacity_warning > 10:
                _GuardedH11._last_capacity_warning = now
                logger.warning("over %d open connections: answering new ones with 503 (--max-connections)",
                               self.max_connections)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:   # bytes of a new request's head
            if self._header_timer is None:
                self._arm()
            self._partial_head = True
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:   # a whole request head arrived
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = _json("the request is not valid HTTP/1.1 (a malformed request line, header or Content-Length)",
                     "invalid_http_request")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._partial_head = False
        if self.header_timeout is not None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _head_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
            return
        if self._partial_head:
            body = _json(f"the request headers did not arrive within {self.header_timeout:g} s", "request_timeout")
            self.transport.write(_raw_response(408, "Request Timeout", body))
        self.transport.close()


class TidalServer(uvicorn.Server):
    """uvicorn's server, with `on_drain_timeout` called once `drain_timeout` seconds of graceful
    shutdown have passed (uvicorn's timeout_graceful_shutdown is set CUT_GRACE seconds later)."""

    def __init__(self, config: uvicorn.Config, drain_timeout: float | None = None,
                 on_drain_timeout: Callable[[], None] | None = None):
        super().__init__(config)
        self.drain_timeout, self.on_drain_timeout = drain_timeout, on_drain_timeout

    async def shutdown(self, sockets=None) -> None:
        handle = None
        if self.drain_timeout is not None and self.on_drain_timeout is not None:
            handle = asyncio.get_running_loop().call_later(self.drain_timeout, self.on_drain_timeout)
        try:
            await super().shutdown(sockets)
        finally:
            if handle is not None:
                handle.cancel()


def make_server(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
                timeout_keep_alive: int = DEFAULT_KEEP_ALIVE, header_timeout: float | None = DEFAULT_HEADER_TIMEOUT,
                max_connections: int | None = DEFAULT_MAX_CONNECTIONS, shutdown_timeout: float | None = None,
                **uvicorn_kwargs) -> TidalServer:
    """The server for `app` (build_app's: its ServerContext ends the requests at the drain timeout)."""
    protocol = type("GuardedH11", (_GuardedH11,), {"header_timeout": header_timeout,
                                                    "max_connections": max_connections})
    graceful = None if shutdown_timeout is None else shutdown_timeout + CUT_GRACE
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol, ws="none",
                            timeout_keep_alive=timeout_keep_alive, timeout_graceful_shutdown=graceful,
                            **uvicorn_kwargs)
    ctx = getattr(getattr(app, "state", None), "ctx", None)

    def cut() -> None:
        n = ctx.cut_streams(f"the server is shutting down and its --shutdown-timeout of {shutdown_timeout:g} s "
                            "ran out before this request finished; retry it")
        logger.warning("shutdown timeout (%g s) ran out: ended %d request(s) still in flight with an error",
                       shutdown_timeout, n)
    return TidalServer(config, shutdown_timeout, cut if ctx is not None else None)
