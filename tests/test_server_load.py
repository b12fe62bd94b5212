"""The server under load and when clients leave: 64 concurrent streams with 10 cancelled part way,
a non-streaming client that times out, /health staying responsive while the engine is busy, and
SIGTERM letting an in-flight stream finish before the process exits. Afterwards no KV block is
left in use."""
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from server_fixtures import MODEL, metric, server, wait_until  # noqa: F401 (fixture)


def _counters(server):  # noqa: F811
    return server.engine.stats()["counters"]


def _idle(server) -> bool:  # noqa: F811
    s = server.engine.stats()
    return s["kv"]["used"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0


async def _one(client: httpx.AsyncClient, i: int, cancel: bool) -> dict:
    body = {"model": MODEL, "prompt": f"Request number {i}: the story begins", "stream": True,
            "max_tokens": 200 if cancel else 16, "ignore_eos": True, "temperature": 0.7, "seed": i,
            "stream_options": {"include_usage": True}}
    chunks, usage, finish, done = 0, None, None, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                chunks += 1
                finish = choice["finish_reason"] or finish
            if cancel and chunks >= 3:
                break   # leaving the `async with` closes the connection mid-stream
    return {"chunks": chunks, "usage": usage, "finish": finish, "done": done}


async def _load(url: str, n: int, cancelled: set[int]):
    health_latencies = []
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def watch_health():
            while True:
                t0 = time.perf_counter()
                r = await client.get("/health")
                assert r.status_code == 200
                health_latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(0.2)
        watcher = asyncio.ensure_future(watch_health())
        try:
            results = await asyncio.gather(*[_one(client, i, i in cancelled) for i in range(n)])
        finally:
            watcher.cancel()
    return results, health_latencies


def test_64_streams_with_10_cancelled(server):  # noqa: F811
    assert wait_until(lambda: _idle(server), timeout=30)
    aborted0 = _counters(server)["aborted"]
    abort_metric0 = metric(server.url, "tidal:request_success_total", 'finished_reason="abort",model_name="smollm2"')
    cancelled = set(range(0, 64, 7))   # 10 requests: 0, 7, ..., 63
    assert len(cancelled) == 10
    results, health = asyncio.run(_load(server.url, 64, cancelled))
    for i, r in enumerate(results):
        if i in cancelled:
            assert r["chunks"] == 3 and not r["done"]
        else:
            assert r["done"] and r["finish"] == "length", (i, r)
            assert r["usage"]["completion_tokens"] == 16 and r["usage"]["prompt_tokens"] > 0
    # Every cancelled stream was aborted in the engine (it would have run 200 tokens otherwise), and
    # its blocks went back to the pool.
    assert wait_until(lambda: _counters(server)["aborted"] - aborted0 == 10, timeout=30), _counters(server)
    assert wait_until(lambda: _idle(server), timeout=30), server.engine.stats()
    assert wait_until(lambda: metric(server.url, "tidal:kv_cache_used_blocks") == 0, timeout=10)
    assert metric(server.url, "tidal:request_success_total",
                  'finished_reason="abort",model_name="smollm2"') == abort_metric0 + 10
    assert health and max(health) < 3.0, f"/health was slow under load: max {max(health):.2f} s"


def test_nonstreaming_client_timeout_aborts(server):  # noqa: F811
    assert wait_until(lambda: _idle(server), timeout=30)
    aborted0 = _counters(server)["aborted"]
    body = {"model": MODEL, "prompt": "Tell me everything", "max_tokens": 240, "ignore_eos": True}
    try:
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
        raise AssertionError("a 240-token request should not finish within 0.5 s")
    except httpx.TimeoutException:
        pass
    assert wait_until(lambda: _counters(server)["aborted"] == aborted0 + 1, timeout=30), _counters(server)
    assert wait_until(lambda: _idle(server), timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"   # a zombie has exited
    except OSError:
        return True


@contextlib.contextmanager
def _tidal_serve(args: list[str], log_path):
    """A real `tidal serve` process, killed on the way out. Its stdout and stderr (the engine process
    shares them) go to a file, not a pipe that nobody reads and that blocks the server when full;
    any failure inside quotes the end of that log, so a failed run says what the server said."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tidal.server.cli", *args], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        yield proc
    except Exception as e:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise AssertionError(f"{type(e).__name__}: {e}\n--- the server's log, last 4000 characters ---\n{tail}") from e
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_drains_inflight_stream_engine_process(tmp_path):
    """`tidal serve --engine-process`: the engine in a child process over ZeroMQ. A stream cut by
    its client is aborted there; SIGTERM lets an in-flight stream finish; both processes exit."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with _tidal_serve(["--model", MODEL, "--dtype", "float32", "--max-model-len", "128", "--num-kv-blocks", "32",
                       "--port", str(port), "--log-level", "warning", "--engine-process"],
                      tmp_path / "server.log") as proc:
        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False
        assert wait_until(lambda: up() or proc.poll() is not None, timeout=120, interval=0.2)
        assert proc.poll() is None, f"the server exited ({proc.returncode})"
        engine_pids = _children(proc.pid)
        assert engine_pids, "the engine process is missing"
        body = {"model": MODEL, "prompt": "Count with me: one, two,", "max_tokens": 100, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 4:
                    break   # cut the stream: the engine process must abort it
        assert wait_until(lambda: metric(url, "tidal:engine_requests_aborted_total") == 1, timeout=20)
        assert wait_until(lambda: metric(url, "tidal:kv_cache_used_blocks") == 0, timeout=10)
        # the child sends new token ids only; text, stop strings and n > 1 are made in this process
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": "Count with me: one, two,", "max_tokens": 20, "temperature": 0, "n": 2,
            "stop": [","]}).json()
        assert [c["finish_reason"] for c in r["choices"]] == ["stop", "stop"], r
        assert r["choices"][0]["text"] == r["choices"][1]["text"] and "," not in r["choices"][0]["text"]
        choices = ["The capital city of France", "The capital city of Germany"]
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": "Paris is", "max_tokens": 20, "temperature": 0, "guided_choice": choices}).json()
        assert r["choices"][0]["text"] in choices, r
        assert metric(url, "tidal:jump_forward_tokens_total") > 0   # the choice's shared words were forced
        body.update(max_tokens=12, stream_options={"include_usage": True})
        text_chunks, usage, done = 0, None, False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    usage = event.get("usage") or usage
                    text_chunks += len(event["choices"])
                    if text_chunks == 1:
                        proc.send_signal(signal.SIGTERM)   # mid-stream: the stream must still complete
        assert done and usage["completion_tokens"] == 12
        proc.wait(timeout=60)
        assert proc.returncode in (0, -signal.SIGTERM), proc.returncode   # uvicorn re-raises the signal
        assert wait_until(lambda: all(_gone(p) for p in engine_pids), timeout=15), "the engine process outlived the server"
        try:
            httpx.get(url + "/health", timeout=1)
            raise AssertionError("the server still answers after SIGTERM")
        except httpx.TransportError:
            pass


def test_bench_serve_record(server, tmp_path):  # noqa: F811
    from tidal.bench import make_workload
    from tidal.server.bench import main
    path = tmp_path / "serve.json"
    assert main(["--url", server.url, "--num-prompts", "6", "--input-len", "8-24", "--output-len", "5",
                 "--request-rate", "20", "--max-concurrency", "4", "--seed", "3", "--no-tqdm",
                 "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["benchmark"] == "serve" and record["engine"]["name"] == "tidal-serve"
    assert record["engine"]["model"] == MODEL
    # The same prompts `tidal bench throughput --seed 3 ...` replays on this model.
    assert record["workload"] == make_workload(6, (8, 24), (5, 5), 3, 49152).summary()
    res = record["results"]
    assert res["completed"] == 6 and res["failed"] == 0 and res["output_tokens"] == 30
    assert 0 < res["ttft_ms"]["p50"] <= res["ttft_ms"]["p99"] and res["tpot_ms"]["p50"] > 0
    assert res["itl_ms"]["p90"] > 0 and res["output_tokens_per_s"] > 0 and record["versions"]["python"]


# ---- AsyncEngine's threading, on a stub engine (fast and deterministic) ----------------------
class _StubEngine:
    """An engine core where each request emits one token per step until max_tokens; `fail` makes the next
    step raise."""

    def __init__(self):
        from types import SimpleNamespace
        self.tokenizer = _StubTokenizer()
        self.config = SimpleNamespace(seed=0)
        self.reqs, self.steps, self.fail = {}, 0, False
        self.stats = {"aborted": 0}

    def info(self):
        from tidal.engine.core_io import CoreInfo
        return CoreInfo(64, 100, 64, {}, [], self.snapshot())

    def snapshot(self, seconds=0.0):
        from tidal.engine.core_io import CoreStats
        kv = {"used": len(self.reqs), "total": 4, "usage": len(self.reqs) / 4, "prefix_queries": 0, "prefix_hits": 0,
              "hit_rate": 0.0}
        return CoreStats(len(self.reqs), 0, kv, dict(self.stats), seconds)

    def add_requests(self, requests):
        for r in requests:
            self.reqs[r.request_id] = [r.params.max_tokens, []]

    def abort_requests(self, ids, reason="abort"):
        from tidal.engine.core_io import EngineCoreOutput
        outs = []
        for rid in ids:
            if self.reqs.pop(rid, None) is not None:
                self.stats["aborted"] += reason == "abort"
                outs.append(EngineCoreOutput(rid, [], finish_reason="abort"))
        return outs

    def has_unfinished_requests(self):
        return bool(self.reqs)

    def step(self):
        from tidal.engine.core_io import EngineCoreOutput
        self.steps += 1
        time.sleep(0.002)
        if self.fail:
            self.fail = False
            raise RuntimeError("boom")
        outs = []
        for rid, (max_tokens, toks) in list(self.reqs.items()):
            toks.append(len(toks))
            done = len(toks) >= max_tokens
            outs.append(EngineCoreOutput(rid, [toks[-1]], finish_reason="length" if done else None))
            if done:
                del self.reqs[rid]
        return outs


class _StubTokenizer:
    def decode(self, ids, **kwargs):
        return "x" * len(ids)


def test_async_engine_threading():
    import pytest
    from tidal.engine.async_engine import AsyncEngine, EngineUnavailable
    from tidal.errors import TidalError
    from tidal.sampling import SamplingParams

    stub = _StubEngine()
    engine = AsyncEngine(stub)

    async def collect(rid, n, close_after=None):
        got = []
        gen = engine.generate(rid, [1, 2], SamplingParams(max_tokens=n))
        async for out in gen:
            got.append(out)
            if close_after and len(got) == close_after:
                await gen.aclose()   # a client that goes away
                break
        return got

    async def scenario():
        outs = await asyncio.gather(collect("a", 5), collect("b", 3), collect("c", 50, close_after=2))
        assert [len(o) for o in outs] == [5, 3, 2]
        assert outs[0][-1].finished and outs[0][-1].outputs[0].finish_reason == "length"
        assert outs[0][-1].outputs[0].token_ids == [0, 1, 2, 3, 4]
        with pytest.raises(TidalError) as e:
            await engine.add_request("d", [], SamplingParams())
        assert e.value.param == "prompt"
        stub.fail = True   # an engine bug fails the requests in flight, and serving goes on
        with pytest.raises(RuntimeError, match="boom"):
            await collect("e", 5)
        assert len(await collect("f", 2)) == 2
        await asyncio.sleep(0.1)
        steps = stub.steps
        await asyncio.sleep(0.3)
        assert stub.steps == steps, "the engine thread must sleep while idle, not spin"
        assert stub.stats["aborted"] == 2 and not stub.reqs   # "c" (closed early) and "e" (failed)
        drained = asyncio.ensure_future(collect("g", 30))
        await asyncio.sleep(0.02)
        await engine.shutdown(drain=True, timeout=10)
        assert len(await drained) == 30   # shutdown let the in-flight request finish
        with pytest.raises(EngineUnavailable):
            await engine.add_request("h", [1], SamplingParams())
        assert not engine.is_running and engine.stats()["num_running"] == 0

        hard = AsyncEngine(_StubEngine())
        pending = asyncio.ensure_future(hard_collect(hard))
        await asyncio.sleep(0.02)
        await hard.shutdown(drain=False, timeout=10)
        last = (await pending)[-1]
        assert last.finished and last.outputs[0].finish_reason == "abort" and len(last.outputs[0].token_ids) < 1000

    async def hard_collect(hard):
        return [o async for o in hard.generate("z", [1], SamplingParams(max_tokens=1000))]

    asyncio.run(scenario())


def test_stream_starts_with_its_first_token():
    """A streamed response's 200 goes out with the first token: a request that fails before it gets an
    HTTP error (a gateway can retry it on another replica), not a 200 whose only event is the error."""
    from starlette.testclient import TestClient
    from tidal.engine.async_engine import AsyncEngine
    from tidal.server.app import build_app

    stub = _StubEngine()
    engine = AsyncEngine(stub)
    app = build_app(engine, "stub", shutdown_engine=False)
    body = {"model": "stub", "prompt": [1, 2, 3], "max_tokens": 3, "stream": True}
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            stub.fail = True   # the next engine step raises: before the request's first token
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error", r.text
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and len(events) == 4   # 3 tokens, then [DONE]
    finally:
        asyncio.run(engine.shutdown(drain=False, timeout=10))
