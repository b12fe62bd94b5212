"""What `tidal gateway` (Envoy + the ext_proc EPP) adds to a request's time to first token, at low load.

One client sends streaming /v1/completions requests one at a time, alternating between a replica
directly and the same replica through `tidal gateway`, and reports TTFT (request sent -> first SSE
event) p50/p90 for both and the p50 difference. The replica is a stub SSE server in its own process
(its first event is immediate, so the difference is the gateway's), or `--replica URL` (a real
`tidal serve`). The gateway runs as `python -m tidal.cli gateway` in its own process, with its real
endpoint picker (tidal/fleet/epp/: tokenizes the prompt, scores prefix / queue / KV cache).

    python bench/gateway_overhead.py [--requests 300] [--replica http://127.0.0.1:8000]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stub(port: int) -> None:
    """A replica that answers every POST with a 3-event SSE stream, first event at once."""
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def setup(self):
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as uvicorn does

        def do_GET(self):   # /health, /v1/models and /metrics as the EPP reads them (docs/fleet.md seam 2)
            body = {"/metrics": b"tidal:num_requests_waiting 0\ntidal:num_requests_running 0\n"
                                b"tidal:kv_cache_usage_perc 0\n",
                    "/v1/models": b'{"object": "list", "data": [{"id": "smollm2", "object": "model"}]}'
                    }.get(self.path, b'{"ok": true}')
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for data in (b'data: {"choices": [{"text": "a"}]}\n\n', b'data: {"choices": [{"text": "b"}]}\n\n',
                         b"data: [DONE]\n\n", b""):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

    srv = ThreadingHTTPServer(("127.0.0.1", port), H)
    srv.daemon_threads = True
    srv.serve_forever()


def ttft(client, url: str, body: dict) -> float:
    t0 = time.perf_counter()
    t = None
    with client.stream("POST", url, json=body) as r:
        for line in r.iter_lines():
            if t is None and line.startswith("data:"):
                t = time.perf_counter() - t0
    return t


def wait_http(url: str, timeout: float) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300, help="requests per path (default 300)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--replica", default=None, help="a running replica's URL (default: start a stub)")
    ap.add_argument("--envoy-concurrency", type=int, default=1)
    ap.add_argument("--stub-port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stub_port:
        return run_stub(args.stub_port)

    import httpx
    procs = []
    try:
        if args.replica is None:
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, __file__, "--stub-port", str(port)]))
            replica = f"http://127.0.0.1:{port}"
        else:
            replica = args.replica.rstrip("/")
        wait_http(replica + "/health", 30)
        gw_port = free_port()
        gw = subprocess.Popen([sys.executable, "-m", "tidal.cli", "gateway", "--replica", replica,
                               "--port", str(gw_port), "--epp-port", str(free_port()),
                               "--metrics-port", str(free_port()), "--admin-port", str(free_port()), "--envoy-concurrency", str(args.envoy_concurrency)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
        procs.append(gw)
        line = gw.stdout.readline()
        if "tidal gateway: http://" not in line:
            raise SystemExit(f"the gateway did not start: {line}")
        gateway = f"http://127.0.0.1:{gw_port}"
        body = {"model": "smollm2", "prompt": "The quick brown fox", "max_tokens": 2, "stream": True}
        direct, through = [], []
        with httpx.Client(timeout=30) as client:
            for _ in range(args.warmup):
                ttft(client, replica + "/v1/completions", body)
                ttft(client, gateway + "/v1/completions", body)
            for _ in range(args.requests):
                direct.append(ttft(client, replica + "/v1/completions", body))
                through.append(ttft(client, gateway + "/v1/completions", body))

        def q(xs, p):
            return statistics.quantiles(xs, n=100)[p - 1] * 1e3
        report = {
            "requests": args.requests, "replica": "stub" if args.replica is None else args.replica,
            "direct_ttft_ms": {"p50": round(q(direct, 50), 3), "p90": round(q(direct, 90), 3)},
            "gateway_ttft_ms": {"p50": round(q(through, 50), 3), "p90": round(q(through, 90), 3)},
            "overhead_p50_ms": round(q(through, 50) - q(direct, 50), 3),
        }
        print(json.dumps(report, indent=1))
    finally:
        for p in procs:   # the gateway stops Envoy and its EPP on SIGINT; the stub just ends
            p.send_signal(signal.SIGINT if "gateway" in p.args else signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
