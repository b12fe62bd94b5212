"""Bad requests get a 4xx with OpenAI's error shape, never a 500 or a hang: malformed JSON, wrong
types, unknown model, prompts over the context, empty messages, n too large, bad response_format,
oversized bodies, API keys; and a bounded schemathesis run over /openapi.json finds no 5xx."""
from types import SimpleNamespace

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings

from server_fixtures import MODEL, MAX_MODEL_LEN, server, shared_server  # noqa: F401 (fixture)
from tidal.sampling import SamplingParams
from tidal.server.common import check_fits
from tidal.server.errors import APIError

CHAT, COMPL = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


def assert_error(r: httpx.Response, status: int, param: str | None = "<any>") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    if param != "<any>":
        assert err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def http(server):  # noqa: F811
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("path,body,status,param", [
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": MSG, "max_tokens": "ten"}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": MSG, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    (CHAT, {"model": "gpt-17", "messages": MSG}, 404, "model"),
    (CHAT, {"messages": MSG, "n": 17}, 400, "n"),
    (CHAT, {"messages": MSG, "n": 0}, 400, "n"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {}}}, 400,
     "response_format.json_schema.name"),
    (CHAT, {"messages": MSG, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    (CHAT, {"messages": MSG, "temperature": -1}, 400, "temperature"),
    (CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": MSG, "stop": [""]}, 400, "stop"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, 400,
     "tools"),
    (CHAT, {"messages": MSG, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    (CHAT, {"messages": MSG, "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 400}]}, 400, "prompt"),
    (CHAT, {"messages": MSG, "stream": True, "n": 99}, 400, "n"),
    (COMPL, {"prompt": "word " * 400}, 400, "prompt"),
    (COMPL, {"prompt": "word " * 400, "stream": True}, 400, "prompt"),
    (COMPL, {"prompt": ""}, 400, "prompt"),
    (COMPL, {"prompt": []}, 400, "prompt"),
    (COMPL, {"prompt": [10**9]}, 400, "prompt"),
    (COMPL, {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    (COMPL, {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "max_completion_tokens": 10**6}, 400, "max_tokens"),
    (COMPL, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (COMPL, {"prompt": "x", "best_of": 3}, 400, "best_of"),
    (COMPL, {"prompt": 5}, 400, "prompt"),
    (COMPL, {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/tokenize", {}, 400, "prompt"),
])
def test_bad_request(http, path, body, status, param):
    assert_error(http.post(path, json=body), status, param)


def test_malformed_and_non_object_json(http):
    err = assert_error(http.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"]
    assert_error(http.post(CHAT, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    assert_error(http.post(CHAT, content=b"\xff\xfe\x00", headers={"content-type": "application/json"}), 400)
    assert_error(http.post(CHAT), 400)


def test_routes_and_methods(http):
    assert_error(http.get("/v1/nope"), 404)
    assert_error(http.get(CHAT), 405)


def test_json_object_format_accepted(http):
    r = http.post(CHAT, json={"messages": MSG, "max_tokens": 2, "response_format": {"type": "json_object"}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_oversized_body_is_413(http):
    big = b'{"prompt": "' + b"a" * (9 * 2**20) + b'"}'
    assert_error(http.post(COMPL, content=big, headers={"content-type": "application/json"}), 413)

    def chunks():   # no Content-Length: the limit must hold for a chunked upload too
        yield b'{"prompt": "'
        for _ in range(9):
            yield b"a" * 2**20
        yield b'"}'
    assert_error(http.post(COMPL, content=chunks(), headers={"content-type": "application/json"}), 413)
    assert http.get("/health").status_code == 200   # the server is still fine


def test_n_that_cannot_fit_is_rejected():
    ctx = SimpleNamespace(max_model_len=256, kv_capacity_tokens=1000)   # what check_fits reads from ServerContext
    check_fits(ctx, 10, SamplingParams(n=3, max_tokens=100))   # 330 tokens: fits
    check_fits(ctx, 10, SamplingParams(n=1, max_tokens=246))   # exactly the context
    with pytest.raises(APIError) as e:
        check_fits(ctx, 10, SamplingParams(n=8, max_tokens=200))   # 8 x 210 > 1000
    assert e.value.param == "n" and e.value.status == 400
    with pytest.raises(APIError) as e:
        check_fits(ctx, 10, SamplingParams(max_tokens=247))   # one past the context
    assert e.value.param == "max_tokens"


def test_api_key():
    s = shared_server(api_key="sekret")
    body = {"messages": MSG, "max_tokens": 1}
    with httpx.Client(base_url=s.url, timeout=60) as c:
        err = assert_error(c.post(CHAT, json=body), 401)
        assert err["code"] == "invalid_api_key"
        assert_error(c.post(CHAT, json=body, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "sekret"}), 401)
        assert c.post(CHAT, json=body, headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/health").status_code == 200


def _cap(body):
    """Keep generation short so the fuzz run stays bounded; everything else is sent as generated."""
    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if num(body.get(key)) and body[key] > 8:
                body[key] = 8
        body.setdefault("max_tokens", 8)
        if num(body.get("n")) and body["n"] > 2:
            body["n"] = 2


def test_schemathesis_finds_no_server_errors(server):  # noqa: F811
    import schemathesis
    from schemathesis import GenerationMode
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} >= {CHAT, COMPL, "/tokenize", "/detokenize", "/v1/models"}
    failures = []
    for op in operations:
        heavy = op.path in (CHAT, COMPL)
        # GET routes take no input, so there is nothing to make invalid.
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if op.method.upper() == "POST" else \
            (GenerationMode.POSITIVE,)
        for mode in modes:
            @settings(max_examples=15 if heavy else 8, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                _cap(case.body)
                r = case.call(base_url=server.url, timeout=60)
                if r.status_code >= 500:
                    failures.append((op.path, case.body, r.status_code, r.text[:300]))
                elif r.status_code >= 400:
                    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            run()
    assert not failures, failures[:5]
    assert server.engine.is_running
    assert MAX_MODEL_LEN == 256 and MODEL
