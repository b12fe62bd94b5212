"""Logit controls (issue #11 item 5): logit_bias, allowed_token_ids and bad_words, with vLLM's
semantics, on the batched sampler (fake logits), through the engine on smollm2, and through HTTP."""
import math

import httpx
import openai
import pytest
import torch

from server_fixtures import server  # noqa: F401 (fixture)
from tidal import LLM, SamplingParams, TidalError
from tidal.sampling import Sampler, SamplingMetadata, process_logits
from tidal.sampling_logits import bad_word_bans

CPU = torch.device("cpu")
V = 16


def meta_for(params, logits, outputs=None, seeds=None):
    B, vocab = logits.shape
    return SamplingMetadata.build(params, seeds if seeds is not None else list(range(B)), [[] for _ in range(B)],
                                  outputs or [[] for _ in range(B)], {0}, vocab, CPU)


def sample(params, logits, **kw):
    return Sampler()(logits, meta_for(params, logits, **kw))


def ramp(B=1):
    """Row logits 0, 0.1, ..., 1.5: the argmax is the last token and every token is plausible."""
    return torch.arange(V, dtype=torch.float32).repeat(B, 1) / 10


# ---------------------------------------------------------------- params

def test_params_normalise_and_reject_with_the_field_named():
    p = SamplingParams(logit_bias={"5": 1, 7: -100.0}, bad_words="foo", allowed_token_ids=(3, 4))
    assert p.logit_bias == {5: 1.0, 7: -100.0} and p.bad_words == ["foo"] and p.allowed_token_ids == [3, 4]
    assert SamplingParams(logit_bias={}).logit_bias is None
    cases = [("logit_bias", {"x": 1}), ("logit_bias", {"-1": 1}), ("logit_bias", {"1": 100.5}),
             ("logit_bias", {1: math.nan}), ("logit_bias", [1]), ("logit_bias", {True: 1}),
             ("allowed_token_ids", []), ("allowed_token_ids", [-1]), ("allowed_token_ids", ["1"]),
             ("bad_words", [""]), ("bad_words", ["  "]), ("bad_words", [3])]
    for field, value in cases:
        with pytest.raises(TidalError) as e:
            SamplingParams(**{field: value})
        assert e.value.param == field, (field, value)


class FakeTokenizer:
    def encode(self, text, add_special_tokens=False):
        assert not add_special_tokens
        return {"foo": [3], " foo": [4], "a b": [5, 6], " a b": [7, 6], "bar": [2], " bar": [2]}[text]


def test_resolve_tokenizes_with_and_without_a_space_and_checks_the_vocab():
    p = SamplingParams(bad_words=["foo", " a b", "bar"])
    r = p.resolve_token_controls(FakeTokenizer(), V)
    assert r.bad_words_token_ids == [[3], [4], [5, 6], [7, 6], [2]]
    assert p.bad_words_token_ids is None   # the caller's params are left alone
    assert r.resolve_token_controls(FakeTokenizer(), V) is r
    plain = SamplingParams(logit_bias={1: 1})
    assert plain.resolve_token_controls(FakeTokenizer(), V) is plain
    for field, value in (("logit_bias", {V: 1.0}), ("allowed_token_ids", [0, V]), ("bad_words", ["a b"])):
        with pytest.raises(TidalError) as e:
            SamplingParams(**{field: value}).resolve_token_controls(FakeTokenizer(), 7 if field == "bad_words" else V)
        assert e.value.param == field and "vocabulary" in e.value.message


# ---------------------------------------------------------------- sampler

def test_bias_shifts_the_argmax_and_is_added_exactly():
    logits = ramp()
    p = SamplingParams(temperature=0, logit_bias={2: 5.0, 15: -0.25})
    out = process_logits(logits, meta_for([p], logits))
    expected = logits.clone()
    expected[0, 2] += 5.0
    expected[0, 15] -= 0.25
    assert torch.equal(out, expected)
    assert sample([p], logits).token_ids.item() == 2
    assert sample([SamplingParams(temperature=0, logit_bias={14: 0.2})], logits).token_ids.item() == 14


def test_bias_of_minus_100_bans_a_token_for_greedy_and_seeded_rows():
    logits = torch.zeros(1, V)
    logits[0, 9] = 20.0   # without the bias, token 9 takes ~all the mass
    assert sample([SamplingParams(temperature=0)], logits).token_ids.item() == 9
    params = [SamplingParams(temperature=1.0, seed=s, logit_bias={9: -100}) for s in range(200)]
    tokens = sample(params, logits.repeat(200, 1), seeds=list(range(200))).token_ids
    assert 9 not in tokens.tolist() and len(set(tokens.tolist())) > 5
    assert sample([SamplingParams(temperature=0, logit_bias={9: -100})], logits).token_ids.item() != 9


def test_allowed_token_ids_restrict_greedy_and_seeded_sampling():
    logits = ramp()
    greedy = SamplingParams(temperature=0, allowed_token_ids=[3, 9])
    assert sample([greedy], logits).token_ids.item() == 9
    out = process_logits(logits, meta_for([greedy], logits))[0]
    assert torch.isinf(out).sum() == V - 2 and out[3] == logits[0, 3] and out[9] == logits[0, 9]
    params = [SamplingParams(temperature=1.0, seed=s, allowed_token_ids=[3, 9]) for s in range(200)]
    tokens = sample(params, logits.repeat(200, 1), seeds=list(range(200))).token_ids.tolist()
    assert set(tokens) == {3, 9}
    # bias and allowed together: a bias cannot bring back a token outside the allowed set
    p = SamplingParams(temperature=0, allowed_token_ids=[3, 9], logit_bias={12: 100, 3: 10})
    assert sample([p], logits).token_ids.item() == 3


def test_bad_single_token_word_is_never_sampled():
    logits = torch.zeros(1, V)
    logits[0, 5] = 20.0
    p = SamplingParams(temperature=0, bad_words_token_ids=[[5]])
    assert sample([p], logits).token_ids.item() != 5
    params = [SamplingParams(temperature=1.0, seed=s, bad_words_token_ids=[[5]]) for s in range(200)]
    tokens = sample(params, logits.repeat(200, 1), seeds=list(range(200)), outputs=[[s % V] for s in range(200)])
    assert 5 not in tokens.token_ids.tolist()


def test_multi_token_bad_word_bans_its_last_token_only_after_its_prefix():
    words = [[2, 5], [7, 8, 9]]
    assert bad_word_bans(words, []) == []
    assert bad_word_bans(words, [1, 2]) == [5]
    assert bad_word_bans(words, [2, 3]) == []
    assert bad_word_bans(words, [7, 8]) == [9]
    assert bad_word_bans(words, [8]) == []          # only part of the prefix
    assert bad_word_bans([[4]], [1, 2]) == [4]      # one token: always
    logits = torch.zeros(3, V)
    logits[:, 5] = 20.0
    p = SamplingParams(temperature=0, bad_words_token_ids=[[2, 5]])
    tokens = sample([p] * 3, logits, outputs=[[1, 2], [2, 1], []]).token_ids.tolist()
    assert tokens[0] != 5 and tokens[1] == 5 and tokens[2] == 5


def test_rows_without_controls_are_bit_identical_and_plain_batches_build_nothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 64, generator=g) * 3
    plain = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=10, top_p=0.9, seed=1),
             SamplingParams(temperature=1.2, presence_penalty=0.5, seed=2), SamplingParams(temperature=0.7, seed=3)]
    controlled = list(plain)
    controlled[1] = SamplingParams(temperature=0.8, seed=1, logit_bias={0: 50}, allowed_token_ids=[0, 1, 2])
    controlled[3] = SamplingParams(temperature=0.7, seed=3, bad_words_token_ids=[[7], [1, 8]])
    outputs = [[1, 2], [3], [1, 1], [5, 1]]
    base_meta = meta_for(plain, logits, outputs=outputs)
    ctl_meta = meta_for(controlled, logits, outputs=outputs)
    assert base_meta.controls is None and ctl_meta.controls is not None
    base, ctl = process_logits(logits, base_meta), process_logits(logits, ctl_meta)
    for row in (0, 2):
        assert torch.equal(base[row], ctl[row])
    assert not torch.equal(base[1], ctl[1]) and math.isinf(ctl[3, 8]) and math.isinf(ctl[3, 7])
    for _ in range(3):   # tokens too, over several seeds/steps
        a, b = Sampler()(logits, base_meta), Sampler()(logits, ctl_meta)
        assert a.token_ids[0] == b.token_ids[0] and a.token_ids[2] == b.token_ids[2]
        assert b.token_ids[1].item() in (0, 1, 2) and b.token_ids[3].item() not in (7, 8)
        base_meta.steps += 1
        ctl_meta.steps += 1


def test_logprobs_stay_the_models_own_as_with_penalties():
    logits = ramp()
    raw = logits.log_softmax(-1)
    out = sample([SamplingParams(temperature=0, logprobs=2, logit_bias={0: 100})], logits)
    assert out.token_ids.item() == 0 and torch.allclose(out.logprobs, raw[:, 0])
    assert out.top_logprobs[1].tolist() == [[15, 14]]


# ---------------------------------------------------------------- engine (smollm2)

@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2", dtype="float32")


PROMPT = "The capital of France is"


def _gen(llm, **kw):
    params = SamplingParams(**{"max_tokens": 12, "temperature": 0, **kw})
    return llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]


def test_engine_bias_allowed_ids_and_bad_words(llm):
    tok = llm.engine.tokenizer
    base = _gen(llm)
    assert "Paris" in base.text   # the test below means something only if the word is there
    banana = tok.encode(" banana", add_special_tokens=False)[0]
    assert banana not in base.token_ids
    assert _gen(llm, logit_bias={str(banana): 100}, max_tokens=3).token_ids == [banana] * 3
    a, b = tok.encode(" yes", add_special_tokens=False)[0], tok.encode(" no", add_special_tokens=False)[0]
    assert set(_gen(llm, allowed_token_ids=[a, b]).token_ids) <= {a, b}
    seeded = _gen(llm, temperature=1.0, seed=7, allowed_token_ids=[a, b])
    assert set(seeded.token_ids) <= {a, b} and len(seeded.token_ids) == 12
    no_paris = _gen(llm, bad_words=["Paris"])
    assert "Paris" not in no_paris.text and no_paris.text != base.text
    # a two-token word: its first token still appears, never followed by its last
    the, answer = tok.encode("The answer", add_special_tokens=False)
    assert [the, answer] == base.token_ids[4:6]
    out = _gen(llm, bad_words=["The answer"]).token_ids
    assert the in out and all(out[i:i + 2] != [the, answer] for i in range(len(out)))


def test_engine_rejects_out_of_vocab_ids_at_add_time(llm):
    for field, value in (("logit_bias", {"49152": 1}), ("allowed_token_ids", [1, 10**6])):
        with pytest.raises(TidalError) as e:
            llm.engine.add_request(None, PROMPT, SamplingParams(**{field: value}))
        assert e.value.param == field
    assert not llm.engine.has_unfinished_requests()


# ---------------------------------------------------------------- HTTP

def test_server_logit_bias_and_vllm_extras(server):  # noqa: F811
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    tid = server.engine.tokenizer.encode(" banana", add_special_tokens=False)[0]
    msg = [{"role": "user", "content": "Name a fruit."}]
    r = client.chat.completions.create(model="smollm2", messages=msg, max_tokens=3, temperature=0,
                                       logit_bias={str(tid): 100}, logprobs=True)
    assert [c.token for c in r.choices[0].logprobs.content] == [" banana"] * 3
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"bad_words": ["Paris"]})
    assert "Paris" not in r.choices[0].text
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=4, temperature=0,
                                  extra_body={"allowed_token_ids": [tid]})
    assert r.choices[0].text == " banana" * 4


@pytest.mark.parametrize("extra,param", [({"logit_bias": {"5": 101}}, "logit_bias"),
                                         ({"logit_bias": {"five": 1}}, "logit_bias"),
                                         ({"logit_bias": {"5": "high"}}, "logit_bias"),
                                         ({"logit_bias": {"99999999": 1}}, "logit_bias"),
                                         ({"allowed_token_ids": []}, "allowed_token_ids"),
                                         ({"bad_words": [""]}, "bad_words")])
def test_server_bad_controls_are_400_naming_the_field(server, extra, param):  # noqa: F811
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err.get("param", "").startswith(param) and param in err["message"], err
