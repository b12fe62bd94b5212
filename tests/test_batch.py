"""`tidal batch` on the real model: OpenAI batch records with exact usage, error records that do
not stop the job, and exactly-once results across a torn output line and a real `kill -9`."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tidal.batch import process
from tidal.config import EngineConfig
from tidal.engine.llm_engine import LLMEngine

ENGINE = dict(model="smollm2", dtype="float32", device="cpu", num_kv_blocks=256, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def engine():
    # One intra-op thread: these steps are a few tokens each, and on a busy shared machine two
    # OpenMP threads spin-wait on each other (40x slower matmuls measured), so the tests crawl.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LLMEngine(EngineConfig.from_kwargs(**ENGINE, max_num_seqs=32))
    torch.set_num_threads(threads)


def line(cid, url="/v1/completions", **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def completion(cid, i=0, max_tokens=2):
    return line(cid, prompt=f"Item {i}: the number", max_tokens=max_tokens, temperature=0, ignore_eos=True)


def write(path, lines):
    path.write_text("".join(l + "\n" for l in lines))


def records(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def by_id(recs):
    return {r["custom_id"]: r for r in recs}


MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def mixed(engine, tmp_path_factory):
    """One job mixing good chat and completion lines with bad ones (one engine run serves two tests)."""
    d = tmp_path_factory.mktemp("mixed")
    write(d / "in.jsonl", [
        line("chat", "/v1/chat/completions", model="smollm2", messages=MESSAGES, max_completion_tokens=3,
             ignore_eos=True, logprobs=True, top_logprobs=2),
        '{"custom_id": "torn", "method": "POST", "url": ',
        line("cmpl", prompt="The capital of France is", max_tokens=3, ignore_eos=True, temperature=0, logprobs=1),
        json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/completions"}),
        line("badurl", "/v1/embeddings", input="x"),
        line("multi", prompt=["One, two,", "Red, green,"], max_tokens=2, n=2, seed=3, ignore_eos=True, top_k=5,
             min_p=0.01, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.1),
        line("badtemp", prompt="x", temperature=-1),
        line("badtype", prompt="x", max_tokens="5"),
        line("chat", prompt="a duplicate custom_id"),
    ])
    stats = process(engine, str(d / "in.jsonl"), str(d / "out.jsonl"), progress=False)
    return d, stats, records(d / "out.jsonl")


def test_mixed_chat_and_completion_records(engine, mixed):
    _, stats, recs = mixed
    assert (stats["completed"], stats["failed"], stats["skipped"]) == (3, 6, 0)
    ok = by_id(r for r in recs if r["error"] is None)
    assert set(ok) == {"chat", "cmpl", "multi"}
    tok = engine.tokenizer
    for r in ok.values():
        assert r["id"].startswith("batch_req_")
        assert r["response"]["status_code"] == 200 and r["response"]["request_id"]
        u = r["response"]["body"]["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]

    chat = ok["chat"]["response"]["body"]
    assert chat["object"] == "chat.completion" and len(chat["choices"]) == 1
    chat_ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    chat_ids = chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids
    assert chat["usage"]["prompt_tokens"] == len(chat_ids)
    choice = chat["choices"][0]
    assert chat["usage"]["completion_tokens"] == 3 == len(choice["logprobs"]["content"])
    assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant"
    assert all(len(e["top_logprobs"]) == 2 for e in choice["logprobs"]["content"])

    cmpl = ok["cmpl"]["response"]["body"]
    assert cmpl["object"] == "text_completion"
    assert cmpl["usage"]["prompt_tokens"] == len(tok.encode("The capital of France is"))
    assert cmpl["usage"]["completion_tokens"] == 3 == len(cmpl["choices"][0]["logprobs"]["tokens"])
    assert "".join(cmpl["choices"][0]["logprobs"]["tokens"]) == cmpl["choices"][0]["text"]

    multi = ok["multi"]["response"]["body"]
    assert sorted(c["index"] for c in multi["choices"]) == [0, 1, 2, 3]   # prompt i, sample j -> i * n + j
    assert multi["usage"]["prompt_tokens"] == len(tok.encode("One, two,")) + len(tok.encode("Red, green,"))
    assert multi["usage"]["completion_tokens"] == 8


def test_bad_lines_get_error_records_and_the_job_goes_on(engine, mixed):
    d, _, recs = mixed
    assert len(recs) == 9
    errors = {(r["custom_id"], r["error"]["code"]) for r in recs if r["error"]}
    assert errors == {(None, "invalid_json"), ("nobody", "missing_body"), ("badurl", "invalid_url"),
                      ("badtemp", "invalid_request_error"), ("badtype", "invalid_request_error"),
                      ("chat", "duplicate_custom_id")}
    bad = by_id(r for r in recs if r["error"] and r["custom_id"] != "chat")
    assert bad["badtemp"]["response"]["status_code"] == 400 and bad["badtemp"]["error"]["param"] == "temperature"
    assert bad["badtype"]["error"]["param"] == "max_tokens"
    assert bad["badurl"]["response"] is None and bad[None]["error"]["line"] == 2
    # A rerun of a finished job appends nothing: errors, the duplicate and the id-less line are all known.
    before = (d / "out.jsonl").read_bytes()
    again = process(engine, str(d / "in.jsonl"), str(d / "out.jsonl"), progress=False)
    assert (again["completed"], again["failed"], again["skipped"]) == (0, 0, 9)
    assert (d / "out.jsonl").read_bytes() == before


def test_resume_after_torn_last_line(engine, tmp_path):
    n, k = 5, 2
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(inp, [completion(f"r{i}", i) for i in range(n)])
    process(engine, str(inp), str(out), progress=False)
    lines = out.read_text().splitlines(keepends=True)
    assert len(lines) == n
    out.write_text("".join(lines[:k]) + lines[k][: len(lines[k]) // 2])   # k records and half of one more
    stats = process(engine, str(inp), str(out), progress=False)
    assert (stats["completed"], stats["skipped"]) == (n - k, k)
    after = out.read_text().splitlines(keepends=True)
    assert after[:k] == lines[:k]
    recs = records(out)
    assert len(recs) == n and {r["custom_id"] for r in recs} == {f"r{i}" for i in range(n)}
    assert all(r["response"]["status_code"] == 200 for r in recs)


def test_kill_9_then_rerun_is_exactly_once(engine, tmp_path):
    n = 30
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(inp, [completion(f"k{i}", i, max_tokens=8) for i in range(n)])   # 8: slow enough to kill mid-job
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()]
    cmd = [sys.executable, "-m", "tidal.batch",
           str(inp), str(out), "--no-progress", "--max-num-seqs=1", *flags]   # one request at a time
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    first = [json.loads(l) for l in out.read_text().splitlines(keepends=True) if l.endswith("\n")]
    assert 2 <= len(first) < n
    stats = process(engine, str(inp), str(out), progress=False)
    assert stats["skipped"] == len(first) and stats["completed"] == n - len(first)
    recs = records(out)
    assert len(recs) == n and sorted(r["custom_id"] for r in recs) == sorted(f"k{i}" for i in range(n))
    assert recs[:len(first)] == first
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 8 for r in recs)


def test_output_is_locked_and_damage_is_refused(tmp_path):
    """A second run on the same OUT would answer lines twice; a bad line mid-file is damage, not a torn tail."""
    from tidal.batch import _Writer, scan_output
    from tidal.errors import TidalError
    out = tmp_path / "out.jsonl"
    w = _Writer(str(out))
    with pytest.raises(TidalError, match="another `tidal batch`"):
        _Writer(str(out))
    w.close()
    _Writer(str(out)).close()   # free again once the first writer is gone
    good = json.dumps({"id": "batch_req_1", "custom_id": "a", "response": None, "error": None}) + "\n"
    out.write_text(good + "not json\n" + good)
    with pytest.raises(TidalError, match="line 2"):
        scan_output(str(out))
    out.write_text(good + '{"id": "batch_req_2", "custom_id": "b", "resp')
    done = scan_output(str(out))
    assert out.read_text() == good and done.ids == {"a"} and done.records == 1


def test_planning_hint_reads_the_workload_from_the_file(tmp_path):
    """Under a memory budget, --policy auto plans for the batch file's own lengths."""
    from tidal.batch import planning_hint
    path = tmp_path / "in.jsonl"
    lines = [{"custom_id": "a", "method": "POST", "url": "/v1/completions",
              "body": {"model": "m", "prompt": "x" * 400, "max_tokens": 100}},
             {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "m", "messages": [{"role": "user", "content": "y" * 200}], "max_tokens": 50}}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    assert planning_hint(str(path)) == {"prompt_len": 75, "gen_len": 75}
    (tmp_path / "empty.jsonl").write_text("")
    assert planning_hint(str(tmp_path / "empty.jsonl")) == {}


def test_structured_output_and_model_defaults_in_a_batch(engine, tmp_path):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}}, "required": ["colour"],
              "additionalProperties": False}
    write(tmp_path / "in.jsonl", [
        line("json", "/v1/chat/completions", messages=MESSAGES, max_tokens=40, temperature=0,
             response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}),
        line("choice", prompt="My favourite colour is", max_tokens=4, temperature=0, guided_choice=["red", "blue"]),
        line("badregex", prompt="x", guided_regex="a("),
    ])
    process(engine, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), progress=False)
    recs = by_id(records(tmp_path / "out.jsonl"))
    out = json.loads(recs["json"]["response"]["body"]["choices"][0]["message"]["content"])
    assert set(out) == {"colour"} and isinstance(out["colour"], str)
    assert recs["choice"]["response"]["body"]["choices"][0]["text"] in ("red", "blue")
    assert recs["badregex"]["error"] is not None or recs["badregex"]["response"]["status_code"] == 400
    from tidal.batch_requests import LineRequests
    from tidal.server.context import neutral_sampling
    requests = LineRequests(engine)
    try:   # smollm2's, over the neutral ones, as the server uses
        assert requests.ctx.default_sampling == {**neutral_sampling(), "temperature": 0.2, "top_p": 0.9}
    finally:
        requests.close()


def test_a_line_and_the_same_http_body_agree(engine, tmp_path, monkeypatch):
    """One body as a batch line and as an HTTP request (build_app as `tidal serve` builds it): a bad
    one gets the same status and error body, a good one reaches the engine with the same prompt and
    the same SamplingParams (the model's generation-config defaults for the knobs it leaves unset)."""
    import copy

    from starlette.testclient import TestClient

    from tidal.engine.async_engine import AsyncEngine
    from tidal.server.app import build_app
    from tidal.server.errors import APIError
    chat, cmpl = "/v1/chat/completions", "/v1/completions"
    good = {"chat": (chat, {"messages": MESSAGES, "max_tokens": 1}),
            "cmpl": (cmpl, {"prompt": "The sky is", "max_tokens": 1, "top_k": 5, "seed": 1})}
    bad = {"temperature": (cmpl, {"prompt": "x", "temperature": -1}),
           "type": (cmpl, {"prompt": "x", "max_tokens": "5"}),
           "top_logprobs": (chat, {"messages": MESSAGES, "top_logprobs": 2}),
           "no_messages": (chat, {"messages": []}),
           "empty_prompt": (cmpl, {"prompt": ""}),
           "too_long": (cmpl, {"prompt": "x", "max_tokens": engine.max_model_len}),
           "min_tokens": (chat, {"messages": MESSAGES, "min_tokens": engine.max_model_len}),
           "tools": (chat, {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": 3}}]}),
           "regex": (cmpl, {"prompt": "x", "guided_regex": "a("})}

    # `tidal serve`'s frontend over this engine (its thread not started), built into the app as the
    # server command builds it; the requests that reach it are recorded and refused.
    frontend, http_seen = AsyncEngine(engine, start=False), []

    async def recording_frontend_add(rid, ids, params, priority=0):
        http_seen.append((ids, copy.deepcopy(params)))
        raise APIError("recorded", status=503)
    monkeypatch.setattr(frontend, "add_request", recording_frontend_add)
    app = build_app(frontend, "smollm2", shutdown_engine=False, default_sampling=frontend.default_sampling)
    with TestClient(app) as client:
        http = {cid: client.post(url, json=body) for cid, (url, body) in {**good, **bad}.items()}

    batch_seen, add = [], engine.add_request

    def recording_add(rid, prompt, params, **kw):
        batch_seen.append((kw["prompt_token_ids"], copy.deepcopy(params)))
        return add(rid, prompt, params, **kw)
    monkeypatch.setattr(engine, "add_request", recording_add)
    write(tmp_path / "in.jsonl", [line(cid, url, **body) for cid, (url, body) in {**good, **bad}.items()])
    process(engine, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), progress=False)
    recs = by_id(records(tmp_path / "out.jsonl"))

    for cid in bad:
        r = recs[cid]["response"]
        assert (r["status_code"], r["body"]) == (http[cid].status_code, http[cid].json()), cid
        assert http[cid].status_code == 400 and recs[cid]["error"]["message"] == http[cid].json()["error"]["message"]
    assert all(recs[cid]["response"]["status_code"] == 200 for cid in good)
    assert batch_seen == http_seen and len(batch_seen) == 2   # prompt ids and SamplingParams, one per good body
    chat_params = batch_seen[0][1]
    assert (chat_params.temperature, chat_params.top_p) == (0.2, 0.9)   # smollm2's generation config
