"""The EPP's Envoy side: an `envoy.service.ext_proc.v3.ExternalProcessor` gRPC server around a picker,
and the EPP's small HTTP port (`/metrics`, `/health`).

Owns: the ext_proc conversation for one HTTP request (`Process` stream): read the request headers
and, for a request with a body, the buffered body (the filter runs with `request_body_mode:
BUFFERED`), parse the JSON, call `await picker.pick(RoutingRequest(path, headers, body))`
(docs/fleet.md seam 3) and answer with the header `x-gateway-destination-endpoint: IP:port` and
the dynamic metadata `envoy.lb` / `x-gateway-destination-endpoint` (+ `-fallback`, the first of the
decision's fallbacks: the one retry goes there), as the Gateway API Inference Extension's endpoint
picker protocol says; or, for a `RejectedError`, an `ImmediateResponse` with its status (429/503)
and an OpenAI-style JSON error body. Also the gateway-side counters (`tidal_epp:*`).
Must not: decide anything about routing (the picker does), buffer or see responses (the filter
skips them, so streams pass through Envoy untouched), or start Envoy (gateway.py does).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

import warnings

import grpclib.server

with warnings.catch_warnings():   # envoy_data_plane's generated code trips pydantic deprecation warnings
    warnings.simplefilter("ignore", DeprecationWarning)
    from envoy_data_plane.envoy.config.core.v3 import HeaderValue, HeaderValueOption
    from envoy_data_plane.envoy.service.ext_proc.v3 import (
        BodyResponse, CommonResponse, ExternalProcessorBase, HeaderMutation, HeadersResponse,
        ImmediateResponse, ProcessingResponse)
    from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
    from envoy_data_plane.google.protobuf import Struct
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from tidal.fleet.addresses import is_ip, resolve_endpoint
from tidal.fleet.envoy_config import DESTINATION_HEADER, FALLBACK_KEY, LB_NAMESPACE

from tidal.fleet.epp.request import RejectedError, RoutingRequest

log = logging.getLogger("tidal.fleet.ext_proc")

# On the EPP's own answers that are not routing (rejected, error): which one, for the client's logs.
VERDICT_HEADER = "x-tidal-epp-verdict"
_DNS_TTL_S = 5.0


class EppMetrics:
    """The ext_proc server's counters, in the registry the EPP's /metrics serves."""

    def __init__(self, registry: CollectorRegistry):
        self.decisions = Counter("tidal_epp:decisions", "requests the EPP answered, by outcome",
                                 ["outcome"], registry=registry)
        self.pick_seconds = Histogram("tidal_epp:pick_seconds", "time in picker.pick per request",
                                      buckets=(.0005, .001, .002, .005, .01, .025, .05, .1, .5, 1, 5, 30),
                                      registry=registry)


def _error_body(status: int, message: str, code: str | None = None) -> bytes:
    """OpenAI's error shape, typed as the EPP's rejections and tidal's server type theirs."""
    return RejectedError(status, message, code).body_bytes()


def _headers(req) -> dict[str, str]:
    out = {}
    if req.headers is not None:
        for h in req.headers.headers:
            out[h.key.lower()] = h.value or h.raw_value.decode("utf-8", "replace")
    return out


class ExtProcServer(ExternalProcessorBase):
    """One `Process` stream per HTTP request. `picker` has `async pick(RoutingRequest) -> Decision`."""

    def __init__(self, picker, metrics: EppMetrics | None = None, known: set[str] | None = None):
        self.picker = picker
        self.metrics = metrics
        # The replicas Envoy's cluster holds ('host:port'), when this EPP runs under `tidal gateway`:
        # Envoy would send a request for any other address to its fallback policy, i.e. blindly.
        self.known = known
        self._resolved: dict[str, tuple[str, float]] = {}

    async def _ip(self, endpoint: str) -> str:
        """'host:port' -> 'IP:port', cached for a few seconds (names are re-resolved, as Envoy does)."""
        hit = self._resolved.get(endpoint)
        now = time.monotonic()
        if hit is None or hit[1] < now:
            host = endpoint.rpartition(":")[0]
            ip = resolve_endpoint(endpoint) if is_ip(host) else await asyncio.to_thread(resolve_endpoint, endpoint)
            hit = self._resolved[endpoint] = (ip, now + (1e9 if is_ip(host) else _DNS_TTL_S))
        return hit[0]

    async def process(self, messages):
        headers: dict[str, str] = {}
        body = bytearray()
        async for msg in messages:
            if msg.request_headers is not None:
                headers = _headers(msg.request_headers)
                if msg.request_headers.end_of_stream:
                    yield await self._decide(headers, None, "headers")
                else:
                    yield ProcessingResponse(request_headers=HeadersResponse(response=CommonResponse()))
            elif msg.request_body is not None:
                body += msg.request_body.body
                if msg.request_body.end_of_stream:
                    yield await self._decide(headers, bytes(body), "body")
            # Responses are never sent here (the filter skips them); anything else is ignored.

    async def _decide(self, headers: dict[str, str], raw: bytes | None, phase: str) -> ProcessingResponse:
        try:
            parsed = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            parsed = None   # not JSON: the picker routes on what it has; the replica answers the 400
        t0 = time.perf_counter()
        try:
            decision = await self.picker.pick(RoutingRequest(headers.get(":path", "/"), headers, parsed))
            primary = await self._ip(decision.endpoint)
            fallbacks = [f for f in [await self._ip(f) for f in decision.fallbacks] if f != primary]
            known = None if self.known is None else {await self._ip(k) for k in self.known}
        except RejectedError as e:
            return self._reject(e.status, e.message, "rejected_" + str(e.status), json.dumps(e.body()).encode())
        except Exception as e:   # a picker bug must not turn into blind routing: fail this request closed
            log.exception("picker failed")
            return self._reject(503, f"the endpoint picker failed: {type(e).__name__}: {e}", "error",
                                _error_body(503, f"the endpoint picker failed: {type(e).__name__}: {e}", "epp_error"))
        finally:
            if self.metrics:
                self.metrics.pick_seconds.observe(time.perf_counter() - t0)
        if known is not None:
            if primary not in known:
                message = f"the endpoint picker chose {decision.endpoint}, which is not one of the gateway's replicas"
                return self._reject(503, message, "error", _error_body(503, message, "unknown_endpoint"))
            fallbacks = [f for f in fallbacks if f in known]
        self._count("routed")
        lb = {DESTINATION_HEADER: primary}
        if fallbacks:
            lb[FALLBACK_KEY] = fallbacks[0]
        common = CommonResponse(header_mutation=HeaderMutation(set_headers=[_header(DESTINATION_HEADER, primary)]),
                                clear_route_cache=True)
        meta = Struct.from_dict({LB_NAMESPACE: lb})
        if phase == "headers":
            return ProcessingResponse(request_headers=HeadersResponse(response=common), dynamic_metadata=meta)
        return ProcessingResponse(request_body=BodyResponse(response=common), dynamic_metadata=meta)

    def _reject(self, status: int, message: str, outcome: str, body: bytes | None = None) -> ProcessingResponse:
        """An ImmediateResponse: `status` with an OpenAI-style JSON error body; no replica sees the request."""
        self._count(outcome)
        return ProcessingResponse(immediate_response=ImmediateResponse(
            status=HttpStatus(code=StatusCode(status)),
            headers=HeaderMutation(set_headers=[_header("content-type", "application/json"),
                                                _header(VERDICT_HEADER, outcome)]),
            body=body or _error_body(status, message), details="tidal_epp_" + outcome))

    def _count(self, outcome: str) -> None:
        if self.metrics:
            self.metrics.decisions.labels(outcome).inc()


def _header(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=key, raw_value=value.encode()))


async def start_grpc(picker, host: str, port: int, metrics: EppMetrics | None = None,
                     known: set[str] | None = None) -> grpclib.server.Server:
    """The ext_proc gRPC server, listening once this returns. `known`: see ExtProcServer."""
    server = grpclib.server.Server([ExtProcServer(picker, metrics, known)])
    await server.start(host, port)
    return server


async def start_http(host: str, port: int, registry: CollectorRegistry, healthy=lambda: True) -> asyncio.AbstractServer:
    """The EPP's own HTTP port: `GET /metrics` (Prometheus text of `registry`) and `GET /health`
    (200 while `healthy()`, else 503). A tiny HTTP/1.0-style server: one request per connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) > 1 else ""
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
            elif path == "/health":
                ok = healthy()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain", (b"ok\n" if ok else b"unhealthy\n")
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                         "connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
