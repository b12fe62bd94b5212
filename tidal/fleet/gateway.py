"""`tidal gateway`: the endpoint picker (EPP) in this process, Envoy in front of it as a child.

Owns: the subcommand's flags (`add_gateway_parser`), building the picker over the replicas,
starting the EPP's ext_proc gRPC server and its `/metrics` + `/health` port (ext_proc.py), writing
Envoy's bootstrap (envoy_config.py) into a temp dir, starting Envoy and waiting until it is ready
(admin `/ready`), and stopping both on SIGINT/SIGTERM. `--epp-only` runs just the EPP, for a gateway
already running elsewhere (Istio, Envoy Gateway, GKE), and prints the ext_proc address.
Lifetime: Envoy runs in its own session (Ctrl-C reaches the gateway, which stops Envoy first, then
the EPP) with `prctl(PR_SET_PDEATHSIG, SIGKILL)`, so it dies with the gateway even when the gateway
is killed outright. Nothing outlives `tidal gateway`.
Must not: route (the picker decides; Envoy forwards), parse request bodies, or start replicas
(cluster.py does).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

from tidal.errors import TidalError

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL):
    """A preexec_fn: the kernel sends `sig` to the child when the thread that started it exits."""
    def preexec() -> None:
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return preexec


def port(text: str) -> int:
    """argparse type: a TCP port."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0..65535)")
    return int(text)


def endpoint_of(url: str) -> str:
    """'http://host:port/...' or 'host:port' -> 'host:port'."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    if ":" not in rest.lstrip("[").split("]")[-1]:
        raise TidalError(f"replica {url!r} has no port (expected http://HOST:PORT)")
    return rest


def build_picker(replicas: list[str], kv_events: list[str], config: str | None, registry):
    """The endpoint picker (tidal/fleet/epp/, docs/fleet.md seam 3) over `replicas` ('host:port'),
    each with its KV events endpoint when given; `--config` for the rest (replicas given here
    replace the file's endpoints). Its metrics go to `registry`, beside the ext_proc server's."""
    from tidal.fleet.epp import EndpointPicker, EndpointSpec, load_config
    specs = [EndpointSpec(r, kv_events=kv) for r, kv in zip(replicas, kv_events or [None] * len(replicas))]
    try:
        cfg = load_config(config, endpoints=specs or None)
    except (OSError, ValueError) as e:
        raise TidalError(f"--config {config}: {e}") from None
    if not cfg.endpoints:
        raise TidalError("no replicas: give --replica URL (or endpoints in --config)")
    return EndpointPicker(cfg, registry=registry)


@dataclass
class GatewaySettings:
    replicas: list[str]                    # 'host:port'
    kv_events: list[str] = field(default_factory=list)
    config: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    epp_host: str = "127.0.0.1"
    epp_port: int = 9002
    metrics_port: int = 9003
    admin_port: int = 9901
    epp_only: bool = False
    envoy_concurrency: int | None = None
    envoy_log_level: str = "warn"


class Gateway:
    """The EPP servers plus (unless epp_only) the Envoy child. `await start()`, then `await stop()`."""

    def __init__(self, settings: GatewaySettings, picker=None):
        self.s = settings
        self.picker = picker
        self.envoy: subprocess.Popen | None = None
        self._grpc = self._http = None
        self._dir: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.s.host}:{self.s.port}"

    async def start(self, ready_timeout: float = 30.0) -> None:
        from prometheus_client import CollectorRegistry

        from tidal.fleet import envoy_config
        try:
            from tidal.fleet import ext_proc
        except ImportError as e:
            raise TidalError(f"the gateway's EPP needs envoy-data-plane and grpclib (Python 3.11+): {e}") from None
        try:
            registry = CollectorRegistry()
            if self.picker is None:
                self.picker = build_picker(self.s.replicas, self.s.kv_events, self.s.config, registry)
                if not self.s.replicas:
                    self.s.replicas = [e.address for e in self.picker.config.endpoints]
            start = getattr(self.picker, "start", None)
            if start is not None:
                await start()
            metrics = ext_proc.EppMetrics(registry)
            pool = getattr(self.picker, "pool", None)
            healthy = (lambda: bool(pool.healthy())) if pool is not None else (lambda: True)
            known = None if self.s.epp_only else set(self.s.replicas)
            self._grpc = await ext_proc.start_grpc(self.picker, self.s.epp_host, self.s.epp_port, metrics, known)
            self._http = await ext_proc.start_http(self.s.epp_host, self.s.metrics_port, registry, healthy)
            if self.s.epp_only:
                return
            ports = envoy_config.GatewayPorts(self.s.port, self.s.epp_port, self.s.admin_port, self.s.host)
            config = envoy_config.bootstrap(self.s.replicas, ports)
            binary = envoy_config.envoy_binary()
            self._dir = tempfile.mkdtemp(prefix="tidal-gateway-")
            path = os.path.join(self._dir, "envoy.yaml")
            with open(path, "w") as f:
                f.write(envoy_config.to_yaml(config))
            cmd = [binary, "-c", path, "--disable-hot-restart", "--log-level", self.s.envoy_log_level,
                   "--log-path", os.path.join(self._dir, "envoy.log")]
            if self.s.envoy_concurrency:
                cmd += ["--concurrency", str(self.s.envoy_concurrency)]
            self.envoy = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                                          preexec_fn=die_with_parent())
            await self._wait_ready(ready_timeout)
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self, timeout: float) -> None:
        url = f"http://127.0.0.1:{self.s.admin_port}/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.envoy.poll() is not None:
                raise TidalError(f"envoy exited with code {self.envoy.returncode} at start-up:\n"
                                 f"{self.envoy_log_tail()}")
            try:
                ok = await asyncio.to_thread(_get_ok, url)
            except OSError:
                ok = False
            if ok:
                return
            await asyncio.sleep(0.05)
        raise TidalError(f"envoy was not ready after {timeout:g} s:\n{self.envoy_log_tail()}")

    def envoy_log_tail(self, lines: int = 20) -> str:
        try:
            with open(os.path.join(self._dir or "", "envoy.log")) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no envoy log)"

    def envoy_exited(self) -> bool:
        return self.envoy is not None and self.envoy.poll() is not None

    async def stop(self) -> None:
        """Envoy first (no new requests reach a stopped EPP), then the EPP's servers."""
        if self.envoy is not None and self.envoy.poll() is None:
            self.envoy.terminate()
            try:
                await asyncio.to_thread(self.envoy.wait, 5)
            except subprocess.TimeoutExpired:
                self.envoy.kill()
                await asyncio.to_thread(self.envoy.wait)
        if self._grpc is not None:
            self._grpc.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._grpc.wait_closed(), 2)
            self._grpc = None
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        stop = getattr(self.picker, "stop", None)
        if stop is not None:
            await stop()


def _get_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as r:
        return r.status == 200


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
        print(f"tidal gateway: {url} -> {len(s.replicas)} replica(s) "
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


def add_gateway_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("gateway", help="Envoy + the endpoint picker in front of tidal serve replicas")
    p.add_argument("--replica", action="append", default=[], metavar="URL",
                   help="a replica's URL (http://HOST:PORT); repeat for each (or endpoints in --config)")
    p.add_argument("--kv-events", action="append", default=[], metavar="ENDPOINT",
                   help="the matching replica's KV events endpoint (tcp://HOST:PORT), in --replica order")
    p.add_argument("--epp-only", action="store_true",
                   help="run only the EPP (ext_proc gRPC) for a gateway you already run")
    add_gateway_flags(p)
    p.set_defaults(func=run_gateway)
    return p


def run_gateway(args: argparse.Namespace) -> int:
    replicas = [endpoint_of(u) for u in args.replica]
    if args.kv_events and len(args.kv_events) != len(replicas):
        raise TidalError("give one --kv-events per --replica, in the same order")
    s = settings_from_args(args, replicas, args.kv_events)
    gw = Gateway(s)
    return asyncio.run(serve_until_signalled(gw, lambda: print_ready(s, gw.url)))
