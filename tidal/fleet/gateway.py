"""`tidal gateway`: the endpoint picker (EPP) in this process, Envoy in front of it as a child.

Owns: building the picker over the replicas,
starting the EPP's ext_proc gRPC server and its `/metrics` + `/health` port (ext_proc.py), writing
Envoy's bootstrap (envoy_config.py) into a temp dir, starting Envoy and waiting until it is ready
(admin `/ready`), and stopping both (`Gateway`). With --replicas-file it applies every change of
that file (replica_set.py) to the picker, the replicas the EPP may name, and Envoy's EDS file. With `epp_only` it runs just the EPP, for a gateway
already running elsewhere (Istio, Envoy Gateway, GKE). The subcommand's flags and its run-until-signalled
loop are in gateway_cli.py.
Lifetime: Envoy runs in its own session (Ctrl-C reaches the gateway, which stops Envoy first, then
the EPP) with `prctl(PR_SET_PDEATHSIG, SIGKILL)`, so it dies with the gateway even when the gateway
is killed outright. Nothing outlives `tidal gateway`.
Must not: route (the picker decides; Envoy forwards), parse request bodies, or start replicas
(cluster.py does).
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

from tidal.errors import TidalError
from tidal.fleet import replica_set
from tidal.fleet.addresses import resolve_endpoint

log = logging.getLogger("tidal.fleet")
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL):
    """A preexec_fn: the kernel sends `sig` to the child when the thread that started it exits."""
    def preexec() -> None:
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return preexec


def build_picker(replicas: list[str], kv_events: list[str], config: str | None, registry, dynamic: bool = False):
    """The endpoint picker (tidal/fleet/epp/, docs/fleet.md seam 3) over `replicas` ('host:port'),
    each with its KV events endpoint when given; `--config` for the rest (replicas given here
    replace the file's endpoints). Its metrics go to `registry`, beside the ext_proc server's.
    `dynamic` (--replicas-file): the set may start empty and fill later."""
    from tidal.fleet.epp import EndpointPicker, EndpointSpec, load_config
    specs = [EndpointSpec(r, kv_events=kv) for r, kv in zip(replicas, kv_events or [None] * len(replicas))]
    try:
        cfg = load_config(config, endpoints=specs or None)
    except (OSError, ValueError) as e:
        raise TidalError(f"--config {config}: {e}") from None
    if not cfg.endpoints and not dynamic:
        raise TidalError("no replicas: give --replica URL, --replicas-file FILE, or endpoints in --config")
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
    replicas_file: str | None = None       # the replica set follows this file (replica_set.py)


class Gateway:
    """The EPP servers plus (unless epp_only) the Envoy child. `await start()`, then `await stop()`."""

    def __init__(self, settings: GatewaySettings, picker=None):
        self.s = settings
        self.picker = picker
        self.envoy: subprocess.Popen | None = None
        self._grpc = self._http = self._watcher = None
        self._dir: str | None = None
        self._known: set[str] | None = None    # the ext_proc server's known replicas (None: any)
        self._eds: str | None = None           # Envoy's EDS file, with --replicas-file
        self._eds_version = 0

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
            entries = None
            if self.s.replicas_file:
                entries = replica_set.read_replicas_file(self.s.replicas_file)
                self.s.replicas, self.s.kv_events = [a for a, _ in entries], [kv for _, kv in entries]
            if self.picker is None:
                self.picker = build_picker(self.s.replicas, self.s.kv_events, self.s.config, registry,
                                           dynamic=entries is not None)
                if not self.s.replicas:
                    self.s.replicas = [e.address for e in self.picker.config.endpoints]
            start = getattr(self.picker, "start", None)
            if start is not None:
                await start()
            metrics = ext_proc.EppMetrics(registry)
            pool = getattr(self.picker, "pool", None)
            healthy = (lambda: bool(pool.healthy())) if pool is not None else (lambda: True)
            self._known = None if self.s.epp_only else set(self.s.replicas)
            self._grpc = await ext_proc.start_grpc(self.picker, self.s.epp_host, self.s.epp_port, metrics, self._known)
            self._http = await ext_proc.start_http(self.s.epp_host, self.s.metrics_port, registry, healthy)
            if entries is not None:
                self._watcher = replica_set.ReplicaFileWatcher(self.s.replicas_file, self._apply, entries)
            if self.s.epp_only:
                if self._watcher is not None:
                    self._watcher.start()
                return
            ports = envoy_config.GatewayPorts(self.s.port, self.s.epp_port, self.s.admin_port, self.s.host)
            binary = envoy_config.envoy_binary()
            self._dir = tempfile.mkdtemp(prefix="tidal-gateway-")
            if entries is not None:
                self._eds = os.path.join(self._dir, "replicas_eds.json")
                self._write_eds([resolve_endpoint(r) for r in self.s.replicas])
            config = envoy_config.bootstrap(self.s.replicas, ports, eds_path=self._eds)
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
            if self._watcher is not None:
                self._watcher.start()
        except BaseException:
            await self.stop()
            raise

    def _write_eds(self, addresses: list[str]) -> None:
        """Envoy's EDS file with these resolved 'IP:port' addresses."""
        from tidal.fleet.envoy_config import REPLICA_CLUSTER
        self._eds_version += 1
        replica_set.write_eds(self._eds, REPLICA_CLUSTER, addresses, self._eds_version)

    def _apply(self, entries: list[replica_set.Entry]) -> None:
        """--replicas-file changed: the picker, the known set and Envoy's EDS file follow it. A replica
        whose name does not resolve is left out (with a warning) until the file changes again."""
        from tidal.fleet.epp import EndpointSpec
        wanted, resolved = {}, []
        for address, kv in entries:
            try:
                resolved.append(resolve_endpoint(address))
            except TidalError as e:
                log.warning("--replicas-file: %s; leaving it out", e)
                continue
            wanted[address] = kv
        have = dict(zip(self.s.replicas, self.s.kv_events or [None] * len(self.s.replicas)))
        if hasattr(self.picker, "add_endpoint"):   # (a test's stand-in picker routes on its own)
            for address in [a for a in have if wanted.get(a, "-") != have[a]]:   # gone, or its KV events moved
                self.picker.remove_endpoint(address)
            for address, kv in wanted.items():
                if have.get(address, "-") != kv:
                    self.picker.add_endpoint(EndpointSpec(address, kv_events=kv))
        self.s.replicas, self.s.kv_events = list(wanted), list(wanted.values())
        if self._known is not None:
            self._known.clear()
            self._known.update(wanted)
        if self._eds is not None:
            self._write_eds(resolved)
        log.info("replicas now: %s", ", ".join(self.s.replicas) or "none")

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
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
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
