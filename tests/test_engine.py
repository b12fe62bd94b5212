"""The engine on the real model (fp32, CPU): batch invariance, prefix caching, preemption,
chunked prefill, priorities, aborts, admission errors, n > 1 and stop strings."""
import random

import pytest
import torch

from tidal import LLM, SamplingParams, TidalError
from tidal.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2", dtype="float32", device="cpu", num_kv_blocks=1024, block_size=16,
               max_num_batched_tokens=512)


def _prompts(n, lo, hi, seed=0):
    r = random.Random(seed)
    return [[r.randrange(100, 49000) for _ in range(r.randint(lo, hi))] for _ in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _run(llm, prompts, params=GREEDY):
    return [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]


def test_batch_invariance(llm):
    """Each request's greedy output in a batch of 16 mixed-length prompts equals its output alone."""
    prompts = _prompts(16, 3, 300)
    batched = _run(llm, prompts)
    llm.engine.block_manager.reset_prefix_cache()
    for p, b in zip(prompts, batched):
        assert _run(llm, [p]) == [b]
    assert llm.engine.block_manager.num_used_blocks == 0


def test_prefix_cache_hit_gives_same_logprobs(llm):
    shared = _prompts(1, 100, 100, seed=3)[0]
    a, b = shared + [1000, 1001, 1002], shared + [2000, 2001]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    llm.engine.block_manager.reset_prefix_cache()
    miss = llm.generate([{"prompt_token_ids": b}], params, use_tqdm=False)[0]
    assert miss.num_cached_tokens == 0
    llm.engine.block_manager.reset_prefix_cache()
    llm.generate([{"prompt_token_ids": a}], params, use_tqdm=False)
    hit = llm.generate([{"prompt_token_ids": b}], params, use_tqdm=False)[0]
    assert hit.num_cached_tokens == 96  # 6 full blocks of the 100 shared tokens
    assert hit.token_ids == miss.token_ids
    for lp_hit, lp_miss in zip(hit.outputs[0].logprobs, miss.outputs[0].logprobs):
        assert lp_hit.keys() == lp_miss.keys()
        for t in lp_hit:
            assert abs(lp_hit[t] - lp_miss[t]) < 1e-4
    assert llm.engine.block_manager.prefix_hit_rate > 0


def test_preemption_under_small_pool_keeps_outputs():
    prompts = _prompts(6, 40, 60, seed=5)
    big = LLM("smollm2", dtype="float32", num_kv_blocks=256, block_size=8)
    ref = _run(big, prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    small = LLM("smollm2", dtype="float32", num_kv_blocks=24, block_size=8, enable_prefix_caching=False)
    got = _run(small, prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert small.engine.scheduler.num_preemptions > 0
    assert got == ref
    assert small.engine.block_manager.num_used_blocks == 0


def test_chunked_prefill_does_not_stall_decodes():
    llm = LLM("smollm2", dtype="float32", num_kv_blocks=256, max_num_batched_tokens=64)
    eng = llm.engine
    eng.add_request("short", None, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                    prompt_token_ids=_prompts(1, 10, 10)[0])
    eng.step()  # prefill of the short prompt; it decodes from now on
    eng.add_request("long", None, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                    prompt_token_ids=_prompts(1, 300, 300, seed=9)[0])
    chunks = []
    while eng.scheduler.running or eng.scheduler.waiting:
        so = eng.scheduler.schedule()
        sizes = so.num_scheduled_tokens
        assert so.total_num_scheduled_tokens == sum(sizes.values()) <= 64
        if "long" in sizes and "short" in [r.request_id for r in eng.scheduler.running]:
            assert sizes.get("short") == 1  # the decode advances every step while the prompt is chunked
        chunks.append(sizes.get("long", 0))
        eng.core._update(so, eng.runner.execute_model(so), {})   # run the step we scheduled
    assert sum(1 for c in chunks if c > 0) >= 5  # 300 prompt tokens over a 64-token budget


def test_priority_order():
    llm = LLM("smollm2", dtype="float32", num_kv_blocks=128, max_num_seqs=1)
    eng = llm.engine
    for rid, prio in [("low", 5), ("high", -1), ("mid", 0)]:
        eng.add_request(rid, None, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                        prompt_token_ids=[200, 300, 400], priority=prio)
    order = []
    while eng.has_unfinished_requests():
        order += [o.request_id for o in eng.step() if o.finished]
    assert order == ["high", "mid", "low"]


def test_preemption_picks_lowest_priority():
    llm = LLM("smollm2", dtype="float32", num_kv_blocks=12, block_size=4, enable_prefix_caching=False)
    eng = llm.engine
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    eng.add_request("important", None, p, prompt_token_ids=[300] * 6, priority=0)
    eng.add_request("background", None, p, prompt_token_ids=[400] * 6, priority=10)
    victims = []
    while eng.has_unfinished_requests():
        eng.step()
        victims += eng.last_scheduler_output.preempted_req_ids
    assert victims and set(victims) == {"background"}


def test_abort_frees_blocks(llm):
    eng = llm.engine
    for i in range(4):
        eng.add_request(f"ab{i}", None, SamplingParams(max_tokens=50), prompt_token_ids=_prompts(1, 40, 40, i)[0])
    for _ in range(3):
        eng.step()
    assert eng.block_manager.num_used_blocks > 0
    for i in range(4):
        out = eng.abort_request(f"ab{i}")
        assert out.finished and out.outputs[0].finish_reason == "abort"
    assert eng.block_manager.num_used_blocks == 0
    assert not eng.has_unfinished_requests()


def test_admission_errors(llm):
    eng = llm.engine
    with pytest.raises(TidalError, match="context"):
        eng.add_request("long", None, GREEDY, prompt_token_ids=[5] * (eng.max_model_len + 1))
    with pytest.raises(TidalError, match="empty"):
        eng.add_request("empty", None, GREEDY, prompt_token_ids=[])
    with pytest.raises(TidalError, match="cache"):
        tiny = LLM("smollm2", dtype="float32", num_kv_blocks=2, block_size=4).engine
        tiny.add_request("x", None, SamplingParams(max_tokens=100), prompt_token_ids=[5] * 4)
    with pytest.raises(TidalError):
        SamplingParams(temperature=-1)
    with pytest.raises(TidalError):
        SamplingParams(top_p=1.5)


def test_n_seed_and_stop_strings(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12)
    a = llm.generate(["Tell me a story"], params, use_tqdm=False)[0]
    b = llm.generate(["Tell me a story"], params, use_tqdm=False)[0]
    assert len(a.outputs) == 3 and [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    full = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    word = full.text.split()[1]
    cut = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=20, stop=[word]),
                       use_tqdm=False)[0]
    assert cut.finish_reason == "stop" and word not in cut.text
    assert full.text.startswith(cut.text)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_chat_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert "Paris" in out.text
