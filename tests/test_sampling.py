"""SamplingParams validation and the batched sampler: exact masks, exact penalties, seeded
reproducibility whatever the batch, and the sampled distribution."""
import math
import random

import pytest
import torch

from tidal.errors import TidalError
from tidal.sampling import (Sampler, SamplingMetadata, SamplingParams, filter_logits, plain_greedy, process_logits)
from tidal.sampling_rng import row_uniforms

CPU = torch.device("cpu")
INF = math.inf


def meta_for(params, logits, seeds=None, prompts=None, outputs=None, eos=(0,)):
    B, V = logits.shape
    return SamplingMetadata.build(params, seeds if seeds is not None else list(range(B)),
                                  prompts or [[] for _ in range(B)], outputs or [[] for _ in range(B)],
                                  set(eos), V, CPU)


def sample(params, logits, **kw):
    return Sampler()(logits, meta_for(params, logits, **kw))


# ---------------------------------------------------------------- params

@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1.5), ("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.1),
    ("temperature", float("nan")), ("temperature", INF), ("top_p", 0.0), ("top_p", 1.01), ("top_k", -2),
    ("top_k", 2.5), ("min_p", -0.1), ("min_p", 1.5), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1), ("frequency_penalty", 3.0), ("logprobs", -1),
    ("logprobs", 21), ("prompt_logprobs", 21), ("min_tokens", -1), ("seed", 1.5), ("stop", [""]),
    ("stop", ["ok", 3]), ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]),
])
def test_bad_params_raise_with_the_field_named(field, value):
    with pytest.raises(TidalError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field and e.value.message


def test_min_tokens_above_max_tokens_is_rejected_and_stop_is_normalized():
    with pytest.raises(TidalError) as e:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert e.value.param == "min_tokens"
    SamplingParams(max_tokens=None, min_tokens=500)  # no limit: any minimum is fine
    assert SamplingParams(stop="###").stop == ["###"] and SamplingParams().stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.5).greedy


# ---------------------------------------------------------------- seeds

def _random_params(rng):
    return SamplingParams(temperature=rng.choice([0.0, 0.7, 1.3]), top_k=rng.choice([0, 5, 50]),
                          top_p=rng.choice([1.0, 0.8]), min_p=rng.choice([0.0, 0.05]),
                          repetition_penalty=rng.choice([1.0, 1.3]), presence_penalty=rng.choice([0.0, 0.5]),
                          frequency_penalty=rng.choice([0.0, -0.4]), min_tokens=rng.choice([0, 3]),
                          logprobs=rng.choice([None, 2]))


def test_seeded_row_gives_same_tokens_alone_and_inside_any_batch():
    V, steps = 100, 25
    gen = torch.Generator().manual_seed(0)
    target = SamplingParams(temperature=1.5, top_p=0.97, seed=1234)
    alone, batched, batched_again = [], [], []
    rng = random.Random(1)
    for step in range(steps):
        row = torch.randn(1, V, generator=gen)
        out = [[7] * step]
        alone.append(sample([target], row, seeds=[1234], outputs=out).token_ids.item())
        # Row 5 of 8; the other rows change every step, with every pipeline stage in use.
        batch = torch.randn(8, V, generator=gen)
        batch[5] = row[0]
        params = [_random_params(rng) for _ in range(8)]
        params[5] = target
        seeds = [rng.randrange(2**63) for _ in range(8)]
        seeds[5] = 1234
        outputs = [[rng.randrange(V) for _ in range(rng.randrange(6))] for _ in range(8)]
        outputs[5] = out[0]
        prompts = [[rng.randrange(V) for _ in range(5)] for _ in range(8)]
        m = meta_for(params, batch, seeds=seeds, prompts=prompts, outputs=outputs)
        assert m.top_k is not None and m.repetition_penalty is not None
        batched.append(Sampler()(batch, m).token_ids[5].item())
        batched_again.append(Sampler()(batch, m).token_ids[5].item())
    assert alone == batched == batched_again
    assert len(set(alone)) > 10  # really random, not stuck on the argmax


def test_different_seeds_give_different_tokens_and_steps_advance_the_stream():
    logits = torch.zeros(1, 1000)  # uniform: two independent draws collide 1 time in 1000
    def run(seed):
        return [sample([SamplingParams(seed=seed)], logits, seeds=[seed], outputs=[[1] * s]).token_ids.item()
                for s in range(20)]
    a, b = run(1), run(2)
    assert a == run(1) and a != b
    assert len(set(a)) >= 18


def test_uniforms_stay_strictly_inside_0_1_for_extreme_seeds():
    seeds = torch.tensor([0, -1, 2**63 - 1, -2**63, 12345] * 2000, dtype=torch.int64)
    steps = torch.arange(10000, dtype=torch.int64)
    u = row_uniforms(seeds, steps)
    assert u.dtype == torch.float64 and (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    # seeds beyond int64 are reduced to their low 64 bits rather than rejected
    big = SamplingMetadata.build([SamplingParams()], [2**64 + 5], [[]], [[]], set(), 4, CPU)
    assert big.seeds.item() == 5


@pytest.mark.parametrize("vary", ["seed", "step"])
def test_sampled_frequencies_match_the_distribution(vary):
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    N = 20000
    logits = probs.log().expand(N, 4).contiguous()
    params = [SamplingParams(temperature=1.0)] * N
    seeds = list(range(N)) if vary == "seed" else [99] * N
    outputs = [[]] * N if vary == "seed" else [range(i) for i in range(N)]  # only lengths matter here
    tokens = sample(params, logits, seeds=seeds, outputs=outputs).token_ids
    freq = torch.bincount(tokens, minlength=4).float() / N
    assert torch.allclose(freq, probs, atol=0.012), freq  # 3.5 sigma at N = 20000


def test_filtered_distribution_is_renormalized_and_temperature_sharpens():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    N = 20000
    logits = probs.log().expand(N, 4).contiguous()
    top2 = sample([SamplingParams(top_k=2)] * N, logits).token_ids
    assert torch.allclose(torch.bincount(top2, minlength=4).float() / N,
                          torch.tensor([0, 0, 3 / 7, 4 / 7]), atol=0.012)
    cold = sample([SamplingParams(temperature=0.5)] * N, logits).token_ids
    sharp = probs ** 2 / (probs ** 2).sum()
    assert torch.allclose(torch.bincount(cold, minlength=4).float() / N, sharp, atol=0.012)


# ---------------------------------------------------------------- masks

def _masked(params, logits):
    m = meta_for(params, logits)
    return filter_logits(process_logits(logits, m), m)


def _kept(masked):
    return (~torch.isinf(masked)).tolist()


def test_top_k_keeps_exactly_the_k_largest_and_ties_at_the_kth():
    row = [1.0, 5.0, 3.0, 4.0, 2.0]
    logits = torch.tensor([row, row, [1.0, 3.0, 3.0, 2.0, 0.0], row, row, row])  # row 2: tie at the k-th value
    for top_p in (1.0, 0.999999):  # alone (partial topk) and with top-p (full sort): same masks
        out = _masked([SamplingParams(top_k=k, top_p=top_p) for k in (2, 0, 1, -1, 4, 3)], logits)
        assert _kept(out) == [[False, True, False, True, False], [True] * 5, [False, True, True, False, False],
                              [True] * 5, [False, True, True, True, True], [False, True, True, True, False]]
        assert torch.equal(out[~torch.isinf(out)], logits[~torch.isinf(out)])  # kept values untouched


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([0.1, 0.4, 0.2, 0.3]).log().expand(5, 4).contiguous()
    params = [SamplingParams(top_p=0.6), SamplingParams(top_p=0.75), SamplingParams(top_p=0.05),
              SamplingParams(top_p=1.0), SamplingParams(top_p=0.95)]
    assert _kept(_masked(params, logits)) == [[False, True, False, True], [False, True, True, True],
                                              [False, True, False, False], [True] * 4, [True] * 4]


def test_top_p_applies_after_top_k_on_the_renormalized_mass():
    logits = torch.tensor([[0.1, 0.4, 0.2, 0.3]]).log().expand(4, 4).contiguous()
    # top-3 leaves [.4, .3, .2] / .9 = [.444, .333, .222]: p=0.5 needs two of them (0.4 alone would not).
    # top-2 leaves [.4, .3] / .7 = [.571, .429]: p=0.55 needs only the first (on the raw .4 it would need two).
    params = [SamplingParams(top_k=3, top_p=0.5), SamplingParams(top_k=3, top_p=0.4),
              SamplingParams(top_k=2, top_p=0.99), SamplingParams(top_k=2, top_p=0.55)]
    assert _kept(_masked(params, logits)) == [[False, True, False, True], [False, True, False, False],
                                              [False, True, False, True], [False, True, False, False]]


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    logits = torch.tensor([0.5, 0.25, 0.15, 0.1]).log().expand(3, 4).contiguous()
    logits = torch.cat([logits, torch.tensor([[0.5, 0.1, 0.5, 0.2]]).log()])
    params = [SamplingParams(min_p=m) for m in (0.25, 0.4, 0.0, 1.0)]
    assert _kept(_masked(params, logits)) == [[True, True, True, False], [True, True, False, False], [True] * 4,
                                              [True, False, True, False]]  # min_p=1: only the (tied) top


def test_masked_tokens_are_never_drawn():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(500, 64, generator=gen)
    logits[:, 10:] = -INF  # e.g. padded vocabulary entries
    out = sample([SamplingParams(temperature=2.0)] * 500, logits).token_ids
    assert (out < 10).all()
    top1 = sample([SamplingParams(temperature=5.0, top_k=1)] * 500, logits).token_ids
    assert torch.equal(top1, logits.argmax(-1))


def test_draw_never_lands_past_the_last_live_token(monkeypatch):
    # Even a uniform of exactly 1 (the hash never gives one) must not select the masked tail.
    import tidal.sampling_rng as sampling_rng
    monkeypatch.setattr(sampling_rng, "row_uniforms", lambda seeds, steps: torch.ones(len(seeds), dtype=torch.float64))
    logits = torch.tensor([[0.0, 0.0, -INF, -INF], [0.3, -INF, 0.1, -INF]])
    assert sample([SamplingParams()] * 2, logits).token_ids.tolist() == [1, 2]


# ---------------------------------------------------------------- penalties, min_tokens, greedy

def test_penalties_give_exact_logits():
    row = [2.0, -1.0, 0.5, -3.0, 1.0]
    logits = torch.tensor([row, row, row])
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams()]
    m = meta_for(params, logits, prompts=[[0], [0], [0]], outputs=[[1, 2, 2]] * 3)
    expected = torch.tensor([
        # prompt-only token 0 gets only the repetition penalty; output tokens get all three
        [2.0 / 2, -1.0 * 2 - 0.25 - 0.5, 0.5 / 2 - 0.5 - 0.5, -3.0, 1.0],
        [2.0, -1.0 - 0.25 - 0.5, 0.5 - 0.5 - 0.5, -3.0, 1.0],
        row,
    ])
    assert torch.allclose(process_logits(logits, m), expected, atol=1e-6, rtol=0)
    assert torch.equal(logits, torch.tensor([row] * 3))  # the caller's logits are not modified


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 7.0]] * 4)  # eos = 2 is the argmax, stop id 3 next
    greedy = dict(temperature=0.0, min_tokens=3, stop_token_ids=[3])
    params = [SamplingParams(**greedy), SamplingParams(**greedy), SamplingParams(**greedy, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=2, min_tokens=3, stop_token_ids=[3])]
    outputs = [[1, 1], [1, 1, 1], [1], [1]]
    out = sample(params, logits, outputs=outputs, eos=(2,)).token_ids.tolist()
    assert out[:3] == [4, 2, 2]  # below the minimum: eos and stop id banned; ignore_eos leaves eos alone
    assert out[3] in (1, 4)  # top-2 over what min_tokens left


def test_greedy_is_argmax_of_penalized_logits_and_fast_path_skips_filters(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 50, generator=gen)
    m = meta_for([SamplingParams(temperature=0.0)] * 6, logits)
    assert m.all_greedy and m.top_k is None and m.top_p is None and m.min_p is None and m.repetition_penalty is None
    import tidal.sampling as sampling
    monkeypatch.setattr(sampling, "draw", lambda *a: pytest.fail("all-greedy batch must not draw"))
    assert torch.equal(Sampler()(logits, m).token_ids, logits.argmax(-1))
    monkeypatch.undo()
    # Mixed batch: greedy rows still take the argmax, after the repetition penalty.
    logits[0, 7] = 100.0
    params = [SamplingParams(temperature=0.0, repetition_penalty=1000.0)] + [SamplingParams(temperature=0.0)] * 2 \
        + [SamplingParams(temperature=1.0)] * 3
    tokens = sample(params, logits, outputs=[[7]] + [[]] * 5).token_ids
    assert tokens[0] != 7 and tokens[0] == logits[0].topk(2).indices[1]
    assert torch.equal(tokens[1:3], logits[1:3].argmax(-1))


@pytest.mark.parametrize("knobs,outs,plain", [
    ({}, [], True),
    ({"min_tokens": 2, "max_tokens": 8}, [5, 6], True),           # min_tokens reached: nothing banned any more
    ({"min_tokens": 2, "max_tokens": 8}, [5], False),
    ({"temperature": 0.7}, [], False),
    ({"logprobs": 0}, [], False),
    ({"repetition_penalty": 1.3}, [], False),
    ({"presence_penalty": 0.5}, [], False),
    ({"frequency_penalty": 0.5}, [], False),
    ({"logit_bias": {3: 100.0}}, [], False),
    ({"allowed_token_ids": [1, 2]}, [], False),
    ({"bad_words_token_ids": [[4]]}, [], False),
])
def test_plain_greedy_only_when_argmax_of_raw_logits_is_the_whole_step(knobs, outs, plain):
    """The runner skips SamplingMetadata and the sampler on plain-greedy batches; it must say so only where
    the sampler would return the raw argmax."""
    params = SamplingParams(**{"temperature": 0.0, **knobs})
    assert plain_greedy([SamplingParams(temperature=0.0), params], [[], outs]) is plain
    if plain:
        logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(9))
        assert torch.equal(sample([SamplingParams(temperature=0.0), params], logits, outputs=[[], outs]).token_ids,
                           logits.argmax(-1))


def test_logprobs_are_log_softmax_of_raw_logits():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 30, generator=gen).to(torch.bfloat16)
    params = [SamplingParams(logprobs=3, temperature=0.3, repetition_penalty=1.5), SamplingParams(logprobs=0),
              SamplingParams(), SamplingParams(logprobs=1, temperature=0.0)]
    out = sample(params, logits, outputs=[[1, 2]] * 4)
    ref = logits.float().log_softmax(-1)
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    values, ids = out.top_logprobs
    assert values.shape == ids.shape == (4, 3)  # K = the largest number any row asked for
    assert torch.allclose(values, ref.topk(3).values) and torch.equal(ids, ref.topk(3).indices)
    plain = sample([SamplingParams()] * 2, logits[:2])
    assert plain.logprobs is None and plain.top_logprobs is None
    only_chosen = sample([SamplingParams(logprobs=0)], logits[:1])
    assert only_chosen.logprobs is not None and only_chosen.top_logprobs is None
