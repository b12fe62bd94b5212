"""`tidal gateway`'s command line: its flags (shared with `tidal cluster up`), and running a `Gateway`
(gateway.py) until SIGINT/SIGTERM or until Envoy dies, then stopping it.

Owns: `add_gateway_parser` / `add_gateway_flags`, `settings_from_args`, `print_ready`,
`serve_until_signalled` and `configure_logging` (the EPP's `--log-level`). Must not: start Envoy or the EPP itself (gateway.py does).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from tidal.errors import TidalError
from tidal.fleet.addresses import endpoint_of
from tidal.fleet.gateway import Gateway, GatewaySettings


def port(text: str) -> int:
    """argparse type: a TCP port."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0..65535)")
    return int(text)


def configure_logging(level: str) -> None:
    """tidal's own loggers (the EPP's: each decision and its scores at debug) to stderr at `level`;
    other libraries stay at warning."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("tidal")
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


async def serve_until_signalled(gateway: Gateway, on_ready=None) -> int:
    """Start the gateway, call on_ready(), run until SIGINT/SIGTERM (or Envoy dies), stop it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
        if on_ready:
            on_ready()
        while not stop.is_set():
            if gateway.envoy_exited():
                print(f"tidal gateway: envoy exited (code {gateway.envoy.returncode}):\n{gateway.envoy_log_tail()}",
                      file=sys.stderr)
                return 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        return 0
    finally:
        await gateway.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def settings_from_args(args: argparse.Namespace, replicas: list[str], kv_events: list[str]) -> GatewaySettings:
    return GatewaySettings(
        replicas=replicas, kv_events=kv_events, config=args.config, host=args.host, port=args.port,
        epp_host=args.epp_host, epp_port=args.epp_port, metrics_port=args.metrics_port,
        admin_port=args.admin_port, epp_only=getattr(args, "epp_only", False),
        envoy_concurrency=args.envoy_concurrency, envoy_log_level=args.envoy_log_level)


def print_ready(s: GatewaySettings, url: str) -> None:
    if s.epp_only:
        print(f"tidal gateway: EPP ext_proc on grpc://{s.epp_host}:{s.epp_port} "
              f"(metrics http://{s.epp_host}:{s.metrics_port}/metrics)", flush=True)
    else:
        follow = f", following {s.replicas_file}" if s.replicas_file else ""
        print(f"tidal gateway: {url} -> {len(s.replicas)} replica(s){follow} "
              f"(EPP metrics http://{s.epp_host}:{s.metrics_port}/metrics, "
              f"envoy admin http://127.0.0.1:{s.admin_port})", flush=True)


def add_gateway_flags(p: argparse.ArgumentParser) -> None:
    """The gateway's own flags (shared with `tidal cluster up`)."""
    p.add_argument("--config", default=None, help="endpoint picker config file (YAML)")
    p.add_argument("--host", default="127.0.0.1", help="address the gateway listens on (default: loopback)")
    p.add_argument("--port", type=port, default=8080, help="gateway port (default 8080)")
    p.add_argument("--epp-host", default="127.0.0.1", help="address of the EPP's gRPC and metrics ports")
    p.add_argument("--epp-port", type=port, default=9002, help="EPP ext_proc gRPC port (default 9002)")
    p.add_argument("--metrics-port", type=port, default=9003, help="EPP /metrics and /health port (default 9003)")
    p.add_argument("--admin-port", type=port, default=9901, help="Envoy admin port on localhost (default 9901)")
    p.add_argument("--envoy-concurrency", type=int, default=None, help="Envoy worker threads (default: one per core)")
    p.add_argument("--envoy-log-level", default="warn", help="Envoy's log level (its log is in the gateway's temp dir)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="the EPP's log level (debug: every routing decision with its scores)")


def add_gateway_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("gateway", help="Envoy + the endpoint picker in front of tidal serve replicas")
    p.add_argument("--replica", action="append", default=[], metavar="URL",
                   help="a replica's URL (http://HOST:PORT); repeat for each (or endpoints in --config)")
    p.add_argument("--kv-events", action="append", default=[], metavar="ENDPOINT",
                   help="the matching replica's KV events endpoint (tcp://HOST:PORT), in --replica order")
    p.add_argument("--replicas-file", default=None, metavar="FILE",
                   help="the replicas, one per line ('URL [tcp://KV-EVENTS]', '#' comments), re-read whenever "
                        "the file changes: replicas join and leave while the gateway runs (instead of --replica)")
    p.add_argument("--epp-only", action="store_true",
                   help="run only the EPP (ext_proc gRPC) for a gateway you already run")
    add_gateway_flags(p)
    p.set_defaults(func=run_gateway)
    return p


def run_gateway(args: argparse.Namespace) -> int:
    replicas = [endpoint_of(u) for u in args.replica]
    if args.kv_events and len(args.kv_events) != len(replicas):
        raise TidalError("give one --kv-events per --replica, in the same order")
    if args.replicas_file and (replicas or args.kv_events):
        raise TidalError("give the replicas either as --replica flags or in --replicas-file, not both")
    s = settings_from_args(args, replicas, args.kv_events)
    s.replicas_file = args.replicas_file
    configure_logging(args.log_level)
    gw = Gateway(s)
    return asyncio.run(serve_until_signalled(gw, lambda: print_ready(s, gw.url)))
