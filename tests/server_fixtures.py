"""One real tidal server (smollm2, fp32, 256-token context) shared by the server test modules.

Loading the model is the slow part, so the engine is built once per pytest process and shared
(module-level cache; importing a fixture into several modules would otherwise build it once per
module). Servers are uvicorn in daemon threads on pre-bound loopback sockets (no port race);
they are stopped at interpreter exit.
"""
from __future__ import annotations

import atexit
import re
import socket
import threading
import time

import httpx
import pytest

from tidal.config import EngineConfig
from tidal.engine.async_engine import AsyncEngine

MODEL = "smollm2"
MAX_MODEL_LEN = 256   # bounds any generation without max_tokens (schemathesis sends such bodies)
NUM_KV_BLOCKS = 512   # 8192 tokens: 64 requests x 128 tokens, with room to spare

_lock = threading.Lock()
_engine: AsyncEngine | None = None
_servers: dict[str, "ServerHandle"] = {}


class ServerHandle:
    def __init__(self, app, engine: AsyncEngine):
        import uvicorn
        self.engine = engine
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def shared_engine() -> AsyncEngine:
    global _engine
    with _lock:
        if _engine is None:
            _engine = AsyncEngine.from_config(EngineConfig(model=MODEL, dtype="float32", max_model_len=MAX_MODEL_LEN,
                                                           num_kv_blocks=NUM_KV_BLOCKS, max_num_seqs=64))
        return _engine


def shared_server(api_key: str | None = None, max_body_bytes: int | None = None) -> ServerHandle:
    from tidal.server.app import build_app
    key = f"{api_key}|{max_body_bytes}"
    engine = shared_engine()
    with _lock:
        if key not in _servers:
            kw = {"max_body_bytes": max_body_bytes} if max_body_bytes else {}
            app = build_app(engine, MODEL, api_key, shutdown_engine=False, **kw)
            _servers[key] = ServerHandle(app, engine)
        return _servers[key]


@atexit.register
def _stop_all() -> None:
    for handle in _servers.values():
        handle.stop()


def metric(url: str, name: str, labels: str = "") -> float:
    """Value of one sample in /metrics (0 when absent), e.g. metric(url, "tidal:kv_cache_used_blocks")."""
    text = httpx.get(url + "/metrics").text
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(\{[^}]*\})?") + r" (\S+)"
    m = re.search(r"^" + pattern + "$", text, re.MULTILINE)
    return float(m.group(m.lastindex)) if m else 0.0


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="session")
def server() -> ServerHandle:
    return shared_server()
