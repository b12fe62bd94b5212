"""tidal gateway (issue #13's data plane): the real Envoy, the ext_proc server and stub upstreams.

Stub replicas are tiny OpenAI-ish HTTP servers in threads (JSON and SSE); the picker is a stand-in
with the EPP's interface (docs/fleet.md seam 3) that the test steers. Checks: the request reaches
the endpoint the picker chose (body seen by the picker), SSE passes through unbuffered, a picker
rejection reaches the client as its status + JSON body, the EPP down fails closed with a 503, a
refused connection is retried once on the fallback replica (and with both refusing, Envoy's 503
is OpenAI JSON), and `tidal gateway` / `tidal cluster up` start and stop with nothing left behind.
"""
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("envoy")
pytest.importorskip("grpclib")

from tidal.fleet import addresses, envoy_config, ext_proc  # noqa: E402
from tidal.fleet.gateway import Gateway, GatewaySettings  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(n: int) -> int:
    """The first of `n` consecutive free ports, below Linux's ephemeral range (32768+), where the
    kernel's own picks (client sockets, other tests' servers) cannot take the later ones meanwhile."""
    import random
    for _ in range(200):
        base = random.randrange(20000, 32000 - n)
        try:
            with contextlib.ExitStack() as stack:
                for p in range(base, base + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


class Stub:
    """An OpenAI-ish replica: JSON for a plain request, SSE for "stream": true; the second SSE event
    waits for `release` (so a test sees whether the first one got through before the upstream ended)."""

    def __init__(self, name: str):
        self.name, self.requests, self.release = name, [], threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _reply(self, status, body: bytes, ctype="application/json"):
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):   # what the EPP polls (seam 2), then a plain GET
                if self.path == "/metrics":
                    return self._reply(200, b"tidal:num_requests_waiting 0\ntidal:num_requests_running 0\n"
                                            b"tidal:kv_cache_usage_perc 0\n", "text/plain; version=0.0.4")
                if self.path == "/health":
                    return self._reply(200, b"{}")
                if self.path == "/v1/models":
                    return self._reply(200, b'{"object": "list", "data": [{"id": "smollm2", "object": "model"}]}')
                stub.requests.append((self.path, dict(self.headers), None))
                self._reply(200, json.dumps({"served_by": stub.name, "path": self.path}).encode())

            def do_POST(self):
                n = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(n) or b"null")
                stub.requests.append((self.path, dict(self.headers), body))
                if not (isinstance(body, dict) and body.get("stream")):
                    return self._reply(200, json.dumps({"served_by": stub.name, "echo": body}).encode())
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()

                def chunk(data: bytes):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                chunk(b'data: {"served_by": "%s", "n": 1}\n\n' % stub.name.encode())
                stub.release.wait(10)
                chunk(b'data: {"n": 2}\n\n')
                chunk(b"data: [DONE]\n\n")
                chunk(b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SteeredPicker:
    """The EPP's interface; `route(request) -> (endpoint, fallbacks)` or raises RejectedError."""

    def __init__(self, route):
        self.route, self.seen = route, []

    async def pick(self, request):
        self.seen.append(request)
        endpoint, fallbacks = self.route(request)
        return type("Decision", (), {"endpoint": endpoint, "fallbacks": fallbacks, "scores": {}})()


class Loop:
    """An asyncio loop in a thread, for the EPP and the gateway object."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def env():
    stubs = [Stub("a"), Stub("b"), Stub("c")]
    dead, dead2 = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"    # nothing listens: connection refused
    picker = SteeredPicker(lambda r: (stubs[0].endpoint, []))
    s = GatewaySettings(replicas=[st.endpoint for st in stubs] + [dead, dead2], port=free_port(), epp_port=free_port(),
                        metrics_port=free_port(), admin_port=free_port(), envoy_concurrency=1)
    loop = Loop()
    gw = Gateway(s, picker=picker)
    loop.run(gw.start())
    client = httpx.Client(base_url=gw.url, timeout=10)
    try:
        yield {"stubs": stubs, "dead": dead, "dead2": dead2, "picker": picker, "gw": gw, "loop": loop, "client": client}
    finally:
        client.close()
        loop.run(gw.stop())
        loop.close()
        for st in stubs:
            st.close()


def test_routes_to_the_picked_endpoint_with_the_body(env):
    stubs, picker, client = env["stubs"], env["picker"], env["client"]
    for target in (1, 2, 0):
        picker.route = lambda r, t=target: ("localhost:" + stubs[t].endpoint.split(":")[1], [])
        body = {"model": "m", "messages": [{"role": "user", "content": f"hi {target}"}]}
        r = client.post("/v1/chat/completions", json=body, headers={"x-user": "u1"})
        assert r.status_code == 200, r.text
        assert r.json() == {"served_by": stubs[target].name, "echo": body}
        seen = picker.seen[-1]
        assert seen.path == "/v1/chat/completions" and seen.body == body and seen.headers["x-user"] == "u1"
        assert stubs[target].requests[-1][1]["x-gateway-destination-endpoint"] == stubs[target].endpoint
    # A request without a body is decided on its headers.
    picker.route = lambda r: (stubs[1].endpoint, [])
    r = client.get("/v1/other")
    assert r.status_code == 200 and r.json()["served_by"] == "b" and picker.seen[-1].body is None


def test_sse_streams_through_unbuffered(env):
    stub, picker, client = env["stubs"][2], env["picker"], env["client"]
    picker.route = lambda r: (stub.endpoint, [])
    stub.release.clear()
    t0 = time.monotonic()
    with client.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        # The upstream still holds the rest back: the first event came through on its own.
        assert json.loads(first[len("data: "):]) == {"served_by": "c", "n": 1}
        assert not stub.release.is_set() and time.monotonic() - t0 < 5
        stub.release.set()
        rest = [line for line in lines if line]
    assert rest == ['data: {"n": 2}', "data: [DONE]"]


@pytest.mark.parametrize("status", [429, 503])
def test_rejection_reaches_the_client_as_openai_json(env, status):
    picker, client = env["picker"], env["client"]

    def reject(r):
        raise ext_proc.RejectedError(status, "queue full" if status == 429 else "no healthy endpoint")
    picker.route = reject
    n = sum(len(s.requests) for s in env["stubs"])
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]     # the picker's own error body, as it made it
    assert err["message"] in ("queue full", "no healthy endpoint") and err["type"] and "param" in err
    assert sum(len(s.requests) for s in env["stubs"]) == n    # no replica saw it


def test_an_endpoint_outside_the_gateway_is_refused_not_routed_blindly(env):
    env["picker"].route = lambda r: ("127.0.0.1:1", [])
    n = sum(len(s.requests) for s in env["stubs"])
    r = env["client"].post("/v1/completions", json={"prompt": "p"})
    assert r.status_code == 503 and "not one of the gateway's replicas" in r.json()["error"]["message"]
    assert sum(len(s.requests) for s in env["stubs"]) == n


def test_refused_connection_is_retried_once_on_the_fallback(env):
    stubs, picker, client, dead = env["stubs"], env["picker"], env["client"], env["dead"]
    picker.route = lambda r: (dead, [stubs[1].endpoint, stubs[2].endpoint])
    r = client.post("/v1/completions", json={"prompt": "retry me"})
    assert r.status_code == 200 and r.json()["served_by"] == "b"
    stats = httpx.get(f"http://127.0.0.1:{env['gw'].s.admin_port}/stats?filter=tidal_replicas.upstream_rq_retry$").text
    assert "upstream_rq_retry: 1" in stats.replace("cluster.tidal_replicas.", ""), stats


def test_replica_and_fallback_both_failing_is_an_openai_json_503(env):
    """Envoy's own 503 (connect failure, retry exhausted) gets OpenAI's error shape, not Envoy's text."""
    env["picker"].route = lambda r: (env["dead"], [env["dead2"]])
    r = env["client"].post("/v1/completions", json={"prompt": "nobody home"})
    assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
    err = r.json()["error"]
    assert err["code"] == "upstream_failure" and err["type"] == "service_unavailable_error"
    assert "failed before it responded" in err["message"] and "param" in err


def test_epp_metrics_and_health(env):
    s = env["gw"].s
    m = httpx.get(f"http://127.0.0.1:{s.metrics_port}/metrics").text
    assert 'tidal_epp:decisions_total{outcome="routed"}' in m and "tidal_epp:pick_seconds_bucket" in m
    assert httpx.get(f"http://127.0.0.1:{s.metrics_port}/health").status_code == 200


def test_epp_down_fails_closed_with_503(tmp_path):
    """The EPP (`tidal gateway --epp-only`, its own process) is killed: Envoy answers 503 with a JSON
    body and routes nothing."""
    epp_port, port, admin = free_port(), free_port(), free_port()
    with Stub("z") as stub, _tidal("gateway", "--epp-only", "--replica", f"http://{stub.endpoint}",
                                   "--epp-port", str(epp_port), "--metrics-port", str(free_port())) as epp:
        cfg = tmp_path / "envoy.yaml"
        cfg.write_text(envoy_config.to_yaml(envoy_config.bootstrap(
            [stub.endpoint], envoy_config.GatewayPorts(port, epp_port, admin))))
        envoy = subprocess.Popen([envoy_config.envoy_binary(), "-c", str(cfg), "--disable-hot-restart",
                                  "--concurrency", "1", "--log-level", "critical"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_line(epp, "ext_proc on", 30)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{admin}/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.05)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            assert httpx.post(url, json={"messages": []}).json()["served_by"] == "z"
            epp.kill()
            epp.wait()
            for _ in range(2):
                r = httpx.post(url, json={"model": "m", "messages": []}, timeout=10)
                assert r.status_code == 503, r.text
                assert r.headers["content-type"] == "application/json"
                err = r.json()["error"]
                assert err["code"] == 503 and "endpoint picker" in err["message"]
            assert len(stub.requests) == 1    # nothing routed blindly
        finally:
            envoy.kill()
            envoy.wait()


def test_envoy_never_opens_more_epp_streams_on_a_connection_than_the_epp_server_takes():
    """grpclib's server (h2) drops a connection that opens more streams than its SETTINGS allow, with
    every request on it; Envoy must cap its streams per EPP connection at that limit itself (it only
    learns the server's limit from its first SETTINGS frame)."""
    h2 = pytest.importorskip("h2.connection")
    import h2.config
    server_limit = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False)).local_settings.max_concurrent_streams
    cfg = envoy_config.bootstrap(["localhost:1"], envoy_config.GatewayPorts(1, 2, 3))
    epp = cfg["static_resources"]["clusters"][0]
    assert epp["name"] == envoy_config.EPP_CLUSTER
    opts = next(iter(epp["typed_extension_protocol_options"].values()))
    assert 0 < opts["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"] <= server_limit


def test_config_has_no_response_timeout_and_one_retry():
    cfg = envoy_config.bootstrap(["localhost:1"], envoy_config.GatewayPorts(1, 2, 3))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["timeout"] == "0s" and route["retry_policy"]["num_retries"] == 1
    assert hcm["http_filters"][0]["typed_config"]["failure_mode_allow"] is False
    mode = hcm["http_filters"][0]["typed_config"]["processing_mode"]
    assert mode["request_body_mode"] == "BUFFERED" and mode["response_body_mode"] == "NONE"
    replicas = cfg["static_resources"]["clusters"][1]
    assert replicas["type"] == "STRICT_DNS"     # a name (a Kubernetes pod's) is re-resolved
    eps = replicas["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert eps[0]["endpoint"]["address"]["socket_address"] == {"address": "localhost", "port_value": 1}
    cfg = envoy_config.bootstrap(["10.0.0.1:8000", "[::1]:8001"], envoy_config.GatewayPorts(1, 2, 3))
    assert cfg["static_resources"]["clusters"][1]["type"] == "STATIC"
    assert addresses.resolve_endpoint("localhost:5") == "127.0.0.1:5"


def _children(pid: int) -> list[int]:
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(e))
            except (OSError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@contextlib.contextmanager
def _tidal(*args):
    """`python -m tidal.cli ARGS` with its output piped; killed at the end if it still runs."""
    proc = subprocess.Popen([sys.executable, "-m", "tidal.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _wait_for_line(proc, needle: str, timeout: float) -> str:
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return line
    err = proc.stderr.read() if proc.poll() is not None else ""
    raise AssertionError(f"no {needle!r} in the output: {''.join(seen)}\n{err}")


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_tidal_gateway_starts_routes_and_stops_cleanly(how):
    port, admin = free_port(), free_port()
    with Stub("x") as stub, _tidal("gateway", "--replica", f"http://{stub.endpoint}", "--port", str(port),
                                   "--epp-port", str(free_port()), "--metrics-port", str(free_port()),
                                   "--admin-port", str(admin), "--envoy-concurrency", "1",
                                   "--log-level", "debug") as proc:
        line = _wait_for_line(proc, "tidal gateway: http://", 60)
        assert f"http://127.0.0.1:{port}" in line
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "p"}, timeout=10)
        assert r.json()["served_by"] == "x"
        kids = _children(proc.pid)
        assert kids, "envoy is not the gateway's child"
        if how == "sigint":
            proc.send_signal(signal.SIGINT)
            assert proc.wait(15) == 0
            # --log-level debug: the decision and its scores
            assert "EPP /v1/completions -> " + stub.endpoint in proc.stderr.read()
        else:
            proc.kill()      # no chance to clean up: Envoy must still die with it (PDEATHSIG)
            proc.wait(5)
        deadline = time.monotonic() + 5
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(k) for k in kids)


def test_epp_only_prints_the_ext_proc_address():
    grpc_port = free_port()
    with _tidal("gateway", "--epp-only", "--replica", "http://127.0.0.1:1", "--epp-port", str(grpc_port),
                "--metrics-port", str(free_port())) as proc:
        assert f"grpc://127.0.0.1:{grpc_port}" in _wait_for_line(proc, "ext_proc on", 30)
        assert not _children(proc.pid)     # no Envoy
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_tidal_cluster_up_starts_and_stops_everything():
    base, port = free_port_run(4), free_port()   # 2 replicas' HTTP ports, then their 2 KV event ports
    with _tidal("cluster", "up", "--replicas", "2", "--simulate", "--base-port", str(base), "--port", str(port),
                "--epp-port", str(free_port()), "--metrics-port", str(free_port()), "--admin-port", str(free_port()),
                "--envoy-concurrency", "1") as proc:
        _wait_for_line(proc, "tidal cluster: up", 180)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": "smollm2", "prompt": "hello", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200, r.text
        kids = _children(proc.pid)
        assert len(kids) == 3     # two replicas and Envoy
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert not any(_alive(k) for k in kids)
