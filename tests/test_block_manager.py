"""Block manager: allocation, ref counts, prefix hits, LRU eviction, KV events, no leaks."""
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tidal.kv.block_manager import BlockManager, hash_block
from tidal.kv.events import AllBlocksCleared, BlockRemoved, BlockStored


def make(num_blocks=8, block_size=4, **kw):
    bm = BlockManager(num_blocks, block_size, **kw)
    events = []
    bm.subscribe(events.append)
    return bm, events


def admit(bm, rid, tokens):
    """What the scheduler does for a new request: prefix lookup, then allocate the rest."""
    blocks, n = bm.get_computed_blocks(tokens)
    ok = bm.allocate_slots(rid, tokens, n, len(tokens) - n, blocks)
    return ok, blocks, n


def prefill(bm, rid, tokens):
    ok, blocks, n = admit(bm, rid, tokens)
    assert ok
    bm.cache_full_blocks(rid, tokens, len(tokens))
    return blocks, n


def check_invariants(bm):
    free = set(bm._free)
    assert len(free) == len(bm._free)
    in_tables = {}
    for table in bm._tables.values():
        for b in table:
            in_tables[b] = in_tables.get(b, 0) + 1
    for b in range(bm.num_blocks):
        assert bm._ref_count[b] >= 0
        assert bm._ref_count[b] == in_tables.get(b, 0)
        assert (b in free) == (bm._ref_count[b] == 0), b
    for h, b in bm._hash_to_block.items():
        assert bm._block_hash[b] == h
    assert sum(h is not None for h in bm._block_hash) == len(bm._hash_to_block)
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks


def test_chunked_prefill_grows_table_and_slots():
    bm, _ = make(num_blocks=8, block_size=4)
    tokens = list(range(10))
    assert bm.allocate_slots("a", tokens, 0, 3)  # chunk 1: tokens 0..2 -> 1 block
    assert len(bm.get_block_table("a")) == 1
    assert bm.allocate_slots("a", tokens, 3, 3)  # tokens 3..5 -> 2 blocks
    assert len(bm.get_block_table("a")) == 2
    assert bm.allocate_slots("a", tokens, 6, 4)  # tokens 6..9 -> 3 blocks
    table = bm.get_block_table("a")
    assert len(table) == 3 and len(set(table)) == 3
    assert bm.allocate_slots("a", tokens + [10, 11], 10, 2)  # decode within the last block
    assert bm.get_block_table("a") == table
    assert bm.allocate_slots("a", tokens + [10, 11, 12], 12, 1)  # spills into a 4th block
    table = bm.get_block_table("a")
    assert len(table) == 4 and bm.num_used_blocks == 4 and bm.usage == 0.5
    slots = [table[p // 4] * 4 + p % 4 for p in range(13)]
    assert len(set(slots)) == 13 and all(0 <= s < 8 * 4 for s in slots)


def test_out_of_blocks_returns_false_and_changes_nothing():
    bm, events = make(num_blocks=4, block_size=4)
    prefill(bm, "a", list(range(9)))  # 3 blocks, 2 cached
    bm.free("a")
    before = (bm.num_free_blocks, dict(bm._hash_to_block), list(bm._free), len(events))
    blocks, n = bm.get_computed_blocks(list(range(8)) + [99])
    assert n == 8
    # 2 revived cached blocks + 3 new > 4 free: refused, nothing evicted, nothing taken.
    assert not bm.allocate_slots("b", list(range(8)) + [99] * 9, n, 9, blocks)
    assert (bm.num_free_blocks, dict(bm._hash_to_block), list(bm._free), len(events)) == before
    assert bm.get_block_table("b") == [] and bm.prefix_queries == 9
    assert bm.allocate_slots("b", list(range(8)) + [99] * 5, n, 5, blocks)
    assert bm.num_free_blocks == 0 and bm.get_block_table("b")[:2] == blocks
    assert not bm.allocate_slots("b", list(range(8)) + [99] * 9, 13, 4)
    assert len(bm.get_block_table("b")) == 4


def test_shared_prefix_ref_counts_and_hits():
    bm, _ = make(num_blocks=16, block_size=4)
    prompt = list(range(100, 112))  # 3 full blocks
    prefill(bm, "a", prompt + [1, 2])
    blocks, n = bm.get_computed_blocks(prompt + [7, 8, 9])
    assert n == 12 and blocks == bm.get_block_table("a")[:3]
    assert bm.allocate_slots("b", prompt + [7, 8, 9], n, 3, blocks)
    assert bm.get_block_table("b")[:3] == blocks
    assert all(bm._ref_count[b] == 2 for b in blocks)
    assert bm.prefix_hits == 12 and bm.prefix_queries == 14 + 15
    assert bm.prefix_hit_rate == pytest.approx(12 / 29)
    assert bm.stats()["hit_rate"] == bm.prefix_hit_rate and bm.stats()["used"] == 5
    bm.free("a")
    assert all(bm._ref_count[b] == 1 for b in blocks)
    assert bm.num_used_blocks == 5 - 1 and not set(blocks) & set(bm._free)
    check_invariants(bm)


def test_never_returns_all_tokens():
    bm, _ = make(num_blocks=8, block_size=4)
    prefill(bm, "a", list(range(8)))
    bm.free("a")
    assert bm.get_computed_blocks(list(range(8))) == ([bm._hash_to_block[hash_block(None, range(4))]], 4)
    assert bm.get_computed_blocks(list(range(9)))[1] == 8
    assert bm.get_computed_blocks(list(range(3))) == ([], 0)
    assert bm.get_computed_blocks([]) == ([], 0)
    assert bm.get_computed_blocks([5] + list(range(1, 9))) == ([], 0)  # first block differs


def test_eviction_lru_tail_first_and_block_removed():
    bm, events = make(num_blocks=6, block_size=2)
    prefill(bm, "old", [1, 2, 3, 4, 5])  # 3 blocks: 2 cached + 1 partial
    prefill(bm, "new", [7, 8, 9, 10, 11])
    old_table, new_table = bm.get_block_table("old"), bm.get_block_table("new")
    h_old = [hash_block(None, [1, 2]), hash_block(hash_block(None, [1, 2]), [3, 4])]
    bm.free("old")
    bm.free("new")
    events.clear()
    # Uncached partial blocks are reused first, then the least recently freed cached blocks, tail first.
    assert bm.allocate_slots("x", [0] * 6, 0, 6)
    assert set(bm.get_block_table("x")) == {old_table[2], new_table[2], old_table[1]}
    assert events == [BlockRemoved([h_old[1]])]
    assert bm.get_computed_blocks([1, 2, 3, 4, 5])[1] == 2  # head survives, tail gone
    assert bm.allocate_slots("x", [0] * 8, 6, 2)
    assert events[-1] == BlockRemoved([h_old[0]])
    assert bm.get_computed_blocks([1, 2, 3, 4, 5]) == ([], 0)
    assert bm.get_computed_blocks([7, 8, 9, 10, 11])[1] == 4  # "new" freed later: still cached
    check_invariants(bm)


def test_hit_on_free_cached_block_refreshes_lru():
    bm, _ = make(num_blocks=4, block_size=2)
    prefill(bm, "a", [1, 2, 3])
    prefill(bm, "b", [5, 6, 7])
    bm.free("a")
    bm.free("b")
    prefill(bm, "c", [1, 2, 9])  # revives a's block, then frees it again: now most recent
    bm.free("c")
    assert bm.allocate_slots("x", [0] * 2, 0, 2) and bm.allocate_slots("y", [0] * 2, 0, 2)
    assert bm.allocate_slots("z", [0] * 2, 0, 2)
    assert bm.get_computed_blocks([5, 6, 7]) == ([], 0)
    assert bm.get_computed_blocks([1, 2, 3])[1] == 2


def test_block_stored_chain_and_dedup():
    bm, events = make(num_blocks=16, block_size=2)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    assert bm.allocate_slots("a", tokens, 0, 3)
    bm.cache_full_blocks("a", tokens, 3)
    h1 = hash_block(None, [1, 2])
    assert events == [BlockStored([h1], None, [1, 2], 2)]
    assert bm.allocate_slots("a", tokens, 3, 4)
    bm.cache_full_blocks("a", tokens, 7)
    h2 = hash_block(h1, [3, 4])
    h3 = hash_block(h2, [5, 6])
    assert events[1] == BlockStored([h2, h3], h1, [3, 4, 5, 6], 2)
    bm.cache_full_blocks("a", tokens, 7)  # nothing new: no event
    assert len(events) == 2
    # Same prompt admitted before "a" cached it: its identical blocks keep a's mapping.
    assert bm.allocate_slots("b", tokens[:4] + [9, 9], 0, 6)
    bm.cache_full_blocks("b", tokens[:4] + [9, 9], 6)
    assert bm._hash_to_block[h1] == bm.get_block_table("a")[0]
    h3b = hash_block(h2, [9, 9])
    assert events[2] == BlockStored([h3b], h2, [9, 9], 2)
    assert bm._hash_to_block[h3b] == bm.get_block_table("b")[2]
    assert 0 <= h1 < 2**63


def test_hash_is_stable_across_processes():
    import subprocess
    import sys
    code = "from tidal.kv.block_manager import hash_block; print(hash_block(hash_block(None, [1, 2]), [3, 4]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123"})
    assert int(out.stdout) == hash_block(hash_block(None, [1, 2]), [3, 4])
    assert hash_block(None, [1, 2]) != hash_block(None, [2, 1]) != hash_block(0, [1, 2])


def test_reset_prefix_cache():
    bm, events = make(num_blocks=8, block_size=2)
    prefill(bm, "a", [1, 2, 3, 4, 5])
    assert not bm.reset_prefix_cache()  # blocks in use
    assert not any(isinstance(e, AllBlocksCleared) for e in events)
    bm.free("a")
    assert bm.reset_prefix_cache()
    assert events[-1] == AllBlocksCleared()
    assert bm.get_computed_blocks([1, 2, 3, 4, 5]) == ([], 0) and bm.num_free_blocks == 8


def test_prefix_caching_disabled():
    bm, events = make(num_blocks=8, block_size=2, enable_prefix_caching=False)
    prefill(bm, "a", [1, 2, 3, 4, 5])
    bm.free("a")
    assert bm.get_computed_blocks([1, 2, 3, 4, 5]) == ([], 0)
    prefill(bm, "b", [1, 2, 3, 4, 5])
    assert bm.allocate_slots("c", [0] * 10, 0, 10)  # reuses everything, evicts nothing
    assert bm.reset_prefix_cache() is False
    bm.free("b")
    bm.free("c")
    assert bm.reset_prefix_cache()
    assert events == [] and bm.prefix_hits == 0 and bm.prefix_hit_rate == 0.0


def test_free_unknown_is_noop_and_stale_blocks_rejected():
    bm, _ = make(num_blocks=2, block_size=2)
    bm.free("nope")
    assert bm.num_free_blocks == 2
    prefill(bm, "a", [1, 2, 3])
    bm.free("a")
    blocks, n = bm.get_computed_blocks([1, 2, 3])
    assert bm.allocate_slots("x", [0] * 4, 0, 4)  # evicts the cached block
    bm.free("x")
    with pytest.raises(ValueError):
        bm.allocate_slots("b", [1, 2, 3], n, 1, blocks)


VOCAB = st.integers(0, 2)  # tiny vocabulary, so random prompts share prefixes often


class BlockManagerMachine(RuleBasedStateMachine):
    """Random add / grow / cache / free / abort; checks invariants and that a prefix hit only ever
    returns blocks whose (simulated) KV content is exactly the requested tokens."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=2)
        self.content = {}  # (block, offset) -> token whose KV was written there
        self.reqs = {}  # rid -> [tokens, num_computed]
        self.next_id = 0

    def _write(self, rid, start, end):
        table, tokens = self.bm.get_block_table(rid), self.reqs[rid][0]
        for p in range(start, end):
            self.content[(table[p // 2], p % 2)] = tokens[p]

    @rule(prompt=st.lists(VOCAB, min_size=1, max_size=9), chunk=st.integers(1, 9))
    def add(self, prompt, chunk):
        blocks, n = self.bm.get_computed_blocks(prompt)
        assert n < len(prompt) and n == 2 * len(blocks)
        for p in range(n):
            assert self.content[(blocks[p // 2], p % 2)] == prompt[p]
        rid = f"r{self.next_id}"
        self.next_id += 1
        num_new = min(chunk, len(prompt) - n)
        free_before = self.bm.num_free_blocks
        if self.bm.allocate_slots(rid, prompt, n, num_new, blocks):
            self.reqs[rid] = [list(prompt), n]
            self._write(rid, n, n + num_new)
            self.reqs[rid][1] = n + num_new
        else:
            assert self.bm.num_free_blocks == free_before and self.bm.get_block_table(rid) == []

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), chunk=st.integers(1, 5), new_token=VOCAB)
    def grow(self, data, chunk, new_token):
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        tokens, computed = self.reqs[rid]
        if computed == len(tokens):
            tokens.append(new_token)  # decode: the sampled token becomes the next input
        num_new = min(chunk, len(tokens) - computed)
        before = self.bm.get_block_table(rid)
        if self.bm.allocate_slots(rid, tokens, computed, num_new):
            self._write(rid, computed, computed + num_new)
            self.reqs[rid][1] = computed + num_new
            assert len(self.bm.get_block_table(rid)) * 2 >= computed + num_new
        else:
            assert self.bm.get_block_table(rid) == before

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def cache(self, data):
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        tokens, computed = self.reqs[rid]
        self.bm.cache_full_blocks(rid, tokens, computed)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def free(self, data):  # finish, abort and preempt all end in free()
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        del self.reqs[rid]
        self.bm.free(rid)
        self.bm.free(rid)  # double free of a finished request is a no-op

    @invariant()
    def consistent(self):
        check_invariants(self.bm)

    def teardown(self):
        for rid in list(self.reqs):
            self.bm.free(rid)
        assert self.bm.num_used_blocks == 0 and self.bm.num_free_blocks == self.bm.num_blocks
        check_invariants(self.bm)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
