"""Structured output (xgrammar) on the real model, fp32 CPU: JSON schema, json_object, regex, choice and
EBNF outputs match their grammar greedy and seeded; bad specs are refused at add_request; a grammar
waits off the step loop while it compiles; n > 1, chunked prefill and preemption keep outputs valid;
requests without a grammar are untouched. Plus the spec, the OpenAI mapping, the cache and the bitmask."""
import json
import re
from concurrent.futures import Future

import msgspec
import pytest
import torch

from tidal import LLM, SamplingParams, StructuredOutputsParams, TidalError
from tidal.structured import from_openai_request
from tidal.structured.bitmask import apply_bitmask, build_bitmask
from tidal.structured.compiler import GrammarCompilerCache
from tidal.structured.matcher import RequestGrammar

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2", dtype="float32", device="cpu", num_kv_blocks=512)


@pytest.fixture(scope="module")
def prompt(llm):
    return {"prompt_token_ids": llm.apply_chat_template(
        [{"role": "user", "content": "Describe a person as JSON with a name and an age."}])}


def _gen(llm, prompt, so, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 48)
    return llm.generate(prompt, SamplingParams(structured_outputs=so, **kw), use_tqdm=False)[0]


def _check_person(text):
    obj = json.loads(text)
    assert set(obj) == {"name", "age"}   # strict: no extra keys
    assert isinstance(obj["name"], str) and isinstance(obj["age"], int) and not isinstance(obj["age"], bool)


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, seed=3)])
def test_json_schema_output_validates(llm, prompt, kw):
    out = _gen(llm, prompt, StructuredOutputsParams(json=PERSON), **kw).outputs[0]
    assert out.finish_reason == "stop"
    _check_person(out.text)


def test_seeded_grammar_output_repeats(llm, prompt):
    so = {"json": json.dumps(PERSON)}   # the schema as JSON text, and the spec as a dict
    a = _gen(llm, prompt, so, temperature=1.0, seed=11).outputs[0]
    b = _gen(llm, prompt, so, temperature=1.0, seed=11).outputs[0]
    assert a.token_ids == b.token_ids
    _check_person(a.text)


def test_regex_choice_and_ebnf(llm, prompt):
    out = _gen(llm, prompt, {"regex": r"[A-Z][a-z]+ is \d{2} years old"}).outputs[0]
    assert re.fullmatch(r"[A-Z][a-z]+ is \d{2} years old", out.text), out.text
    choices = ["red", "green", "blue"]
    for seed in (0, 1, 2):
        out = _gen(llm, prompt, {"choice": choices}, temperature=1.0, seed=seed).outputs[0]
        assert out.text in choices and out.finish_reason == "stop"
    # with ignore_eos the EOS check does not stop it: the grammar's end does
    out = _gen(llm, prompt, {"choice": choices}, ignore_eos=True).outputs[0]
    assert out.text in choices and out.finish_reason == "stop"
    ebnf = 'root ::= "Name: " name ", age " digit digit\nname ::= [A-Z] [a-z]+\ndigit ::= [0-9]'
    out = _gen(llm, prompt, {"grammar": ebnf}).outputs[0]
    assert re.fullmatch(r"Name: [A-Z][a-z]+, age \d\d", out.text), out.text


def test_json_object_is_a_json_object(llm, prompt):
    out = _gen(llm, prompt, {"json_object": True, "disable_any_whitespace": True}, max_tokens=64).outputs[0]
    assert out.finish_reason == "stop"
    assert isinstance(json.loads(out.text), dict)
    assert "\n" not in out.text


def test_max_tokens_cuts_mid_object(llm, prompt):
    out = _gen(llm, prompt, {"json": PERSON}, max_tokens=4).outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    assert out.text.startswith("{")
    with pytest.raises(ValueError):
        json.loads(out.text)


def test_n2_each_sequence_has_its_own_matcher(llm, prompt):
    out = _gen(llm, prompt, {"json": PERSON}, n=2, temperature=1.0, seed=5, max_tokens=64)
    assert len(out.outputs) == 2
    for o in out.outputs:
        assert o.finish_reason == "stop"
        _check_person(o.text)


@pytest.mark.parametrize("so, words", [
    ({"json": {"type": "objectx"}}, ["json", "objectx"]),
    ({"regex": "(ab"}, ["regex", "parenthesis"]),
    ({"grammar": "root ::= foo"}, ["grammar", "foo"]),
    ({"json": "{not json"}, ["json", "not valid JSON"]),
])
def test_invalid_spec_is_refused_at_add_request(llm, so, words):
    with pytest.raises(TidalError) as e:
        llm.engine.add_request("bad", "hi", SamplingParams(structured_outputs=so))
    assert all(w in e.value.message for w in words), e.value.message
    assert "/project/" not in e.value.message   # xgrammar's source path is cut
    assert not llm.engine.has_unfinished_requests()


def test_plain_requests_unchanged_beside_a_grammar(llm, prompt):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompt, plain, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate([prompt, prompt], [plain, SamplingParams(temperature=0, max_tokens=12,
                                                                  structured_outputs={"regex": r"\d+"})],
                         use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone
    assert re.fullmatch(r"\d+", mixed[1].outputs[0].text)


def test_grammar_request_waits_for_its_compile(llm, prompt):
    """A request whose grammar is still compiling is not scheduled; the others run meanwhile."""
    eng = llm.engine
    pending = Future()
    real = eng.grammars.compiler.submit(StructuredOutputsParams(regex=r"[0-9]{3}"))
    compile_ = eng.grammars.compile
    eng.grammars.compile = lambda params: pending if params.structured_outputs is not None else None
    try:
        eng.add_request("g", None, SamplingParams(temperature=0, max_tokens=8, structured_outputs={"regex": "x"}),
                        prompt_token_ids=prompt["prompt_token_ids"])
        eng.add_request("p", None, SamplingParams(temperature=0, max_tokens=2), prompt_token_ids=[1, 2, 3])
        eng.step()
        assert list(eng.last_scheduler_output.num_scheduled_tokens) == ["p"]
        pending.set_result(real.result())
        pending = Future()   # for the next request, which is aborted before its compile ends
        outs = {}
        while eng.has_unfinished_requests():
            outs.update({o.request_id: o for o in eng.step() if o.finished})
        eng.add_request("aborted", None, SamplingParams(structured_outputs={"regex": "x"}), prompt_token_ids=[1, 2])
        assert [r.request_id for r in eng.grammars.waiting] == ["aborted"]
        eng.abort_request("aborted")
        assert eng.grammars.waiting == [] and not eng.has_unfinished_requests()
    finally:
        eng.grammars.compile = compile_
    assert re.fullmatch(r"[0-9]{3}", outs["g"].outputs[0].text)


def test_preemption_and_chunked_prefill_keep_json_valid(llm, prompt):
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs={"json": PERSON})
    other = {"prompt_token_ids": llm.apply_chat_template(
        [{"role": "user", "content": "Give a JSON record of a famous painter: name and age."}])}
    prompts = [prompt, other, prompt, other]
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    small = LLM("smollm2", dtype="float32", num_kv_blocks=14, block_size=8, enable_prefix_caching=False,
                max_num_batched_tokens=24)
    got = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == ref
    for o in got:
        _check_person(o.outputs[0].text)


# ---- the pieces, without the model ------------------------------------------------------------

def test_compile_cache_compiles_a_spec_once(llm):
    cache = GrammarCompilerCache(llm.tokenizer, llm.engine.runner.vocab_size, [2], max_entries=2)
    a = cache.submit(StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}}))
    b = cache.submit(StructuredOutputsParams(json={"properties": {"a": {"type": "integer"}}, "type": "object"}))
    assert a is b
    a.result()
    assert cache.num_compiled == 1
    cache.submit(StructuredOutputsParams(regex="a+")).result()
    cache.submit(StructuredOutputsParams(regex="b+")).result()   # evicts the schema (least recently used)
    assert len(cache) == 2 and cache.num_compiled == 3
    c = cache.submit(StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}}))
    assert c is not a
    c.result()
    assert cache.num_compiled == 4
    cache.shutdown()


def test_matcher_accepts_rolls_back_and_terminates(llm):
    tok = llm.tokenizer
    cache = GrammarCompilerCache(tok, llm.engine.runner.vocab_size, [2])
    g = RequestGrammar(cache.submit(StructuredOutputsParams(choice=["yes", "no"])))
    ids = tok.encode("yes", add_special_tokens=False)
    assert not g.accept(tok.encode("maybe", add_special_tokens=False)[0])
    assert all(g.accept(t) for t in ids) and not g.is_terminated
    g.rollback(len(ids))
    assert g.num_accepted == 0
    assert all(g.accept(t) for t in tok.encode("no", add_special_tokens=False))
    assert g.accept(2) and g.is_terminated
    with pytest.raises(ValueError):
        g.rollback(99)
    cache.shutdown()


def test_bitmask_masks_padded_vocab_and_only_grammar_rows(llm):
    """Logits wider than the tokenizer's vocabulary: the padding columns are masked on grammar rows;
    a row without a grammar is left exactly as it was."""
    tok = llm.tokenizer
    width = len(tok) + 40
    cache = GrammarCompilerCache(tok, width, [2])
    g = RequestGrammar(cache.submit(StructuredOutputsParams(regex="[0-9]+")))
    mask = build_bitmask(["r"], [g], width)
    logits = torch.randn(3, width)
    before = logits.clone()
    apply_bitmask(logits, [1], mask)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero()[:, 0].tolist()
    assert allowed and all(t < len(tok) for t in allowed)
    assert all(re.fullmatch(r"[0-9]+", tok.decode([t])) for t in allowed)
    cache.shutdown()
    cache = GrammarCompilerCache(tok, len(tok), [2])   # a grammar, and so a bitmask, narrower than the logits
    g = RequestGrammar(cache.submit(StructuredOutputsParams(regex="[0-9]+")))
    logits = torch.zeros(1, width)
    apply_bitmask(logits, [0], build_bitmask(["r"], [g], len(tok)))
    assert torch.isinf(logits[0, len(tok):]).all() and torch.isfinite(logits[0]).sum() == len(allowed)
    cache.shutdown()


def test_spec_validation_and_msgpack_round_trip():
    for bad in [{}, {"regex": "a", "choice": ["a"]}, {"choice": []}, {"choice": ["a", 1]}, {"json": 3},
                {"json": "[1]"}, {"regex": ""}, {"json_object": "yes"}]:
        with pytest.raises(TidalError):
            SamplingParams(structured_outputs=bad)
    with pytest.raises(TidalError, match="unknown field"):
        SamplingParams(structured_outputs={"json_schema": PERSON})
    p = SamplingParams(structured_outputs=StructuredOutputsParams(json=PERSON, disable_any_whitespace=True))
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(msgspec.to_builtins(p)))
    q = SamplingParams(**wire)   # what engine_core does with a request from the server process
    assert q.structured_outputs == p.structured_outputs
    assert q.structured_outputs.cache_key() == p.structured_outputs.cache_key()


def test_from_openai_request():
    assert from_openai_request(None) is None
    assert from_openai_request({"type": "text"}) is None
    assert from_openai_request({"type": "json_object"}) == StructuredOutputsParams(json_object=True)
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    assert from_openai_request(rf) == StructuredOutputsParams(json=PERSON)
    assert from_openai_request({"type": "json_schema", "json_schema": {"name": "x"}}).json_object
    assert from_openai_request(guided_regex=r"\d+") == StructuredOutputsParams(regex=r"\d+")
    assert from_openai_request(guided_choice=["a", "b"]).choice == ["a", "b"]
    assert from_openai_request(guided_json=PERSON).json == PERSON
    assert from_openai_request(guided_grammar='root ::= "a"').grammar == 'root ::= "a"'
    assert from_openai_request(structured_outputs={"regex": "a"}).regex == "a"
    for kwargs, param in [
        (dict(response_format={"type": "xml"}), "response_format"),
        (dict(response_format="json"), "response_format"),
        (dict(response_format={"type": "json_schema"}), "response_format"),
        (dict(response_format={"type": "json_schema", "json_schema": {"schema": [1]}}), "response_format"),
        (dict(response_format={"type": "json_object"}, guided_regex="a"), "guided_regex"),
        (dict(guided_choice="a"), "guided_choice"),
        (dict(structured_outputs={"nope": 1}), "structured_outputs"),
    ]:
        with pytest.raises(TidalError) as e:
            from_openai_request(**kwargs)
        assert e.value.param == param, (kwargs, e.value.param)


def test_front_end_check_converts_each_spec_once(monkeypatch):
    from tidal.structured import compiler
    calls = []
    real = compiler.validate
    monkeypatch.setattr(compiler, "validate", lambda spec: calls.append(spec) or real(spec))
    spec = StructuredOutputsParams(regex="[0-9]{3}-once")
    compiler.check(spec)
    compiler.check(StructuredOutputsParams(regex="[0-9]{3}-once"))
    assert len(calls) == 1
    with pytest.raises(TidalError):
        compiler.check(StructuredOutputsParams(regex="a(b"))
    with pytest.raises(TidalError):   # a bad spec is never remembered as valid
        compiler.check(StructuredOutputsParams(regex="a(b"))
