"""KV cache events: what the block manager tells subscribers about its prefix cache.

Owns: the event types `BlockStored`, `BlockRemoved`, `AllBlocksCleared` and the `KVEvent` union.
A subscriber (the cluster gateway's prefix index, metrics) rebuilds which prefixes a replica holds
from this stream alone, so the hashes here are the block manager's stable chained hashes.
Must not: import anything from tidal; these are plain data that may be serialized across processes.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockStored:
    """Full blocks newly registered in the prefix cache, as one contiguous chain.

    `block_hashes[0]` chains from `parent_block_hash` (None: the chain starts at token 0);
    `token_ids` are the blocks' tokens concatenated, `len(block_hashes) * block_size` of them.
    """

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int


@dataclass(frozen=True)
class BlockRemoved:
    """Cached blocks evicted: these hashes are no longer hits on this replica."""

    block_hashes: list[int]


@dataclass(frozen=True)
class AllBlocksCleared:
    """The whole prefix cache was dropped (reset_prefix_cache)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
