"""Replica addresses: a URL or 'host:port' as users give it, and the resolved 'IP:port' that Envoy's
override_host matches.

Owns: `endpoint_of` (URL -> 'host:port'), `is_ip`, `resolve_endpoint` (IPv4 first, as the replica
cluster's DNS lookups), `join_host_port` and `socket_address` (Envoy's SocketAddress for 'IP:port').
Must not: import the rest of the fleet.
"""
from __future__ import annotations

import socket

from tidal.errors import TidalError


def endpoint_of(url: str) -> str:
    """'http://host:port/...' or 'host:port' -> 'host:port'."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    if ":" not in rest.lstrip("[").split("]")[-1]:
        raise TidalError(f"replica {url!r} has no port (expected http://HOST:PORT)")
    return rest


def is_ip(host: str) -> bool:
    host = host.strip("[]")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except OSError:
        return False


def join_host_port(ip: str, port: str) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def resolve_endpoint(endpoint: str) -> str:
    """'host:port' -> 'IP:port' (IPv6 in brackets; IPv4 first, as the cluster's DNS lookups):
    Envoy matches override hosts by address only."""
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if is_ip(host):
        return join_host_port(host, port)
    for family in (socket.AF_INET, socket.AF_UNSPEC):
        try:
            return join_host_port(socket.getaddrinfo(host, int(port), family, socket.SOCK_STREAM)[0][4][0], port)
        except (OSError, ValueError) as e:
            err = e
    raise TidalError(f"cannot resolve replica address {endpoint!r}: {err}")


def socket_address(endpoint: str) -> dict:
    """'IP:port' -> Envoy's SocketAddress."""
    host, _, port = endpoint.rpartition(":")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}
