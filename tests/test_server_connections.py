"""The server's connections (tidal's uvicorn set-up, issue #10): --shutdown-timeout ends streams with
an error event and [DONE], without tracebacks; silent, slowloris and slow-body clients time out;
connections past the cap get a 503; malformed HTTP (Content-Length) and foreign Host headers get
OpenAI-style errors; a bad --port is one line and exit code 2. Each test runs a server of its own
on the shared engine (`Server`, also used by test_server_robustness.py)."""
import argparse
import json
import logging
import socket
import threading
import time

import httpx
import pytest

from server_fixtures import MAX_MODEL_LEN, MODEL, shared_engine, wait_until

COMPL = "/v1/completions"


def assert_error(r: httpx.Response, status: int, param="<any>") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "<any>":
        assert err["param"] == param, err
    return err


class Server:
    """A server of its own (tidal's uvicorn set-up) on the shared engine, in a daemon thread."""

    def __init__(self, app_kw: dict | None = None, **server_kw):
        from tidal.server.app import build_app
        from tidal.server.uvicorn_server import make_server
        self.app = build_app(shared_engine(), MODEL, shutdown_engine=False, **(app_kw or {}))
        self.ctx = self.app.state.ctx
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.app, log_level="warning", **server_kw)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        assert wait_until(lambda: self.server.started, timeout=30)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def raw(self, data: bytes = b"", timeout: float = 10) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        if data:
            s.sendall(data)
        return s


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def raw_json_response(data: bytes) -> tuple[int, dict, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


# ---- 2. --shutdown-timeout ---------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_shutdown_timeout_ends_streams_with_an_error_event():
    from tidal.server.uvicorn_server import CUT_GRACE
    s = Server(shutdown_timeout=1.0)
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "uvicorn", "tidal.server", "")]
    for lg in loggers:
        lg.addHandler(records)
    try:
        body = {"prompt": "Tell me a long story", "max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True}
        plain = {}

        def post_plain():
            plain["r"] = httpx.post(s.url + COMPL, json=body, timeout=60)
        t = threading.Thread(target=post_plain)
        t.start()
        lines = []
        with httpx.stream("POST", s.url + COMPL, json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    if len(lines) == 1:
                        t_stop = time.perf_counter()
                        s.server.should_exit = True   # what SIGTERM does
        ended = time.perf_counter() - t_stop
        t.join()
        assert lines[-1] == "[DONE]"
        err = json.loads(lines[-2])["error"]
        assert err["code"] == "server_shutting_down" and "--shutdown-timeout" in err["message"]
        assert 1.0 <= ended < 1.0 + CUT_GRACE   # ended by the timeout's cut, not by uvicorn's cancel
        assert_error(plain["r"], 503)
        s.thread.join(timeout=20)
        assert not s.thread.is_alive()
        bad = [r for r in records.records if r.exc_info or "Traceback" in r.getMessage()
               or "Cancel" in r.getMessage()]
        assert not bad, [r.getMessage() for r in bad]
        assert wait_until(lambda: shared_engine().stats()["kv"]["used"] == 0, timeout=20)
    finally:
        for lg in loggers:
            lg.removeHandler(records)
        s.stop()


# ---- 3. connection timeouts and the connection cap ---------------------------------------------
def test_silent_and_slowloris_connections_time_out():
    s = Server({"body_timeout": 0.5}, header_timeout=0.5)
    try:
        slow_body = s.raw(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"prompt\":")
        status, _, body = raw_json_response(read_all(slow_body))
        assert status == 408 and body["error"]["code"] == "request_timeout"
        silent = s.raw()
        t0 = time.perf_counter()
        assert read_all(silent) == b""   # closed by the server
        assert time.perf_counter() - t0 < 3
        half = s.raw(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: app")
        status, _, body = raw_json_response(read_all(half))
        assert status == 408 and body["error"]["code"] == "request_timeout"
        with httpx.Client(base_url=s.url, timeout=10) as c:   # keep-alive: an idle pause is not a slow head
            assert c.get("/health").status_code == 200
            time.sleep(0.8)
            assert c.get("/health").status_code == 200
    finally:
        s.stop()


def test_connections_over_the_cap_get_503():
    s = Server(max_connections=2)
    try:
        idle = [s.raw(), s.raw()]
        time.sleep(0.2)
        extra = s.raw(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, headers, body = raw_json_response(read_all(extra))
        assert status == 503 and headers["content-type"] == "application/json"
        assert body["error"]["code"] == "too_many_connections"
        for sock in idle:
            sock.close()
        assert wait_until(lambda: httpx.get(s.url + "/health").status_code == 200, timeout=5)
    finally:
        s.stop()


def test_serve_flags_reach_the_server():
    from tidal.cli import _add_engine_flags
    from tidal.server.cli import add_serve_parser, is_loopback
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"), _add_engine_flags)
    args = parser.parse_args(["serve", "--header-timeout", "3", "--max-connections", "7", "--timeout-keep-alive", "2",
                              "--max-seqs-per-request", "9", "--allowed-hosts", "a.example,b.example",
                              "--body-timeout", "none"])
    assert (args.header_timeout, args.max_connections, args.timeout_keep_alive) == (3.0, 7, 2)
    assert args.max_seqs_per_request == 9 and args.allowed_hosts == ["a.example", "b.example"]
    assert args.body_timeout is None
    assert all(map(is_loopback, ["127.0.0.1", "127.5.0.1", "::1", "localhost", "[::1]"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com"]))


# ---- 5. malformed HTTP, Host headers ----------------------------------------------------------
def test_malformed_content_length_gets_openai_error():
    s = Server()
    try:
        for bad in (b"abc", b"-1", b"1, 2"):
            sock = s.raw(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: " + bad + b"\r\n\r\n{}")
            status, headers, body = raw_json_response(read_all(sock))
            assert status == 400 and headers["content-type"] == "application/json"
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert "Content-Length" in body["error"]["message"]
    finally:
        s.stop()


def test_host_header_is_checked_on_loopback():
    s = Server({"allowed_hosts": ["api.example.com"]})
    try:
        for host in ("localhost", "localhost:8000", "127.0.0.1", f"127.0.0.1:{s.port}", "[::1]:8000", "[::1]",
                     "LOCALHOST.", "api.example.com", "api.example.com:443"):
            assert httpx.get(s.url + "/v1/models", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "localhost.evil.example", "127.0.0.1.evil.example", "api.example.com.evil"):
            err = assert_error(httpx.get(s.url + "/v1/models", headers={"host": host}), 400)
            assert err["code"] == "invalid_host", host
        assert_error(httpx.post(s.url + COMPL, json={"prompt": "x"}, headers={"host": "evil.example"}), 400)
    finally:
        s.stop()


# ---- 6. --port --------------------------------------------------------------------------------------
def test_bad_port_is_one_line_and_exit_2(capsys):
    from tidal.server.cli import main
    for port in ("99999", "-1", "http"):
        with pytest.raises(SystemExit) as e:
            main(["--port", port])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "--port" in err[-1] and "Traceback" not in "\n".join(err)
