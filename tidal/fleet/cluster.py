"""`tidal cluster up`: N `tidal serve` replicas on this machine and `tidal gateway` in front of them.

Owns: the replicas' ports (`--base-port P`: replica i serves HTTP on P+i and publishes KV events
on P+N+i, `--kv-events-endpoint`), starting them as children, waiting for
each `/health`, then running the gateway (gateway.py) in this process over them, printing the
endpoints, and on Ctrl-C / SIGTERM stopping the gateway, then the replicas (SIGTERM, then SIGKILL
after their drain time). Each replica runs in its own session (Ctrl-C reaches only this process,
which stops them in order) with `prctl(PR_SET_PDEATHSIG, SIGTERM)`, so they die with it even when it
is killed outright. Nothing is left running.
Must not: serve requests or route (the replicas and the gateway do), or parse engine flags (the
replicas' own `tidal serve` does; extra flags after `--` go to each replica as they are).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import urllib.request

from tidal.errors import TidalError


class Replicas:
    """The replica children: start(), wait_healthy(), stop()."""

    def __init__(self, n: int, model: str, base_port: int, host: str = "127.0.0.1", simulate: bool = False,
                 extra: list[str] | None = None):
        self.n, self.model, self.base_port, self.host = n, model, base_port, host
        self.simulate, self.extra = simulate, extra or []
        self.procs: list[subprocess.Popen] = []

    def url(self, i: int) -> str:
        return f"http://{self.host}:{self.base_port + i}"

    def kv_endpoint(self, i: int) -> str:
        return f"tcp://{self.host}:{self.base_port + self.n + i}"

    def command(self, i: int) -> list[str]:
        cmd = [sys.executable, "-m", "tidal.cli", "serve", "--model", self.model,
               "--host", self.host, "--port", str(self.base_port + i)]
        if self.simulate:
            cmd.append("--simulate")
        return cmd + ["--kv-events-endpoint", f"tcp://*:{self.base_port + self.n + i}"] + self.extra

    def start(self) -> None:
        from tidal.fleet.gateway import die_with_parent
        for i in range(self.n):
            self.procs.append(subprocess.Popen(self.command(i), stdin=subprocess.DEVNULL, start_new_session=True,
                                               preexec_fn=die_with_parent(signal.SIGTERM)))

    async def wait_healthy(self, timeout: float, stopping: asyncio.Event) -> None:
        deadline = time.monotonic() + timeout
        pending = set(range(self.n))
        while pending:
            for i in sorted(pending):
                if self.procs[i].poll() is not None:
                    raise TidalError(f"replica {i} ({self.url(i)}) exited with code {self.procs[i].returncode} "
                                     "before it was healthy")
                with contextlib.suppress(OSError):
                    if await asyncio.to_thread(_healthy, self.url(i) + "/health"):
                        pending.discard(i)
            if stopping.is_set():
                raise KeyboardInterrupt
            if time.monotonic() > deadline:
                raise TidalError(f"replicas {sorted(pending)} not healthy after {timeout:g} s")
            if pending:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), 0.2)

    def exited(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p.poll() is not None]

    def stop(self, grace: float = 30.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as r:
        return r.status == 200


async def _up(args: argparse.Namespace, extra: list[str]) -> int:
    from tidal.fleet.gateway import Gateway
    from tidal.fleet.gateway_cli import print_ready, settings_from_args
    reps = Replicas(args.replicas, args.model, args.base_port, args.replica_host, args.simulate, extra)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    gateway = None
    try:
        reps.start()
        print(f"tidal cluster: starting {args.replicas} replica(s) of {args.model}"
              f"{' (simulated)' if args.simulate else ''}...", file=sys.stderr, flush=True)
        await reps.wait_healthy(args.start_timeout, stopping)
        kv_events = [reps.kv_endpoint(i) for i in range(reps.n)]
        s = settings_from_args(args, [reps.url(i).split("://")[1] for i in range(reps.n)], kv_events)
        gateway = Gateway(s)
        await gateway.start()
        for i in range(reps.n):
            print(f"  replica {i}: {reps.url(i)}  kv events {reps.kv_endpoint(i)}", flush=True)
        print_ready(s, gateway.url)
        print(f"tidal cluster: up; OpenAI API at {gateway.url}/v1 (Ctrl-C stops everything)", flush=True)
        while not stopping.is_set():
            if reps.exited() or gateway.envoy_exited():
                print(f"tidal cluster: a process exited (replicas {reps.exited()}, "
                      f"envoy {'exited' if gateway.envoy_exited() else 'running'}); stopping", file=sys.stderr)
                return 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.5)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if gateway is not None:
            await gateway.stop()
        await asyncio.to_thread(reps.stop, args.stop_timeout)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print("tidal cluster: stopped", file=sys.stderr, flush=True)


def add_cluster_parser(sub) -> argparse.ArgumentParser:
    from tidal.fleet.gateway_cli import add_gateway_flags, port
    p = sub.add_parser("cluster", help="run replicas and a gateway on this machine")
    csub = p.add_subparsers(dest="cluster_command", required=True)
    up = csub.add_parser("up", help="start N tidal serve replicas and tidal gateway in front; Ctrl-C stops all",
                         epilog="Arguments after `--` go to every replica's `tidal serve`.")
    up.add_argument("--replicas", type=int, default=2, help="how many replicas (default 2)")
    up.add_argument("--model", default="smollm2", help="the replicas' --model (default smollm2)")
    up.add_argument("--simulate", action="store_true", help="simulated replicas (no model compute)")
    up.add_argument("--base-port", type=port, default=8000,
                    help="replica i serves on BASE+i, its KV events on BASE+N+i (default 8000)")
    up.add_argument("--replica-host", default="127.0.0.1", help="address the replicas bind (default loopback)")
    up.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for the replicas' /health")
    up.add_argument("replica_args", nargs="*", metavar="-- SERVE_ARGS", help="flags for every replica's tidal serve")
    up.add_argument("--stop-timeout", type=float, default=30.0, help="seconds replicas get to drain on stop")
    add_gateway_flags(up)
    up.set_defaults(func=run_cluster_up)
    return p


def run_cluster_up(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        raise TidalError("--replicas must be at least 1")
    from tidal.fleet.gateway_cli import configure_logging
    extra = list(getattr(args, "replica_args", None) or [])
    configure_logging(args.log_level)
    return asyncio.run(_up(args, extra))
