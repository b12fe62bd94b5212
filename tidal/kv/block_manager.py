"""Block manager of the paged KV cache: block ids, ref counts, chained prefix hashes, LRU eviction.

Owns: which KV block each request's tokens live in (`block_table`), block ref counts, the prefix
cache (chained hash of a full block -> block id), the free pool in eviction order, KV events and
prefix hit-rate stats. Token at position p lives at slot
`block_table[p // block_size] * block_size + p % block_size`.
Must not: touch tensors (the runner owns the KV tensors), know about scheduling policy (the
scheduler decides who is preempted when `allocate_slots` returns False), or import torch.
"""
import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence

from tidal.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chained hash of one full block: stable across processes and machines (the gateway compares
    hashes from many replicas), so an explicit blake2b over little-endian int64s, not hash().
    Room for multimodal inputs (not built): the content hashes of the images a block covers would
    join its tokens here as extra keys, so equal token ids with different images never share KV."""
    head = b"\x00" if parent_hash is None else b"\x01" + struct.pack("<q", parent_hash)
    body = struct.pack(f"<{len(token_ids)}q", *token_ids)
    digest = hashlib.blake2b(head + body, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: fits a signed int64 everywhere


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_count = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        # Blocks with ref 0, front = next to reuse. Uncached blocks sit at the front (reusing them
        # loses nothing); cached ones are appended when freed, so the front is the least recently freed.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._tables: dict[str, list[int]] = {}
        # Chain hashes of each request's first full blocks already handled by cache_full_blocks, so a
        # step only hashes blocks that became full since the last one (no O(total tokens) per step).
        self._chain: dict[str, list[int]] = {}
        self._subscribers: list[Callable[[KVEvent], None]] = []
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- events -------------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[KVEvent], None]) -> None:
        self._subscribers.append(callback)

    def _emit(self, event: KVEvent) -> None:
        for callback in self._subscribers:
            callback(event)

    # ---- prefix lookup ------------------------------------------------------------------------
    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Longest cached prefix of full blocks -> (block ids, num tokens). Takes no references, so
        pass the result to allocate_slots before any other allocation can evict those blocks."""
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        # At most (n-1)//bs blocks: never the whole prompt, the last token must be computed for logits.
        max_blocks = (len(token_ids) - 1) // bs if token_ids else 0
        blocks: list[int] = []
        parent = None
        for i in range(max_blocks):
            parent = hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            block = self._hash_to_block.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * bs

    # ---- allocation ---------------------------------------------------------------------------
    def allocate_slots(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                       num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Grow request_id's table to cover num_computed_tokens + num_new_tokens tokens. On the first
        call, computed_blocks (from get_computed_blocks) head the table; on later calls they are
        ignored. Returns False and changes nothing when the free pool is too small."""
        table = self._tables.get(request_id)
        is_new = table is None
        taken = list(computed_blocks or []) if is_new else []
        num_required = -(-(num_computed_tokens + num_new_tokens) // self.block_size)
        num_have = len(taken) if is_new else len(table)
        if len(taken) > num_required:
            raise ValueError(f"{len(taken)} computed blocks exceed the {num_required} blocks needed")
        for block in taken:
            if self._block_hash[block] is None:
                raise ValueError(f"computed block {block} was evicted since get_computed_blocks")
        num_new_blocks = max(0, num_required - num_have)
        # Taking a ref-0 cached block removes it from the free pool too, so count it against the pool.
        num_revived = sum(1 for block in taken if self._ref_count[block] == 0)
        if num_new_blocks + num_revived > len(self._free):
            return False

        if is_new:
            table = self._tables[request_id] = []
            self._chain[request_id] = [self._block_hash[block] for block in taken]
            self.prefix_queries += len(token_ids)
            self.prefix_hits += len(taken) * self.block_size
            for block in taken:
                if self._ref_count[block] == 0:
                    del self._free[block]
                self._ref_count[block] += 1
            table.extend(taken)
        evicted: list[int] = []
        for _ in range(num_new_blocks):
            block, _ = self._free.popitem(last=False)
            block_hash = self._block_hash[block]
            if block_hash is not None:
                del self._hash_to_block[block_hash]
                self._block_hash[block] = None
                evicted.append(block_hash)
            self._ref_count[block] = 1
            table.append(block)
        if evicted:
            self._emit(BlockRemoved(evicted))
        return True

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register every block of request_id now full of computed tokens in the prefix cache."""
        if not self.enable_prefix_caching or request_id not in self._tables:
            return
        table, chain, bs = self._tables[request_id], self._chain[request_id], self.block_size
        num_full = min(num_computed_tokens // bs, len(table))
        if num_full <= len(chain):
            return
        if len(token_ids) < num_full * bs:
            raise ValueError(f"{num_computed_tokens} computed tokens but only {len(token_ids)} token ids")
        # A block already cached elsewhere (another request computed it) keeps the existing mapping,
        # which splits the newly stored blocks into runs; each run is one chained BlockStored event.
        runs: list[tuple[int | None, list[int], list[int]]] = []
        run = None
        for i in range(len(chain), num_full):
            parent = chain[-1] if chain else None
            tokens = token_ids[i * bs:(i + 1) * bs]
            block_hash = hash_block(parent, tokens)
            chain.append(block_hash)
            if block_hash in self._hash_to_block:
                run = None
                continue
            self._hash_to_block[block_hash] = table[i]
            self._block_hash[table[i]] = block_hash
            if run is None:
                run = (parent, [], [])
                runs.append(run)
            run[1].append(block_hash)
            run[2].extend(tokens)
        for parent, hashes, tokens in runs:
            self._emit(BlockStored(hashes, parent, list(tokens), bs))

    def free(self, request_id: str) -> None:
        """Drop request_id's references. Freed in reverse so a sequence's tail is evicted before its
        head: the head is the part other requests are likeliest to share."""
        table = self._tables.pop(request_id, None)
        self._chain.pop(request_id, None)
        if table is None:
            return
        for block in reversed(table):
            self._ref_count[block] -= 1
            assert self._ref_count[block] >= 0, f"block {block} freed more often than taken"
            if self._ref_count[block] == 0:
                self._free[block] = None
                if self._block_hash[block] is None:
                    self._free.move_to_end(block, last=False)

    def get_block_table(self, request_id: str) -> list[int]:
        return list(self._tables.get(request_id, ()))

    def new_block_ids(self, request_id: str, num_known: int) -> list[int]:
        """request_id's block ids past its first `num_known`: what a step adds, without copying the table."""
        table = self._tables.get(request_id)
        return table[num_known:] if table is not None else []

    def num_blocks_of(self, request_id: str) -> int:
        return len(self._tables.get(request_id, ()))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (e.g. after a weight update). Only when no block is in use."""
        if self.num_used_blocks > 0:
            return False
        self._hash_to_block.clear()
        self._block_hash = [None] * self.num_blocks
        self._free = OrderedDict.fromkeys(range(self.num_blocks))
        for chain in self._chain.values():
            chain.clear()
        if self.enable_prefix_caching:
            self._emit(AllBlocksCleared())
        return True

    # ---- stats --------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def stats(self) -> dict:
        return {"used": self.num_used_blocks, "total": self.num_blocks, "usage": self.usage,
                "prefix_queries": self.prefix_queries, "prefix_hits": self.prefix_hits,
                "hit_rate": self.prefix_hit_rate}
