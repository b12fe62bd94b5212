"""The OpenAI-compatible server end to end: a real uvicorn server on smollm2, driven by the real
`openai` client (chat and completions, streaming and not, n, stop, max_tokens, logprobs, seeds,
exact usage), plus /v1/models, /health, /tokenize, /detokenize and /metrics."""
import httpx
import openai
import pytest

from server_fixtures import MODEL, metric, server  # noqa: F401 (fixture)

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):  # noqa: F811
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(server):  # noqa: F811
    return server.engine.tokenizer


def chat_ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_models_health(client, server):  # noqa: F811
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_chat_greedy_usage_and_logprobs(client, tok):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=24, logprobs=True,
                                       top_logprobs=3)
    choice = r.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens == len(chat_ids(tok, FRANCE))
    assert r.usage.completion_tokens == len(choice.logprobs.content) >= 2
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    for entry in choice.logprobs.content:
        tops = entry.top_logprobs
        assert len(tops) == 3 and all(a.logprob >= b.logprob for a, b in zip(tops, tops[1:]))
        assert entry.logprob <= 0 and entry.token == tops[0].token   # greedy takes the argmax
        assert abs(entry.logprob - tops[0].logprob) < 1e-5
    # The text is the generated tokens' text; the final eos is a token but not text.
    assert "".join(e.token for e in choice.logprobs.content).startswith(choice.message.content)


def test_chat_stream_equals_nonstream(client):
    kw = dict(model=MODEL, messages=FRANCE, temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_max_tokens_and_usage(client, tok):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == 7
    stream = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text
    assert stream[-1].choices[0].finish_reason == "length"
    by_ids = client.completions.create(model=MODEL, prompt=tok.encode(prompt), max_tokens=7, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == r.choices[0].text


def test_n2_and_batch_usage(client, tok):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, n=2, temperature=0.8, seed=7, max_tokens=6,
                                       extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 12 and all(c.finish_reason == "length" for c in r.choices)
    prompts = ["Once upon a time", "The weather today is"]
    b = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=0.8, seed=1,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in b.choices) == [0, 1, 2, 3]
    assert b.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert b.usage.completion_tokens == 16
    streamed = list(client.chat.completions.create(model=MODEL, messages=FRANCE, n=2, temperature=0.8, seed=7,
                                                   max_tokens=6, stream=True, extra_body={"ignore_eos": True}))
    texts = ["", ""]
    for c in streamed:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]


def test_stop_string(client):
    prompt = "List the days of the week: Monday, Tuesday,"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    words = full.split(" ")
    stop = " " + next(w for w in words[2:] if w)
    cut = client.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]
    chat = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=24, stop="Paris")
    assert chat.choices[0].finish_reason == "stop" and "Paris" not in chat.choices[0].message.content


def test_seeded_sampling_repeats(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Write a short poem about the sea."}],
              temperature=0.8, max_tokens=16, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw, seed=123).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=123).choices[0].message.content
    c = client.chat.completions.create(**kw, seed=124).choices[0].message.content
    assert a == b and a != c


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and top[token] == value and value == max(top.values())


def test_tokenize_detokenize(server, tok):  # noqa: F811
    text = "Tidal serves tokens."
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    back = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert back["prompt"] == tok.decode(r["tokens"])
    chat = httpx.post(server.url + "/tokenize", json={"messages": FRANCE}).json()
    assert chat["tokens"] == chat_ids(tok, FRANCE)


def test_metrics_count_requests(client, server):  # noqa: F811
    before = metric(server.url, "tidal:request_success_total", 'finished_reason="length",model_name="smollm2"')
    gen_before = metric(server.url, "tidal:generation_tokens_total")
    client.completions.create(model=MODEL, prompt="One two three", max_tokens=3, extra_body={"ignore_eos": True})
    after = metric(server.url, "tidal:request_success_total", 'finished_reason="length",model_name="smollm2"')
    assert after == before + 1
    assert metric(server.url, "tidal:generation_tokens_total") == gen_before + 3
    assert metric(server.url, "tidal:time_to_first_token_seconds_count") >= 1
    assert metric(server.url, "tidal:e2e_request_latency_seconds_count") >= 1
    assert metric(server.url, "tidal:kv_cache_total_blocks") == 512
    text = httpx.get(server.url + "/metrics").text
    for name in ("tidal:inter_token_latency_seconds_bucket", "tidal:num_requests_running",
                 "tidal:num_requests_waiting", "tidal:kv_cache_usage_perc", "tidal:prefix_cache_hit_rate",
                 "tidal:prompt_tokens_total"):
        assert name in text
