"""Scheduler policies. It holds back a waiting request whose next prompt block a running request is prefilling
right now (a burst sharing a system prompt), so it takes that prefix from the cache instead of
computing it a second time; other requests still go ahead, and nothing waits on a request that is gone.
And --long-prefill-token-threshold (vLLM's knob) caps one prefill's share of a step."""
from tidal.engine.request import Request, RequestStatus
from tidal.engine.scheduler import Scheduler
from tidal.kv.block_manager import BlockManager
from tidal.sampling import SamplingParams

BS = 4


def _req(rid: str, tokens: list[int], t: float, **params) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4, **params), seed=0, arrival_time=t)


def _step(sched: Scheduler, bm: BlockManager) -> dict[str, int]:
    """One schedule(), then what the engine does after the model ran: advance and cache the blocks."""
    so = sched.schedule()
    for req in sched.running:
        n = so.num_scheduled_tokens.get(req.request_id, 0)
        req.num_computed_tokens += n
        bm.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
        if n and req.num_computed_tokens == req.num_tokens:
            req.append_output(1)    # the sampled token
    return dict(so.num_scheduled_tokens)


def test_a_burst_computes_a_shared_prefix_once():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=12)
    prefix = list(range(100, 116))                      # 4 full blocks
    a, b = _req("a", prefix + [1, 2], 0.0), _req("b", prefix + [3, 4], 1.0)
    other = _req("c", list(range(200, 206)), 2.0)       # nothing in common
    for r in (a, b, other):
        sched.add(r)
    assert _step(sched, bm) == {"a": 12}                # a's first chunk takes the whole budget
    # a prefills block 3 (tokens 12-15) now: b, whose next uncached block that is, waits; c goes ahead
    assert _step(sched, bm) == {"a": 6, "c": 6}
    assert sched.num_prefix_waits == 1 and b.status == RequestStatus.WAITING
    # then b takes the whole shared prefix from the cache and computes only its own 2 tokens
    assert _step(sched, bm) == {"a": 1, "c": 1, "b": 2}
    assert b.num_cached_tokens == len(prefix)


def test_no_wait_without_a_running_owner_or_prefix_caching():
    for caching in (True, False):
        bm = BlockManager(64, BS, enable_prefix_caching=caching)
        sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
        prefix = list(range(100, 116))
        a, b = _req("a", prefix + [1], 0.0), _req("b", prefix + [2], 1.0)
        sched.add(a)
        sched.add(b)
        if caching:   # a is admitted first; b waits one step, then runs on a's cached prefix
            assert _step(sched, bm) == {"a": 17}
            assert _step(sched, bm) == {"a": 1, "b": 1}
            assert b.num_cached_tokens == 16
        else:         # no prefix cache: nothing to wait for
            assert _step(sched, bm) == {"a": 17, "b": 17}
    # the owner goes away mid-prefill (aborted): the waiting request is not stuck behind it
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    a, b = _req("a", prefix + [1], 0.0), _req("b", prefix + [2], 1.0)
    sched.add(a)
    sched.add(b)
    assert _step(sched, bm) == {"a": 8}
    sched.remove(a)
    got = _step(sched, bm)
    assert got["b"] == 8 and b.num_cached_tokens == 8   # the two blocks a finished are reused


def test_prompt_logprobs_never_wait_nor_are_waited_for():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    prefix = list(range(100, 116))
    a = _req("a", prefix + [1], 0.0, prompt_logprobs=1)
    b = _req("b", prefix + [2], 1.0)
    sched.add(a)
    sched.add(b)
    assert _step(sched, bm) == {"a": 17, "b": 17}


def test_long_prefill_token_threshold_leaves_room_for_short_prompts():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=12, long_prefill_token_threshold=4)
    long, short = _req("long", list(range(100, 140)), 0.0), _req("short", [7, 8, 9], 1.0)
    sched.add(long)
    sched.add(short)
    assert _step(sched, bm) == {"long": 4, "short": 3}   # without the cap: {"long": 12}
    assert _step(sched, bm) == {"long": 4, "short": 1}   # short decodes while long prefills on
    plain = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=12)
    plain.add(_req("long", list(range(100, 140)), 0.0))
    assert plain.schedule().num_scheduled_tokens == {"long": 12}


def test_the_threshold_is_an_engine_flag():
    import pytest

    from tidal.config import EngineConfig
    from tidal.errors import TidalError
    assert EngineConfig(long_prefill_token_threshold=256).long_prefill_token_threshold == 256
    with pytest.raises(TidalError, match="long-prefill-token-threshold"):
        EngineConfig(long_prefill_token_threshold=-1)


def test_short_prefill_tokens_lets_warm_requests_pass_a_cold_prefill():
    """The burst case: group A's prefix is cached, group B's cold prompt is mid-prefill. FCFS keeps A's
    follower waiting until B's prefill is done; with short_prefill_tokens it goes first, and B takes the rest
    of the budget."""
    def run(short: int) -> list[dict[str, int]]:
        bm = BlockManager(64, BS)
        sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=12, short_prefill_tokens=short)
        prefix_a = list(range(100, 116))
        a = _req("a", prefix_a + [1, 2], 0.0)
        sched.add(a)
        while a.num_computed_tokens < 18:                 # A's prompt is computed and cached
            _step(sched, bm)
        sched.add(_req("b", list(range(300, 340)), 1.0))  # cold, 40 tokens
        first = _step(sched, bm)                          # a decodes, b starts its prefill
        sched.add(_req("a2", prefix_a + [3, 4], 2.0))     # warm: 2 uncached tokens
        return [first, _step(sched, bm), _step(sched, bm)]
    fcfs, short = run(0), run(4)
    assert fcfs[0] == short[0] == {"a": 1, "b": 11}
    assert fcfs[1] == {"a": 1, "b": 11} and "a2" not in fcfs[2]   # a2 waits behind b's prefill
    assert short[1] == {"a": 1, "a2": 2, "b": 9}                  # a2 goes first, b takes what is left
    assert short[2]["a2"] == 1                                    # ... and a2 is already decoding


def test_short_prefill_tokens_is_an_engine_flag():
    import pytest

    from tidal.config import EngineConfig
    from tidal.errors import TidalError
    assert EngineConfig(short_prefill_tokens=256).short_prefill_tokens == 256
    with pytest.raises(TidalError, match="short-prefill-tokens"):
        EngineConfig(short_prefill_tokens=-1)
