"""Jump-forward decoding: where a grammar allows exactly one next token, the engine core appends it
without a decode step. The output must be the same token for token as plain masked decoding (greedy
and seeded, with n > 1 and under preemption), and the saved steps are counted."""
import pytest

from tidal import LLM, SamplingParams
from tidal.structured.matcher import RequestGrammar

SPECS = [
    {"json": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}},
    {"json": {"type": "object", "properties": {"colour": {"enum": ["crimson red", "navy blue"]},
                                               "items": {"type": "array", "items": {"type": "integer"},
                                                         "minItems": 2, "maxItems": 3}},
              "required": ["colour", "items"]}, "disable_any_whitespace": True},
    {"choice": ["The capital city of France", "The capital city of Germany"]},
    {"regex": r"Answer: (yes|no)\. Confidence: [0-9]{2}%"},
]


def _run(jump_forward: bool, **engine_args):
    llm = LLM("smollm2", dtype="float32", device="cpu", enable_jump_forward=jump_forward, **engine_args)
    params = [SamplingParams(temperature=t, seed=3, max_tokens=60, n=n, structured_outputs=s)
              for s in SPECS for t, n in ((0, 1), (0.8, 2))]
    outs = llm.generate(["Describe a person as JSON:"] * len(params), params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs], llm.engine.stats


@pytest.fixture(scope="module")
def masked():
    return _run(False)


def test_jump_forward_output_equals_masked_decoding(masked):
    tokens, stats = _run(True)
    assert stats["jump_forward_tokens"] > 10, stats   # the enum, the choice and the regex force many tokens
    assert masked[1]["jump_forward_tokens"] == 0
    assert tokens == masked[0]


def test_jump_forward_under_preemption_equals_masked_decoding(masked):
    # a pool this small preempts (recompute): the resumed request carries its forced tokens as outputs
    llm_tokens, stats = _run(True, num_kv_blocks=12, max_num_seqs=8)
    assert stats["jump_forward_tokens"] > 10
    assert llm_tokens == masked[0]


def test_forced_token_is_the_only_allowed_one():
    import xgrammar as xgr
    from concurrent.futures import Future
    llm = LLM("smollm2", dtype="float32", device="cpu", num_kv_blocks=64)
    tok, vocab = llm.tokenizer, llm.engine.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[2])
    fut = Future()
    fut.set_result(xgr.GrammarCompiler(info).compile_grammar(xgr.Grammar.from_ebnf('root ::= "Paris, France"')))
    g = RequestGrammar(fut)
    assert g.forced_token(vocab) is None   # "P", "Par", "Paris", ... are all allowed: the model chooses
    for t in tok.encode("Paris, Franc", add_special_tokens=False):
        assert g.accept(t)
    e = g.forced_token(vocab)
    assert e is not None and tok.decode([e]) == "e"
    mask = xgr.allocate_token_bitmask(1, vocab)
    g.fill_bitmask(mask, 0)   # the row computed for the question serves the step's batch bitmask
    bits = [(w, int(x) & 0xFFFFFFFF) for w, x in enumerate(mask[0].tolist()) if x]
    assert bits == [(e // 32, 1 << (e % 32))]
    assert g.accept(e) and g.forced_token(vocab) == 2   # then only the stop token
