"""The step contract (engine/step_io.py): the runner driven by SchedulerOutputs alone gives the engine's
tokens and logprobs; the messages survive msgpack; the runner's own state follows new / running /
finished / preempted requests and each message carries only what changed; the resolve step gives an
offloading policy's batch a token budget that decodes the whole batch in one step."""
import msgspec
import pytest
import torch

from tidal import LLM, SamplingParams
from tidal.config import EngineConfig
from tidal.engine.input_batch import InputBatch
from tidal.engine.resolve import resolve_engine_config
from tidal.engine.step_io import (CachedRequestData, NewRequestData, SchedulerOutput, encoder,
                                  runner_output_decoder, scheduler_output_decoder)
from tidal.structured.bitmask import GrammarBitmask
from model_utils import ManualScheduler

PROMPTS = {"a": [1, 504, 3158, 314, 2391, 282], "b": [1, 6350, 6421, 28, 253, 1345, 30, 378, 1341, 314, 1345],
           "c": [1, 2270, 30]}


@pytest.fixture(scope="module")
def llm():
    # no prefix caching: the tests' own block tables write into the same KV pool as the engine's
    return LLM("smollm2", dtype="float32", num_kv_blocks=64, block_size=4, enable_prefix_caching=False)


def _engine_tokens(llm, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS.values()], params, use_tqdm=False)
    return {rid: o.outputs[0] for rid, o in zip(PROMPTS, outs)}


@pytest.mark.parametrize("chunk", [None, 4])
def test_runner_alone_gives_the_engines_tokens(llm, chunk):
    """Greedy with logprobs, and a seeded random draw (its seed and step reach the runner in the
    messages), through the runner with no scheduler and no engine, whole or in 4-token prefill chunks."""
    runner = llm.engine.runner
    for params in (SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2),
                   SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)):
        ref = _engine_tokens(llm, params)
        # the engine's seed for a single sample is params.seed (greedy ignores it)
        sched = ManualScheduler(runner.num_blocks, runner.block_size, PROMPTS, params, chunk=chunk,
                                seeds={rid: params.seed or 0 for rid in PROMPTS})
        logprobs = {rid: [] for rid in PROMPTS}
        while not all(sched.done(rid) for rid in PROMPTS):
            so = sched.schedule()
            out = runner.execute_model(so)
            assert out.req_ids == list(so.num_scheduled_tokens)
            for rid, lps in zip(out.req_ids, out.logprobs):
                logprobs[rid] += lps or []
            sched.update(so, out)
        runner.execute_model(SchedulerOutput(finished_req_ids=set(PROMPTS)))
        assert not set(PROMPTS) & set(runner.input_batch.requests)
        assert {rid: sched.outputs[rid] for rid in PROMPTS} == {rid: ref[rid].token_ids for rid in PROMPTS}
        if params.logprobs is not None:
            for rid in PROMPTS:
                assert len(logprobs[rid]) == 8
                for got, want in zip(logprobs[rid], ref[rid].logprobs):
                    assert got.keys() == want.keys()
                    assert all(abs(got[t] - want[t]) < 1e-4 for t in got)


def test_messages_round_trip_msgpack(llm):
    """A real step's SchedulerOutput (with a grammar bitmask) and ModelRunnerOutput (with logprobs and
    prompt logprobs) decode from msgpack to equal messages; the runner gives the same result for both."""
    runner = llm.engine.runner
    params = SamplingParams(temperature=0, max_tokens=2, logprobs=1, prompt_logprobs=1, logit_bias={3: 50.0},
                            structured_outputs={"regex": "[a-z]+"}, bad_words_token_ids=[[7, 8]])
    sched = ManualScheduler(runner.num_blocks, runner.block_size, {"x": PROMPTS["a"]}, params)
    so = sched.schedule()
    allowed = torch.full((1, (runner.vocab_size + 31) // 32), 0, dtype=torch.int32)
    allowed[0, 0] = 0b1110   # only tokens 1, 2, 3
    so.grammar_bitmask = GrammarBitmask(["x"], allowed, runner.vocab_size)
    back = scheduler_output_decoder.decode(encoder.encode(so))
    assert torch.equal(back.grammar_bitmask.bitmask, allowed) and back.grammar_bitmask.request_ids == ["x"]
    assert msgspec.structs.replace(back, grammar_bitmask=None) == msgspec.structs.replace(so, grammar_bitmask=None)
    assert back.scheduled_new_reqs[0].sampling_params == params
    out = runner.execute_model(back)
    assert out.sampled_token_ids[0] == [3]   # the bitmask (1, 2, 3) and the logit bias (3) both travelled
    assert len(out.prompt_logprobs["x"]) == len(PROMPTS["a"]) and out.prompt_logprobs["x"][0] is None
    assert runner_output_decoder.decode(encoder.encode(out)) == out
    runner.execute_model(SchedulerOutput(finished_req_ids={"x"}))


def test_input_batch_follows_the_messages():
    """New requests are added, running ones get only their new block ids, finished / preempted ones are
    dropped before a resumed one comes back in full with its output tokens; the runner's copies never
    alias the message's lists."""
    batch = InputBatch()
    p = SamplingParams(max_tokens=4)
    new = NewRequestData("r", [5, 6, 7], [], p, 3, [0], 0)
    rows = batch.update(SchedulerOutput([new], num_scheduled_tokens={"r": 3}, total_num_scheduled_tokens=3))
    assert [(s.req_id, n) for s, n in rows] == [("r", 3)]
    state = batch.requests["r"]
    state.append_output(9)
    assert new.output_token_ids == [] and new.block_ids == [0]
    batch.update(SchedulerOutput(scheduled_cached_reqs=CachedRequestData(["r"], [[4]], [3]),
                 num_scheduled_tokens={"r": 1}, total_num_scheduled_tokens=1))
    assert state.block_ids == [0, 4] and state.num_computed_tokens == 3 and state.token_ids == [5, 6, 7, 9]
    batch.update(SchedulerOutput(finished_req_ids={"r"}, preempted_req_ids={"r"}))
    assert batch.requests == {}
    resumed = NewRequestData("r", [5, 6, 7], [9, 11], p, 3, [2, 1], 0)
    batch.update(SchedulerOutput([resumed], num_scheduled_tokens={"r": 5}, total_num_scheduled_tokens=5))
    assert batch.requests["r"].token_ids == [5, 6, 7, 9, 11] and batch.requests["r"].block_ids == [2, 1]


def test_engine_steps_send_only_changes_and_drop_preempted_state():
    """Under preemption (a small pool): each step's messages give a request in full only when the runner
    has no state for it, then only new block ids (decode: at most one per step); a preempted id leaves the
    runner's state the same step; an idle step after the last finish empties it."""
    llm = LLM("smollm2", dtype="float32", num_kv_blocks=10, block_size=4, enable_prefix_caching=False)
    eng, runner = llm.engine, llm.engine.runner
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for rid, prompt in PROMPTS.items():
        eng.add_request(rid, None, params, prompt_token_ids=prompt)
    holds: set[str] = set()   # the ids the runner must hold state for, from the messages alone
    preempted, resumed = set(), set()
    while eng.has_unfinished_requests():
        eng.step()
        so = eng.last_scheduler_output
        holds -= so.finished_req_ids
        for new in so.scheduled_new_reqs:
            assert new.req_id not in holds
            if new.req_id in preempted:   # recompute: it comes back with what it had generated
                assert new.output_token_ids and new.num_computed_tokens == 0
                resumed.add(new.req_id)
            holds.add(new.req_id)
        assert set(so.scheduled_cached_reqs.req_ids) <= holds
        for rid, blocks in zip(so.scheduled_cached_reqs.req_ids, so.scheduled_cached_reqs.new_block_ids):
            assert len(blocks) <= -(-so.num_scheduled_tokens[rid] // 4)
        assert not so.preempted_req_ids & set(runner.input_batch.requests)
        preempted |= so.preempted_req_ids
        assert set(runner.input_batch.requests) == holds
    assert preempted and resumed   # the pool was small enough to exercise both
    eng.step()
    assert runner.input_batch.requests == {}


def test_offloading_policy_budget_decodes_its_whole_batch():
    """bs x mb sequences run at once, and the token budget holds a decode token for each of them even when
    --max-num-batched-tokens is smaller: every decode step after the prefill schedules the whole batch."""
    r = resolve_engine_config(EngineConfig(model="smollm2", dtype="float32", num_kv_blocks=64, block_size=4,
                                           policy="bs=48 mb=32", max_num_batched_tokens=1024))
    assert r.max_num_seqs == 48 * 32 and r.max_num_batched_tokens == 48 * 32 and r.num_micro_batches == 32
    plain = resolve_engine_config(EngineConfig(model="smollm2", dtype="float32", num_kv_blocks=64, block_size=4))
    assert plain.max_num_seqs == 64 and plain.max_num_batched_tokens == 1024 and plain.num_micro_batches == 1
    llm = LLM("smollm2", dtype="float32", num_kv_blocks=64, block_size=4, policy="bs=2 mb=2",
              max_num_batched_tokens=2)
    eng = llm.engine
    assert (eng.scheduler.max_num_seqs, eng.scheduler.max_num_batched_tokens) == (4, 4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[1, 504, 3158], [1, 6350], [1, 2270, 30], [1, 28, 253]]
    for i, p in enumerate(prompts):
        eng.add_request(str(i), None, params, prompt_token_ids=p)
    decode_sizes = []
    while eng.has_unfinished_requests():
        eng.step()
        sizes = eng.last_scheduler_output.num_scheduled_tokens
        if all(n == 1 for n in sizes.values()) and len(eng.runner.input_batch.requests) == 4:
            decode_sizes.append(len(sizes))
    assert decode_sizes and set(decode_sizes) == {4}
