"""Requests from hostile or careless clients (issue #10): megabyte prompts are refused before
tokenizing and never stall other requests; one request's prompts x n are capped and unreachable
min_tokens refused; lone surrogates get a clean 400; stop_reason names the stop string; a missing
model and unknown fields follow vLLM; /v1/models states the defaults. Connection-level defects
(timeouts, shutdown, Host, malformed HTTP) are in test_server_connections.py."""
import json
import logging
import threading
import time

import httpx
import pytest

from server_fixtures import MAX_MODEL_LEN, MODEL, server  # noqa: F401 (fixture)
from test_server_connections import Server, assert_error

CHAT, COMPL = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(server):  # noqa: F811
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# ---- 1. huge prompts ---------------------------------------------------------------------------
def test_huge_prompt_is_refused_before_tokenizing(http, server):  # noqa: F811
    ctx_bound = MAX_MODEL_LEN * _chars_per_token(server)
    t0 = time.perf_counter()
    err = assert_error(http.post(COMPL, json={"prompt": "word " * 400_000}), 400, "prompt")   # 2 MB: ~3 s of tokenizing
    assert time.perf_counter() - t0 < 1.5 and "characters" in err["message"]
    long_chat = {"messages": [{"role": "user", "content": "a" * (ctx_bound + 1)}]}
    assert "characters" in assert_error(http.post(CHAT, json=long_chat), 400, "prompt")["message"]
    # The bound is exact: one character less is tokenized, and then the engine's token count refuses it.
    err = assert_error(http.post(COMPL, json={"prompt": "a" * ctx_bound}), 400, "prompt")
    assert "tokens" in err["message"] and "characters" not in err["message"]


def _chars_per_token(server) -> int:  # noqa: F811
    from tidal.server.context import max_chars_per_token
    return max_chars_per_token(server.engine.tokenizer)


def test_char_bound_never_refuses_what_fits(server):  # noqa: F811
    """No token of the vocabulary stands for more characters than the bound assumes."""
    tok = server.engine.tokenizer
    bound = _chars_per_token(server)
    assert bound >= 32
    longest = max(len(t) for t in tok.batch_decode([[i] for i in range(len(tok))]))
    assert longest <= bound


def test_long_tokenization_does_not_block_short_requests():
    s = Server()
    try:
        s.ctx.max_chars_per_token = 0   # as for a tokenizer with no cheap bound: every prompt is tokenized
        huge = {"prompt": "hello world, " * 100_000}   # 1.3 M characters, about 2 s of tokenizing
        done = {}

        def post_huge():
            r = httpx.post(s.url + COMPL, json=huge, timeout=120)
            done["huge"] = (time.perf_counter(), r)
        t = threading.Thread(target=post_huge)
        t0 = time.perf_counter()
        t.start()
        time.sleep(0.3)   # the huge prompt is being tokenized now
        r = httpx.post(s.url + "/tokenize", json={"prompt": "short"}, timeout=60)
        short_done = time.perf_counter()
        t.join()
        assert r.status_code == 200 and r.json()["count"] >= 1
        assert_error(done["huge"][1], 400, "prompt")   # too long in tokens
        assert "huge" in done and short_done < done["huge"][0], "the short request waited behind the huge one"
        assert short_done - t0 < 0.3 + 0.5 * (done["huge"][0] - t0)
    finally:
        s.stop()


# ---- 4. the total work of one request -----------------------------------------------------------
def test_prompts_times_n_is_capped(http):
    err = assert_error(http.post(COMPL, json={"prompt": [[1]] * 1000, "n": 16}), 400, "n")
    assert "16000" in err["message"] and "--max-seqs-per-request" in err["message"]
    assert_error(http.post(COMPL, json={"prompt": ["word"] * 300, "max_tokens": 1}), 400, "prompt")
    assert http.post(COMPL, json={"prompt": [[1, 2]] * 16, "n": 16, "max_tokens": 1}).status_code == 200   # 256
    s = Server({"max_seqs_per_request": 4})
    try:
        assert httpx.post(s.url + COMPL, json={"prompt": ["a", "b"], "n": 2, "max_tokens": 1}).status_code == 200
        assert_error(httpx.post(s.url + COMPL, json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1}), 400, "n")
        assert_error(httpx.post(s.url + CHAT, json={"messages": MSG, "n": 5, "max_tokens": 1}), 400, "n")
    finally:
        s.stop()


@pytest.mark.parametrize("path,body", [
    (CHAT, {"messages": MSG, "min_tokens": 10**6}),
    (CHAT, {"messages": MSG, "min_tokens": MAX_MODEL_LEN}),
    (CHAT, {"messages": MSG, "min_tokens": MAX_MODEL_LEN - 5}),   # more than the prompt leaves
    (COMPL, {"prompt": "x", "max_tokens": None, "min_tokens": MAX_MODEL_LEN}),
    (COMPL, {"prompt": "x", "max_tokens": 4, "min_tokens": 5}),
])
def test_unreachable_min_tokens_is_400(http, path, body):
    assert_error(http.post(path, json=body), 400, "min_tokens")


# ---- 5. surrogates, Host headers on the shared server --------------------------------------------
@pytest.mark.parametrize("path,raw,param", [
    (COMPL, b'{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    (COMPL, b'{"prompt": ["ok", "\\udfff"], "max_tokens": 1}', "prompt"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}', "messages"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"], "max_tokens": 1}', "stop"),
    ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
])
def test_lone_surrogate_is_a_clean_400(http, path, raw, param):
    err = assert_error(http.post(path, content=raw, headers={"content-type": "application/json"}), 400, param)
    assert "surrogate" in err["message"] and "TextEncodeInput" not in err["message"]


def test_host_header_is_free_without_allowed_hosts(http):
    assert http.get("/v1/models", headers={"host": "anything.example"}).status_code == 200


# ---- 6. stop_reason, model, unknown fields ------------------------------------------------------
def test_stop_reason_is_the_matched_stop_string(http):
    body = {"prompt": "List the days of the week: Monday, Tuesday,", "max_tokens": 16, "temperature": 0,
            "ignore_eos": True}
    text = http.post(COMPL, json=body).json()["choices"][0]["text"]
    stop = text.split()[1]   # a word it will generate
    choice = http.post(COMPL, json={**body, "stop": ["never-there", stop]}).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    events = []
    with http.stream("POST", COMPL, json={**body, "stop": stop, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    last = [c for e in events for c in e["choices"] if c["finish_reason"]][-1]
    assert last["finish_reason"] == "stop" and last["stop_reason"] == stop
    plain = http.post(COMPL, json={**body, "max_tokens": 2}).json()["choices"][0]
    assert plain["finish_reason"] == "length" and plain["stop_reason"] is None


def test_missing_model_means_the_served_one(http):
    r = http.post(COMPL, json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == MODEL


def test_unknown_fields_are_ignored_and_logged_once(http, caplog):
    vllm_extras = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 1,
                   "stop_token_ids": [49151], "skip_special_tokens": True, "include_stop_str_in_output": False,
                   "priority": 0}
    with caplog.at_level(logging.WARNING, logger="tidal.server"):
        for _ in range(2):
            r = http.post(COMPL, json={"prompt": "x", "max_tokens": 2, "frobnicate_xyz": 1, **vllm_extras})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        r = http.post(CHAT, json={"messages": MSG, "max_tokens": 1, "frobnicate_xyz": 1, "other_xyz": [1]})
        assert r.status_code == 200
    logged = [rec.getMessage() for rec in caplog.records if "unknown request field" in rec.getMessage()]
    assert sum("frobnicate_xyz" in m for m in logged) == 1 and sum("other_xyz" in m for m in logged) == 1
    assert not any(k in m for m in logged for k in vllm_extras)


# ---- 7. the defaults are published -----------------------------------------------------------------
def test_models_and_openapi_state_the_defaults(http, server):  # noqa: F811
    defaults = server.server.config.app.state.ctx.default_sampling
    assert {"temperature", "top_p", "top_k", "min_p", "repetition_penalty"} <= set(defaults)
    card = http.get("/v1/models").json()["data"][0]
    assert card["max_model_len"] == MAX_MODEL_LEN and card["default_sampling_params"] == defaults
    description = http.get("/openapi.json").json()["info"]["description"]
    assert f"{MAX_MODEL_LEN} tokens" in description and f"temperature={defaults['temperature']}" in description


def test_default_sampling_is_what_unset_knobs_get():
    s = Server({"default_sampling": {"temperature": 0.0}})
    try:
        assert httpx.get(s.url + "/v1/models").json()["data"][0]["default_sampling_params"]["temperature"] == 0.0
        body = {"prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True}
        texts = {httpx.post(s.url + COMPL, json=body, timeout=60).json()["choices"][0]["text"] for _ in range(2)}
        greedy = httpx.post(s.url + COMPL, json={**body, "temperature": 0}, timeout=60).json()["choices"][0]["text"]
        assert texts == {greedy}
    finally:
        s.stop()
